//! `--store kubernetes`: the lease state in a ConfigMap (key `state.json`,
//! the same document as the embedded store), leadership from a Lease.
//!
//! Every save is a compare-and-swap on the ConfigMap's resourceVersion: the
//! replace carries the version this replica last read or wrote, so a write
//! by anyone else in between makes the API server answer 409. A conflict is
//! never overwritten: the store refuses the save, marks itself stale and
//! steps down; the election (still holding the Lease, or not) publishes
//! leadership again, and the engine re-reads the state before it decides
//! anything new. This also fences a deposed leader that has not noticed yet:
//! its next save conflicts with the new leader's writes.
//!
//! Every read and write is bounded by `--lease-renew-deadline` (the engine
//! waits for a save with its lock held, so an API server that hangs must
//! not stall every call). A write that gets no answer in time may still
//! land, so it is handled like a conflict: refused, the store marked stale,
//! leadership dropped until the state is re-read.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ::kube::api::PostParams;
use ::kube::{Api, Client};
use futures::future::BoxFuture;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tokio::sync::{Mutex, watch};
use tracing::warn;

use super::KubeArgs;
use super::election::{Elector, Timings};
use crate::state::LeaseState;
use crate::store::{Leadership, StateStore, StoreError, decode, encode};

/// The key of the state document in the ConfigMap.
pub const STATE_KEY: &str = "state.json";

/// The Kubernetes store of one replica.
pub struct KubeStore {
    api: Api<ConfigMap>,
    name: String,
    /// "configmap NAMESPACE/NAME", for errors.
    path: String,
    leadership: Arc<watch::Sender<Leadership>>,
    /// The resourceVersion last read or written; `None` when the object did
    /// not exist then.
    version: Mutex<Option<String>>,
    /// Set by a conflict until the next load.
    stale: AtomicBool,
    /// The longest a read or write of the state may take.
    timeout: Duration,
    /// Keeps the channel open (and the election running) while the store lives.
    _leadership_rx: watch::Receiver<Leadership>,
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
            Timings {
                duration: args.lease_duration,
                renew_deadline: args.lease_renew_deadline,
                retry_period: args.lease_retry_period,
            },
            leadership.clone(),
            yielding,
        );
        tokio::spawn(elector.run());
        Self {
            api: Api::namespaced(client, &args.namespace),
            name: args.state_configmap.clone(),
            path: format!("configmap {}/{}", args.namespace, args.state_configmap),
            leadership,
            version: Mutex::new(None),
            stale: AtomicBool::new(false),
            timeout: args.lease_renew_deadline,
            _leadership_rx: leadership_rx,
        }
    }

    fn backend(&self, what: &str, e: ::kube::Error) -> StoreError {
        StoreError::Backend(format!("{what} {}: {e}", self.path))
    }

    /// Refuses the save, marks the store stale and steps down so the engine
    /// re-reads the state before deciding again.
    fn conflict(&self, detail: &str) -> StoreError {
        warn!(object = %self.path, detail, "state changed under this replica; stepping down to re-read it");
        self.stale.store(true, Ordering::SeqCst);
        self.leadership
            .send_if_modified(|l| std::mem::replace(&mut l.is_leader, false));
        StoreError::NotLeader(format!(
            "the state in {} was changed by another writer ({detail}); it is re-read before anything is decided again",
            self.path
        ))
    }

    fn no_answer(&self, what: &str) -> String {
        format!(
            "{what} {}: no answer within {}ms",
            self.path,
            self.timeout.as_millis()
        )
    }

    async fn load_now(&self) -> Result<Option<LeaseState>, StoreError> {
        let mut version = self.version.lock().await;
        let object = tokio::time::timeout(self.timeout, self.api.get_opt(&self.name))
            .await
            .map_err(|_| StoreError::Backend(self.no_answer("reading")))?
            .map_err(|e| self.backend("reading", e))?;
        self.stale.store(false, Ordering::SeqCst);
        let Some(object) = object else {
            *version = None;
            return Ok(None);
        };
        *version = object.metadata.resource_version.clone();
        match object.data.as_ref().and_then(|d| d.get(STATE_KEY)) {
            Some(text) => decode(&self.path, text.as_bytes()).map(Some),
            None => Err(StoreError::Corrupt {
                path: self.path.clone(),
                detail: format!("it has no {STATE_KEY} key"),
            }),
        }
    }

    async fn save_now(&self, state: &LeaseState) -> Result<(), StoreError> {
        if !self.leadership.borrow().is_leader {
            return Err(StoreError::NotLeader(format!(
                "{} is written only by the leader",
                self.path
            )));
        }
        if self.stale.load(Ordering::SeqCst) {
            return Err(
                self.conflict("an earlier save conflicted and the state was not re-read yet")
            );
        }
        let mut version = self.version.lock().await;
        let text =
            String::from_utf8(encode(state)).map_err(|e| StoreError::Backend(e.to_string()))?;
        let object = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: version.clone(),
                labels: Some([("app.kubernetes.io/name".to_string(), "baton".to_string())].into()),
                ..ObjectMeta::default()
            },
            data: Some([(STATE_KEY.to_string(), text)].into()),
            ..ConfigMap::default()
        };
        let write = async {
            match version.as_ref() {
                None => self.api.create(&PostParams::default(), &object).await,
                Some(_) => {
                    self.api
                        .replace(&self.name, &PostParams::default(), &object)
                        .await
                }
            }
        };
        let Ok(written) = tokio::time::timeout(self.timeout, write).await else {
            // The write may still land: treat it like a conflict, so
            // nothing is decided again before the state is re-read.
            self.conflict("the write got no answer in time");
            return Err(StoreError::Backend(self.no_answer("writing")));
        };
        match written {
            Ok(object) => {
                *version = object.metadata.resource_version;
                Ok(())
            }
            Err(::kube::Error::Api(s)) if s.code == 409 => Err(self.conflict(&s.message)),
            Err(::kube::Error::Api(s)) if s.code == 404 => {
                Err(self.conflict("the object was deleted"))
            }
            Err(e) => Err(self.backend("writing", e)),
        }
    }
}

impl StateStore for KubeStore {
    fn load(&self) -> BoxFuture<'_, Result<Option<LeaseState>, StoreError>> {
        Box::pin(self.load_now())
    }

    fn save<'a>(&'a self, state: &'a LeaseState) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.save_now(state))
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "kubernetes"
    }
}
