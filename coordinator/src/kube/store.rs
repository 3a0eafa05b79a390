//! `--store kubernetes`: the lease state in a ConfigMap (key `state.json`,
//! the same document as the embedded store; the audit beside it under
//! `audit.json`, the newest records within [`AUDIT_MAX_BYTES`]), leadership
//! from a Lease. An object is replaced whole, so the audit is rewritten
//! with every save here; it stays bounded, and the ConfigMap under 1 MiB.
//!
//! Every save is a compare-and-swap on the ConfigMap's resourceVersion: the
//! replace carries the version the engine's memory was read or written at
//! (its fence), so a write by anyone else in between makes the API server
//! answer 409, and a deleted object 404. A conflict is never overwritten:
//! the save is refused and the engine re-reads the state before it answers
//! again. This also fences a deposed leader that has not noticed yet: its
//! next save conflicts with the new leader's writes. A save is refused too
//! when this replica does not hold the Lease in the fence's term (Lease
//! leadership is time-based, as in client-go: a leader that could not renew
//! within its renew deadline steps down before another may take over).
//!
//! A confirmation is a metadata-only GET of the ConfigMap (served from etcd
//! with a quorum read by the API server) compared against the fence's
//! resourceVersion.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::watch;
use tracing::warn;

use super::KubeArgs;
use super::election::Elector;
use crate::state::{AUDIT_KEEP, AUDIT_MAX_BYTES, LeaseState, newest_within};
use crate::store::{
    Fence, Leadership, Loaded, Numbered, Revision, StateStore, StoreError, attach_audit, decode,
    encode, numbered,
};

/// The key of the state document in the ConfigMap.
pub const STATE_KEY: &str = "state.json";
/// The key of the audit in the ConfigMap.
pub const AUDIT_KEY: &str = "audit.json";

/// The Kubernetes store of one replica.
pub struct KubeStore {
    api: Api<ConfigMap>,
    name: String,
    /// "configmap NAMESPACE/NAME", for errors.
    path: String,
    leadership: Arc<watch::Sender<Leadership>>,
    /// Keeps the channel open (and the election running) while the store lives.
    _leadership_rx: watch::Receiver<Leadership>,
    /// The audit as last read or written (a save writes it again with the
    /// new records).
    audit: std::sync::Mutex<Vec<Numbered>>,
}

impl KubeStore {
    /// Opens the store and starts this replica's election (as `id`).
    /// While `yielding` is set, this replica hands the Lease over (see
    /// [`super::election::step`]).
    pub fn start(client: Client, args: &KubeArgs, id: &str, yielding: Arc<AtomicBool>) -> Self {
        let (leadership, leadership_rx) = watch::channel(Leadership::default());
        let leadership = Arc::new(leadership);
        let elector = Elector::new(
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            &args.lease_name,
            id,
            args.timings(),
            leadership.clone(),
            yielding,
        );
        tokio::spawn(elector.run());
        Self {
            api: Api::namespaced(client, &args.namespace),
            name: args.state_configmap.clone(),
            path: format!("configmap {}/{}", args.namespace, args.state_configmap),
            leadership,
            _leadership_rx: leadership_rx,
            audit: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn backend(&self, what: &str, e: ::kube::Error) -> StoreError {
        StoreError::Backend(format!("{what} {}: {e}", self.path))
    }

    fn conflict(&self, detail: &str) -> StoreError {
        warn!(object = %self.path, detail, "state changed under this replica; it is re-read before anything is answered");
        StoreError::Conflict(format!("{} ({detail})", self.path))
    }

    /// Refuses unless this replica holds the Lease in `fence.term`.
    fn check_leading(&self, fence: &Fence) -> Result<(), StoreError> {
        let leadership = self.leadership.borrow();
        if !leadership.is_leader {
            return Err(StoreError::NotLeader(format!(
                "{} is written only by the leader",
                self.path
            )));
        }
        if leadership.term != fence.term {
            return Err(StoreError::NotLeader(format!(
                "this replica leads in term {}, its memory is from term {}",
                leadership.term, fence.term
            )));
        }
        Ok(())
    }

    async fn read(&self) -> Result<Option<ConfigMap>, StoreError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.backend("reading", e))
    }

    async fn load_now(&self) -> Result<Loaded, StoreError> {
        let Some(object) = self.read().await? else {
            return Ok(Loaded {
                state: None,
                revision: Revision::Absent,
            });
        };
        let revision = object
            .metadata
            .resource_version
            .clone()
            .map(Revision::At)
            .ok_or_else(|| StoreError::Corrupt {
                path: self.path.clone(),
                detail: "it has no resourceVersion".to_string(),
            })?;
        match object.data.as_ref().and_then(|d| d.get(STATE_KEY)) {
            Some(text) => {
                let mut state = decode(&self.path, text.as_bytes())?;
                let records: Vec<Numbered> =
                    match object.data.as_ref().and_then(|d| d.get(AUDIT_KEY)) {
                        Some(audit) => {
                            serde_json::from_str(audit).map_err(|e| StoreError::Corrupt {
                                path: format!("{} key {AUDIT_KEY}", self.path),
                                detail: e.to_string(),
                            })?
                        }
                        None => Vec::new(),
                    };
                attach_audit(&mut state, records);
                *self.audit.lock().unwrap_or_else(|e| e.into_inner()) = numbered(&state).collect();
                Ok(Loaded {
                    state: Some(state),
                    revision,
                })
            }
            None => Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("it has no {STATE_KEY} key"),
            }),
        }
    }

    async fn save_now(&self, state: &LeaseState, fence: &Fence) -> Result<Revision, StoreError> {
        self.check_leading(fence)?;
        let text =
            String::from_utf8(encode(state)).map_err(|e| StoreError::Backend(e.to_string()))?;
        // The audit as stored, with this save's records, the newest that fit.
        let mut audit: std::collections::BTreeMap<u64, Numbered> = self
            .audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .chain(&numbered(state).collect::<Vec<_>>())
            .filter(|n| n.number <= state.audit_seq)
            .map(|n| (n.number, n.clone()))
            .collect();
        let mut audit: Vec<Numbered> = std::mem::take(&mut audit).into_values().collect();
        let keep = newest_within(&audit, AUDIT_MAX_BYTES).min(AUDIT_KEEP);
        audit.drain(..audit.len() - keep);
        let audit_text = serde_json::to_string(&audit).expect("audit records serialize");
        let version = match &fence.revision {
            Revision::Absent => None,
            Revision::At(v) => Some(v.clone()),
        };
        let object = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.clone(),
                labels: Some([("app.kubernetes.io/name".to_string(), "baton".to_string())].into()),
                ..ObjectMeta::default()
            },
            data: Some(
                [
                    (STATE_KEY.to_string(), text),
                    (AUDIT_KEY.to_string(), audit_text),
                ]
                .into(),
            ),
            ..ConfigMap::default()
        };
        let written = match version {
            None => self.api.create(&PostParams::default(), &object).await,
            Some(_) => {
                self.api
                    .replace(&self.name, &PostParams::default(), &object)
                    .await
            }
        };
        match written {
            Ok(object) => {
                *self.audit.lock().unwrap_or_else(|e| e.into_inner()) = audit;
                object
                    .metadata
                    .resource_version
                    .map(Revision::At)
                    .ok_or_else(|| {
                        StoreError::Backend(format!(
                            "{} written without a resourceVersion",
                            self.path
                        ))
                    })
            }
            Err(::kube::Error::Api(s)) if s.code == 409 => Err(self.conflict(&s.message)),
            Err(::kube::Error::Api(s)) if s.code == 404 => {
                Err(self.conflict("the object was deleted"))
            }
            Err(e) => Err(self.backend("writing", e)),
        }
    }

    async fn confirm_now(&self, fence: &Fence) -> Result<(), StoreError> {
        self.check_leading(fence)?;
        // Metadata only: the resourceVersion is all a confirmation needs.
        let now = match self
            .api
            .get_metadata_opt(&self.name)
            .await
            .map_err(|e| self.backend("reading", e))?
        {
            Some(object) => object
                .metadata
                .resource_version
                .map(Revision::At)
                .unwrap_or_default(),
            None => Revision::Absent,
        };
        if now != fence.revision {
            return Err(self.conflict(&format!(
                "at resourceVersion {now}, this replica's memory at {}",
                fence.revision
            )));
        }
        Ok(())
    }
}

impl StateStore for KubeStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(self.load_now())
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(self.save_now(state, fence))
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.confirm_now(fence))
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn location(&self) -> String {
        self.path.clone()
    }
}
