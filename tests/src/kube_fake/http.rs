//! Routing of the fake API server: parses Kubernetes REST paths and answers
//! get, list, watch, create, replace, patch, delete, evictions and
//! TokenReviews on the shared store.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::semantics::{
    disruptions_allowed, fields_match, invalid, label_selector_matches, labels_match, merge_patch,
    parse_query, pdb_status,
};
use super::{FakeApi, Key, Served, kind_of, now_rfc3339};

/// A resource whose writes are answered late, and how late.
pub(crate) type Delayed = Arc<Mutex<Option<(String, Duration)>>>;
/// A resource whose writes fail, and with which status code.
pub(crate) type Failing = Arc<Mutex<Option<(String, u16)>>>;

#[derive(Clone)]
struct Ctx {
    api: FakeApi,
    partitioned: Arc<AtomicBool>,
    stalled: Arc<Mutex<Option<String>>>,
    delayed: Delayed,
    failing: Failing,
}

pub(crate) fn router(
    api: FakeApi,
    partitioned: Arc<AtomicBool>,
    stalled: Arc<Mutex<Option<String>>>,
    delayed: Delayed,
    failing: Failing,
) -> Router {
    Router::new().fallback(handle).with_state(Ctx {
        api,
        partitioned,
        stalled,
        delayed,
        failing,
    })
}

/// The status code a write to `target` fails with, if its resource's
/// writes are made to fail.
fn failing_code(ctx: &Ctx, method: &Method, target: Option<&Target>) -> Option<u16> {
    for_writes_to(&ctx.failing, method, target)
}

/// How long the answer to this request is held back after it took effect.
fn answer_delay(ctx: &Ctx, method: &Method, target: Option<&Target>) -> Option<Duration> {
    for_writes_to(&ctx.delayed, method, target)
}

/// The value `setting` holds for writes (anything but GET) to `target`'s
/// resource, if it names that resource.
fn for_writes_to<T: Copy>(
    setting: &Mutex<Option<(String, T)>>,
    method: &Method,
    target: Option<&Target>,
) -> Option<T> {
    let target = target?;
    if method == Method::GET {
        return None;
    }
    let setting = setting.lock().unwrap_or_else(|e| e.into_inner());
    match &*setting {
        Some((resource, value)) if *resource == target.resource => Some(*value),
        _ => None,
    }
}

/// While writes to `target`'s resource are stalled, waits (re-checking
/// every 50 ms) before answering, as an API server that hangs would.
async fn wait_while_stalled(ctx: &Ctx, method: &Method, target: Option<&Target>) {
    let Some(target) = target else { return };
    if method == Method::GET {
        return;
    }
    loop {
        let stalled = ctx
            .stalled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if stalled.as_deref() != Some(target.resource.as_str()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A parsed request path.
struct Target {
    /// `v1` or `group/version`.
    api_version: String,
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (api_version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ((*v).to_string(), rest),
            ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
            _ => return None,
        };
        let (namespace, rest) = match rest {
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some((*ns).to_string()), rest),
            _ => (None, rest),
        };
        let (resource, rest) = rest.split_first()?;
        Some(Self {
            api_version,
            resource: (*resource).to_string(),
            namespace,
            name: rest.first().map(|s| (*s).to_string()),
            sub: rest.get(1).map(|s| (*s).to_string()),
        })
    }

    fn collection(&self) -> String {
        format!("{}/{}", self.api_version, self.resource)
    }

    fn key(&self, name: &str) -> Key {
        (
            self.collection(),
            self.namespace.clone().unwrap_or_default(),
            name.to_string(),
        )
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    json_response(code, &body)
}

fn json_response(code: u16, body: &Value) -> Response {
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The largest request body the fake reads.
const BODY_LIMIT: usize = 16 << 20;

async fn handle(State(ctx): State<Ctx>, request: axum::extract::Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let (method, uri) = (parts.method.clone(), parts.uri.clone());
    wait_while_stalled(&ctx, &method, Target::parse(uri.path()).as_ref()).await;
    let failing = failing_code(&ctx, &method, Target::parse(uri.path()).as_ref());
    let response = if ctx.partitioned.load(Ordering::SeqCst) {
        status(
            503,
            "ServiceUnavailable",
            "the fake partitioned this endpoint",
        )
    } else if let Some(code) = failing {
        let reason = if code == 429 {
            "TooManyRequests"
        } else {
            "InternalError"
        };
        status(code, reason, "the fake fails writes to this resource")
    } else {
        match Target::parse(uri.path()) {
            Some(Target {
                ref resource,
                namespace: Some(ref namespace),
                name: Some(ref name),
                sub: Some(ref sub),
                ..
            }) if resource == "pods" && sub == "portforward" && method == Method::GET => {
                super::portforward::serve(
                    &ctx.api,
                    namespace,
                    name,
                    uri.query().unwrap_or(""),
                    &parts.headers,
                    parts.extensions.remove::<hyper::upgrade::OnUpgrade>(),
                )
            }
            Some(target) => match axum::body::to_bytes(body, BODY_LIMIT).await {
                Ok(body) => route(
                    &ctx,
                    &method,
                    &target,
                    uri.query().unwrap_or(""),
                    &parts.headers,
                    &body,
                ),
                Err(e) => status(413, "RequestEntityTooLarge", &e.to_string()),
            },
            None => status(
                404,
                "NotFound",
                &format!("the fake does not serve {}", uri.path()),
            ),
        }
    };
    ctx.api.lock().served.push(Served {
        method: method.to_string(),
        path: uri.path().to_string(),
        status: response.status().as_u16(),
    });
    if let Some(delay) = answer_delay(&ctx, &method, Target::parse(uri.path()).as_ref()) {
        tokio::time::sleep(delay).await;
    }
    response
}

fn route(
    ctx: &Ctx,
    method: &Method,
    t: &Target,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let query = parse_query(query);
    let param = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.clone());
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return status(400, "BadRequest", &format!("body is not JSON: {e}")),
        }
    };
    let labels = param("labelSelector").unwrap_or_default();
    let fields = param("fieldSelector").unwrap_or_default();
    match (method, t.name.as_deref(), t.sub.as_deref()) {
        (&Method::GET, None, _) if matches!(param("watch").as_deref(), Some("true" | "1")) => {
            let timeout = param("timeoutSeconds")
                .and_then(|s| s.parse().ok())
                .unwrap_or(290);
            watch(ctx, t, param("resourceVersion"), labels, fields, timeout)
        }
        (&Method::GET, None, _) => list(ctx, t, &labels, &fields),
        (&Method::GET, Some(name), _) => {
            let store = ctx.api.lock();
            match store.objects.get(&t.key(name)) {
                Some(obj) if t.resource == "poddisruptionbudgets" => {
                    json_response(200, &with_budget_status(&store.objects, obj))
                }
                Some(obj) => json_response(200, obj),
                None => not_found(t, name),
            }
        }
        (&Method::POST, None, _) if t.resource == "tokenreviews" => token_review(ctx, body),
        (&Method::POST, None, _) => create(ctx, t, body),
        (&Method::POST, Some(name), Some("eviction")) => evict(ctx, t, name, &body),
        (&Method::POST, Some(name), Some("token")) if t.resource == "serviceaccounts" => {
            token_request(ctx, t, name, &body)
        }
        (&Method::PUT, Some(name), _) => replace(ctx, t, name, body),
        (&Method::PATCH, Some(name), _) => {
            let ct = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if ct.contains("json-patch") || ct.contains("apply-patch") {
                return status(
                    415,
                    "UnsupportedMediaType",
                    &format!("the fake supports merge patches only, not {ct}"),
                );
            }
            patch(ctx, t, name, &body)
        }
        (&Method::DELETE, Some(name), _) => {
            let grace = body["gracePeriodSeconds"]
                .as_u64()
                .or_else(|| param("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            delete(ctx, t.key(name), grace)
        }
        _ => status(405, "MethodNotAllowed", "the fake does not serve this"),
    }
}

fn not_found(t: &Target, name: &str) -> Response {
    status(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", t.resource),
    )
}

fn selected(t: &Target, key: &Key, obj: &Value, labels: &str, fields: &str) -> bool {
    key.0 == t.collection()
        && t.namespace.as_ref().is_none_or(|ns| &key.1 == ns)
        && labels_match(labels, &obj["metadata"]["labels"])
        && fields_match(fields, obj)
}

/// A budget as the API serves it: with the status the disruption
/// controller would keep, computed from the pods it selects now.
fn with_budget_status(objects: &BTreeMap<Key, Value>, pdb: &Value) -> Value {
    let namespace = pdb["metadata"]["namespace"].as_str().unwrap_or_default();
    let pods: Vec<&Value> = objects
        .iter()
        .filter(|((c, ns, _), p)| {
            c == "v1/pods"
                && ns == namespace
                && label_selector_matches(&pdb["spec"]["selector"], &p["metadata"]["labels"])
        })
        .map(|(_, p)| p)
        .collect();
    let mut out = pdb.clone();
    out["status"] = pdb_status(pdb, &pods);
    out
}

fn list(ctx: &Ctx, t: &Target, labels: &str, fields: &str) -> Response {
    let store = ctx.api.lock();
    let items: Vec<Value> = store
        .objects
        .iter()
        .filter(|(k, v)| selected(t, k, v, labels, fields))
        .map(|(_, v)| {
            if t.resource == "poddisruptionbudgets" {
                with_budget_status(&store.objects, v)
            } else {
                v.clone()
            }
        })
        .collect();
    let body = json!({
        "apiVersion": t.api_version,
        "kind": format!("{}List", kind_of(&t.resource)),
        "metadata": {"resourceVersion": store.rv.to_string()},
        "items": items,
    });
    json_response(200, &body)
}

fn create(ctx: &Ctx, t: &Target, mut body: Value) -> Response {
    let mut store = ctx.api.lock();
    let name = match body["metadata"]["name"].as_str() {
        Some(n) => n.to_string(),
        None => match body["metadata"]["generateName"].as_str() {
            Some(prefix) => format!("{prefix}{:05}", store.rv + 1),
            None => return status(422, "Invalid", "metadata.name: Required value"),
        },
    };
    let key = t.key(&name);
    if store.objects.contains_key(&key) {
        return status(
            409,
            "AlreadyExists",
            &format!("{} \"{name}\" already exists", t.resource),
        );
    }
    body["apiVersion"] = json!(t.api_version);
    body["kind"] = json!(kind_of(&t.resource));
    body["metadata"]["resourceVersion"] = Value::Null;
    if let Some(message) = invalid(&body) {
        return status(422, "Invalid", &message);
    }
    let stored = store.write(key, body, "ADDED");
    drop(store);
    ctx.api.wake();
    json_response(201, &stored)
}

/// True when `requested` carries a resourceVersion other than `current`'s.
fn stale(current: &Value, requested: &Value) -> bool {
    requested["metadata"]["resourceVersion"]
        .as_str()
        .is_some_and(|rv| Some(rv) != current["metadata"]["resourceVersion"].as_str())
}

fn conflict(t: &Target, name: &str) -> Response {
    status(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            t.resource
        ),
    )
}

fn replace(ctx: &Ctx, t: &Target, name: &str, mut body: Value) -> Response {
    let mut store = ctx.api.lock();
    let key = t.key(name);
    let Some(current) = store.objects.get(&key) else {
        return not_found(t, name);
    };
    if stale(current, &body) {
        return conflict(t, name);
    }
    // Identity fields are the server's, whatever the client sent.
    body["metadata"]["uid"] = current["metadata"]["uid"].clone();
    body["metadata"]["creationTimestamp"] = current["metadata"]["creationTimestamp"].clone();
    body["apiVersion"] = json!(t.api_version);
    body["kind"] = json!(kind_of(&t.resource));
    if let Some(message) = invalid(&body) {
        return status(422, "Invalid", &message);
    }
    let stored = store.write(key, body, "MODIFIED");
    drop(store);
    ctx.api.wake();
    json_response(200, &stored)
}

fn patch(ctx: &Ctx, t: &Target, name: &str, body: &Value) -> Response {
    let mut store = ctx.api.lock();
    let key = t.key(name);
    let Some(current) = store.objects.get(&key) else {
        return not_found(t, name);
    };
    if stale(current, body) {
        return conflict(t, name);
    }
    let mut object = current.clone();
    merge_patch(&mut object, body);
    if let Some(message) = invalid(&object) {
        return status(422, "Invalid", &message);
    }
    let stored = store.write(key, object, "MODIFIED");
    drop(store);
    ctx.api.wake();
    json_response(200, &stored)
}

/// Deletes now, or (pods with a grace period) marks the pod terminating and
/// removes it once the period has passed, as the kubelet would.
fn delete(ctx: &Ctx, key: Key, grace: Option<u64>) -> Response {
    let mut store = ctx.api.lock();
    let Some(current) = store.objects.get(&key).cloned() else {
        return status(404, "NotFound", &format!("\"{}\" not found", key.2));
    };
    let is_pod = key.0 == "v1/pods";
    let grace = grace
        .or_else(|| current["spec"]["terminationGracePeriodSeconds"].as_u64())
        .unwrap_or(if is_pod { 30 } else { 0 });
    if !is_pod || grace == 0 {
        let removed = store.delete(&key);
        drop(store);
        ctx.api.wake();
        return json_response(200, &removed.unwrap_or(Value::Null));
    }
    if !current["metadata"]["deletionTimestamp"].is_null() {
        return json_response(200, &current);
    }
    let mut terminating = current.clone();
    terminating["metadata"]["deletionTimestamp"] = json!(now_rfc3339());
    terminating["metadata"]["deletionGracePeriodSeconds"] = json!(grace);
    let stored = store.write(key.clone(), terminating, "MODIFIED");
    drop(store);
    ctx.api.wake();
    let api = ctx.api.clone();
    let uid = current["metadata"]["uid"].clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(grace)).await;
        let mut store = api.lock();
        if store
            .objects
            .get(&key)
            .is_some_and(|p| p["metadata"]["uid"] == uid)
        {
            store.delete(&key);
        }
        drop(store);
        api.wake();
    });
    json_response(200, &stored)
}

/// policy/v1 Eviction: 429 while a disruption budget forbids it, else a
/// graceful delete.
fn evict(ctx: &Ctx, t: &Target, name: &str, body: &Value) -> Response {
    let key = t.key(name);
    let store = ctx.api.lock();
    let Some(pod) = store.objects.get(&key).cloned() else {
        return not_found(t, name);
    };
    if !pod["metadata"]["deletionTimestamp"].is_null() {
        return json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        );
    }
    let labels = &pod["metadata"]["labels"];
    let budgets: Vec<&Value> = store
        .objects
        .iter()
        .filter(|((c, ns, _), pdb)| {
            c == "policy/v1/poddisruptionbudgets"
                && *ns == key.1
                && label_selector_matches(&pdb["spec"]["selector"], labels)
        })
        .map(|(_, v)| v)
        .collect();
    if budgets.len() > 1 {
        return status(
            500,
            "InternalError",
            "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
        );
    }
    if let Some(pdb) = budgets.first() {
        let pods: Vec<&Value> = store
            .objects
            .iter()
            .filter(|((c, ns, _), p)| {
                c == "v1/pods"
                    && *ns == key.1
                    && label_selector_matches(&pdb["spec"]["selector"], &p["metadata"]["labels"])
            })
            .map(|(_, v)| v)
            .collect();
        if disruptions_allowed(pdb, &pods) <= 0 {
            let body = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "Cannot evict pod as it would violate the pod's disruption budget.",
                "reason": "TooManyRequests", "code": 429,
                "details": {"causes": [{"reason": "DisruptionBudget",
                    "message": format!("The disruption budget {} does not allow a disruption now", pdb["metadata"]["name"].as_str().unwrap_or_default())}]},
            });
            return json_response(429, &body);
        }
    }
    drop(store);
    let grace = body["deleteOptions"]["gracePeriodSeconds"].as_u64();
    let response = delete(ctx, key, grace);
    if response.status().is_success() {
        json_response(
            201,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
        )
    } else {
        response
    }
}

/// `spec.audiences` of a TokenReview or TokenRequest.
fn audiences(body: &Value) -> Vec<String> {
    body["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn token_review(ctx: &Ctx, body: Value) -> Response {
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let wanted = audiences(&body);
    let known = ctx.api.lock().tokens.get(token).cloned();
    let status = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(t) => {
            let audiences: Vec<&String> = if wanted.is_empty() {
                t.audiences.iter().collect()
            } else {
                wanted.iter().filter(|a| t.audiences.contains(a)).collect()
            };
            if audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                json!({
                    "authenticated": true,
                    "user": {"username": t.username, "uid": format!("uid-{}", t.username), "groups": t.groups, "extra": t.extra},
                    "audiences": audiences,
                })
            }
        }
    };
    let review = json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "metadata": {"creationTimestamp": null}, "spec": body["spec"], "status": status,
    });
    json_response(201, &review)
}

/// TokenRequest: a token of an existing ServiceAccount that this fake's
/// TokenReview then accepts, for the audiences asked (the API server's
/// default audience when none), living at least the API's 10 minutes.
fn token_request(ctx: &Ctx, t: &Target, name: &str, body: &Value) -> Response {
    let namespace = t.namespace.clone().unwrap_or_default();
    let key = (
        "v1/serviceaccounts".to_string(),
        namespace.clone(),
        name.to_string(),
    );
    let mut store = ctx.api.lock();
    if !store.objects.contains_key(&key) {
        return not_found(t, name);
    }
    let seconds = body["spec"]["expirationSeconds"].as_u64().unwrap_or(3600);
    if seconds < 600 {
        return status(
            422,
            "Invalid",
            "spec.expirationSeconds: Invalid value: may not specify a duration less than 10 minutes",
        );
    }
    let mut audiences = audiences(body);
    if audiences.is_empty() {
        audiences.push("https://kubernetes.default.svc.cluster.local".to_string());
    }
    store.rv += 1;
    let token = format!("fake-sa-token-{namespace}-{name}-{}", store.rv);
    store.tokens.insert(
        token.clone(),
        super::FakeToken {
            username: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".to_string(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_string(),
            ],
            audiences: audiences.clone(),
            extra: Default::default(),
        },
    );
    let expires = super::semantics::rfc3339(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            + seconds,
    );
    json_response(
        201,
        &json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
            "spec": {"audiences": audiences, "expirationSeconds": seconds},
            "status": {"token": token, "expirationTimestamp": expires},
        }),
    )
}

/// What a watch filters on and how far it has read.
struct WatchState {
    ctx: Ctx,
    collection: String,
    namespace: Option<String>,
    labels: String,
    fields: String,
    cursor: usize,
    pending: VecDeque<Value>,
    changed: tokio::sync::watch::Receiver<u64>,
    deadline: tokio::time::Instant,
}

fn watch(
    ctx: &Ctx,
    t: &Target,
    rv: Option<String>,
    labels: String,
    fields: String,
    timeout: u64,
) -> Response {
    let store = ctx.api.lock();
    let mut pending = VecDeque::new();
    let cursor = match rv
        .as_deref()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|v| *v > 0)
    {
        Some(rv) => store.log.partition_point(|c| c.rv <= rv),
        None => {
            for (k, v) in store
                .objects
                .iter()
                .filter(|(k, v)| selected(t, k, v, &labels, &fields))
            {
                let _ = k;
                pending.push_back(json!({"type": "ADDED", "object": v}));
            }
            store.log.len()
        }
    };
    drop(store);
    let state = WatchState {
        ctx: ctx.clone(),
        collection: t.collection(),
        namespace: t.namespace.clone(),
        labels,
        fields,
        cursor,
        pending,
        changed: ctx.api.changed.subscribe(),
        deadline: tokio::time::Instant::now() + Duration::from_secs(timeout),
    };
    let stream = futures::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(event) = s.pending.pop_front() {
                let line = format!("{event}\n");
                return Some((Ok::<_, std::io::Error>(Bytes::from(line)), s));
            }
            if s.ctx.partitioned.load(Ordering::SeqCst) || tokio::time::Instant::now() >= s.deadline
            {
                return None;
            }
            {
                let store = s.ctx.api.lock();
                for change in &store.log[s.cursor..] {
                    let (c, ns, _) = &change.key;
                    if *c == s.collection
                        && s.namespace.as_ref().is_none_or(|n| n == ns)
                        && labels_match(&s.labels, &change.object["metadata"]["labels"])
                        && fields_match(&s.fields, &change.object)
                    {
                        s.pending
                            .push_back(json!({"type": change.kind, "object": change.object}));
                    }
                }
                s.cursor = store.log.len();
            }
            if s.pending.is_empty() {
                // Re-check at least every 100 ms so a partition ends the stream.
                tokio::select! {
                    _ = s.changed.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(500, "InternalError", "building the watch response"))
}
