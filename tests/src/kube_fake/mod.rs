//! An in-process fake of the Kubernetes API server, for tests of code that
//! talks to it through a real `kube::Client`.
//!
//! No kube-apiserver can be had on the test machines, so this serves the
//! few endpoints Baton uses over HTTP on `127.0.0.1:0`, with the semantics
//! Baton depends on kept real:
//! - every write bumps a cluster-wide `resourceVersion`; a PUT or PATCH
//!   carrying a stale one answers 409 Conflict, a create of an existing
//!   name 409 AlreadyExists, a missing object 404;
//! - a ConfigMap whose data exceeds 1 MiB is refused 422 Invalid, as the
//!   API server's validation does; so is an Event without an involved
//!   object, with a type other than Normal/Warning, or with a message over
//!   1 KiB (events.k8s.io's limit, applied to core/v1 Events too);
//! - `pods/eviction` answers 429 while a PodDisruptionBudget (integer
//!   `minAvailable` or `maxUnavailable`, `matchLabels` selector) forbids the
//!   disruption, and otherwise deletes the pod gracefully: it gets a
//!   `deletionTimestamp` and disappears after its grace period;
//! - list and watch (`?watch=true`, from a resourceVersion or from "now"
//!   with synthetic ADDED events), with equality-based label selectors and
//!   field selectors on any dotted path;
//! - TokenReview against tokens the test issues ([`FakeToken`]), and
//!   TokenRequest (`serviceaccounts/NAME/token`) issuing such tokens;
//! - `pods/portforward` over WebSocket (`v4.channel.k8s.io`) to the pod's
//!   `status.podIP` ([`portforward`]);
//! - JSON merge patches (strategic merge patches are applied as merge
//!   patches, which is the same for the maps Baton patches).
//!
//! Several [`Endpoint`]s can serve one store; an endpoint can be partitioned
//! (every request and open watch fails) to cut one client off, as a network
//! partition would, stall the writes to one resource (they hang until
//! released), as an overloaded API server would, answer them late (the
//! write is done, its answer slow), or fail them (500, 429). An endpoint can also be in-process (no
//! socket), for tests on tokio's paused clock.
//!
//! Layout: this file holds the store and its public test handle;
//! [`http`] routes requests; [`semantics`] holds the pure rules (selectors,
//! merge patch, disruption budgets).

pub mod events;
pub mod fixtures;
mod http;
pub mod portforward;
pub mod semantics;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};
use tokio::sync::watch;

/// Where an object lives: collection (`"v1/pods"`,
/// `"coordination.k8s.io/v1/leases"`), namespace (empty for cluster-scoped
/// objects) and name.
pub type Key = (String, String, String);

/// One change, as a watch reports it.
#[derive(Clone, Debug)]
pub struct Change {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// The object's key.
    pub key: Key,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    /// The object after the change (before it, for DELETED).
    pub object: Value,
}

/// A ServiceAccount token the fake's TokenReview accepts.
#[derive(Clone, Debug, Default)]
pub struct FakeToken {
    /// `system:serviceaccount:NS:NAME`, or a user name.
    pub username: String,
    /// Groups.
    pub groups: Vec<String>,
    /// Audiences the token was issued for.
    pub audiences: Vec<String>,
    /// Extra claims (e.g. `authentication.kubernetes.io/node-name`).
    pub extra: BTreeMap<String, Vec<String>>,
}

/// One request as the fake answered it (for assertions on what a client did).
#[derive(Clone, Debug)]
pub struct Served {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Status code answered.
    pub status: u16,
}

#[derive(Default)]
pub(crate) struct Store {
    pub(crate) objects: BTreeMap<Key, Value>,
    pub(crate) rv: u64,
    pub(crate) log: Vec<Change>,
    pub(crate) tokens: HashMap<String, FakeToken>,
    pub(crate) served: Vec<Served>,
    uid: u64,
}

/// The fake API server's state; cheap to clone.
#[derive(Clone)]
pub struct FakeApi {
    pub(crate) store: Arc<Mutex<Store>>,
    /// Bumped after every write, to wake watches.
    pub(crate) changed: watch::Sender<u64>,
}

/// One listener serving a [`FakeApi`].
pub struct Endpoint {
    /// `http://127.0.0.1:PORT` (`http://in-process` for [`FakeApi::in_process`]).
    pub url: String,
    partitioned: Arc<AtomicBool>,
    /// The resource (`configmaps`, ...) whose writes hang, if any.
    stalled: Arc<Mutex<Option<String>>>,
    /// The resource whose writes are applied but answered late, and how late.
    delayed: Arc<Mutex<Option<(String, std::time::Duration)>>>,
    /// The resource whose writes fail, and with which status code.
    failing: http::Failing,
    /// Set for an in-process endpoint: requests go straight to the router.
    router: Option<axum::Router>,
}

impl Default for FakeApi {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeApi {
    /// An empty cluster.
    pub fn new() -> Self {
        Self {
            store: Arc::new(Mutex::new(Store::default())),
            changed: watch::channel(0).0,
        }
    }

    /// Serves the fake on `127.0.0.1:0` until the runtime ends.
    pub async fn serve(&self) -> Endpoint {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let mut endpoint = self.endpoint(url);
        let app = endpoint
            .router
            .take()
            .expect("a fresh endpoint has a router");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        endpoint
    }

    /// An endpoint served in-process, without a socket: its
    /// [`Endpoint::client`] calls the router directly, so the whole
    /// exchange runs on tokio's clock (tests under `start_paused` are exact
    /// and deterministic).
    pub fn in_process(&self) -> Endpoint {
        self.endpoint("http://in-process".to_string())
    }

    fn endpoint(&self, url: String) -> Endpoint {
        let partitioned = Arc::new(AtomicBool::new(false));
        let stalled = Arc::new(Mutex::new(None));
        let delayed = Arc::new(Mutex::new(None));
        let failing = Arc::new(Mutex::new(None));
        let router = http::router(
            self.clone(),
            partitioned.clone(),
            stalled.clone(),
            delayed.clone(),
            failing.clone(),
        );
        Endpoint {
            url,
            partitioned,
            stalled,
            delayed,
            failing,
            router: Some(router),
        }
    }

    /// A `kube::Client` talking to a fresh endpoint of this fake.
    pub async fn client(&self) -> kube::Client {
        self.serve().await.client()
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `object` (create or overwrite, as a controller elsewhere
    /// would), setting its resourceVersion and uid. Returns the stored object.
    pub fn put(&self, object: Value) -> Value {
        let key = key_of(&object);
        let mut store = self.lock();
        let existed = store.objects.contains_key(&key);
        let stored = store.write(key, object, if existed { "MODIFIED" } else { "ADDED" });
        drop(store);
        self.wake();
        stored
    }

    /// The object at `key`, if any.
    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        self.lock()
            .objects
            .get(&(
                collection.to_string(),
                namespace.to_string(),
                name.to_string(),
            ))
            .cloned()
    }

    /// Every object of `collection`.
    pub fn list(&self, collection: &str) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((c, _, _), _)| c == collection)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Removes an object at once (no grace period), as a force delete would.
    pub fn remove(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            collection.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let removed = self.lock().delete(&key);
        self.wake();
        removed
    }

    /// Accepts `token` in TokenReviews as `identity`.
    pub fn issue_token(&self, token: &str, identity: FakeToken) {
        self.lock().tokens.insert(token.to_string(), identity);
    }

    /// Every request answered so far.
    pub fn served(&self) -> Vec<Served> {
        self.lock().served.clone()
    }

    pub(crate) fn wake(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

impl Endpoint {
    /// A `kube::Client` for this endpoint (no credentials).
    pub fn client(&self) -> kube::Client {
        if let Some(router) = &self.router {
            return kube::Client::new(router.clone(), "default");
        }
        let mut config = kube::Config::new(self.url.parse().expect("endpoint url"));
        // As Baton's own clients do: callers see 429 and 503 themselves.
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client for the fake")
    }

    /// Cuts this endpoint off (true) or heals it (false): while cut, every
    /// request answers 503 and open watches end.
    pub fn partition(&self, cut: bool) {
        self.partitioned.store(cut, Ordering::SeqCst);
    }

    /// Makes every write (anything but GET) to `resource` (e.g.
    /// `configmaps`) hang on this endpoint until called again with `None`;
    /// reads and other resources are served as usual.
    pub fn stall_writes(&self, resource: Option<&str>) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = resource.map(str::to_string);
    }

    /// Makes every write (anything but GET) to `resource` (e.g. `events`)
    /// on this endpoint fail with `code` (500, 429, ...) without effect,
    /// until called again with `None`.
    pub fn fail_writes(&self, failing: Option<(&str, u16)>) {
        *self.failing.lock().unwrap_or_else(|e| e.into_inner()) =
            failing.map(|(resource, code)| (resource.to_string(), code));
    }

    /// Makes every write to `resource` (e.g. `leases`) on this endpoint take
    /// effect at once but answer only after `delay` (a slow network on the
    /// way back), until called again with `None`.
    pub fn delay_write_answers(&self, delayed: Option<(&str, std::time::Duration)>) {
        *self.delayed.lock().unwrap_or_else(|e| e.into_inner()) =
            delayed.map(|(resource, delay)| (resource.to_string(), delay));
    }
}

/// The key of a full object (apiVersion, kind, metadata).
pub fn key_of(object: &Value) -> Key {
    let api_version = object["apiVersion"].as_str().unwrap_or("v1");
    let kind = object["kind"].as_str().unwrap_or_default();
    let collection = format!("{api_version}/{}", plural(kind));
    let namespace = object["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (collection, namespace, name)
}

/// The resource name of a kind (the few kinds the fake knows).
pub fn plural(kind: &str) -> String {
    match kind {
        "PodDisruptionBudget" => "poddisruptionbudgets".to_string(),
        "TokenReview" => "tokenreviews".to_string(),
        k => format!("{}s", k.to_ascii_lowercase()),
    }
}

/// The kind of a resource name (inverse of [`plural`]).
pub fn kind_of(resource: &str) -> String {
    match resource {
        "poddisruptionbudgets" => "PodDisruptionBudget".to_string(),
        "configmaps" => "ConfigMap".to_string(),
        "daemonsets" => "DaemonSet".to_string(),
        "replicasets" => "ReplicaSet".to_string(),
        "tokenreviews" => "TokenReview".to_string(),
        r => {
            let singular = r.strip_suffix('s').unwrap_or(r);
            let mut chars = singular.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        }
    }
}

impl Store {
    /// Writes `object` at `key` with a new resourceVersion and logs it.
    pub(crate) fn write(&mut self, key: Key, mut object: Value, kind: &'static str) -> Value {
        self.rv += 1;
        let rv = self.rv;
        if object["metadata"].is_null() {
            object["metadata"] = json!({});
        }
        let meta = &mut object["metadata"];
        meta["resourceVersion"] = json!(rv.to_string());
        meta["name"] = json!(key.2);
        if !key.1.is_empty() {
            meta["namespace"] = json!(key.1);
        }
        if meta["uid"].is_null() {
            self.uid += 1;
            meta["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", self.uid));
        }
        if meta["creationTimestamp"].is_null() {
            meta["creationTimestamp"] = json!(now_rfc3339());
        }
        self.objects.insert(key.clone(), object.clone());
        self.log.push(Change {
            rv,
            key,
            kind,
            object: object.clone(),
        });
        object
    }

    /// Removes the object at `key`, logging a DELETED event.
    pub(crate) fn delete(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log.push(Change {
            rv: self.rv,
            key: key.clone(),
            kind: "DELETED",
            object: object.clone(),
        });
        Some(object)
    }
}

/// The current time as Kubernetes writes it.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    semantics::rfc3339(now)
}
