//! The etcd quorum guard: never take down an etcd member whose loss would
//! break quorum, and never hand the baton to an etcd node without a verified
//! snapshot of etcd first.
//!
//! Layout (pure first, I/O at the edge):
//! - [`health`]: the health snapshot, plain data the prober fills in;
//! - [`rule`]: the pure quorum rule over a health snapshot (property-tested);
//! - [`mapping`]: which etcd member (if any) a node carries (by explicit
//!   map, by name, or by InternalIP with the Kubernetes node watch);
//! - [`verify`]: the pure check of a snapshot file's SHA-256 trailer;
//! - [`probe`]: probes every member through its own client (I/O);
//! - [`snapshot`]: takes, verifies, stores and rotates snapshots (I/O);
//! - [`backup`]: keeps control-plane nodes' backups beside the snapshot of
//!   their grant, rotated with it (I/O);
//! - [`leader`]: moves etcd leadership away from a node before it goes down;
//! - [`back`]: when a node that went out counts as back (pure);
//! - [`guard`]: [`guard::EtcdGuard`], the [`crate::policy::GrantGuard`] and
//!   [`crate::engine::GrantPreparer`] the engine consults, and the "counts as
//!   back" tracking of nodes after their maintenance;
//! - [`wiring`]: builds the guard and the etcd store from the flags.

pub mod back;
pub mod backup;
pub mod guard;
pub mod health;
pub mod leader;
pub mod mapping;
pub mod probe;
pub mod rule;
pub mod snapshot;
pub mod verify;
pub mod wiring;

use std::time::Duration;

/// How the reason of a waiter starts when the etcd guard holds it back
/// because its agent makes no control-plane backups (an agent from before
/// backups, asking for a control-plane node that carries an etcd member).
pub const NO_BACKUP_SUPPORT: &str = "agent does not support control-plane backups";

/// True when a waiter's reason comes from the etcd guard: every reason the
/// guard gives (the quorum rule, the member mapping, a failed preparation)
/// starts with "etcd: ". `baton_etcd_blocked_waiters` counts them.
pub fn is_guard_reason(reason: &str) -> bool {
    reason.starts_with("etcd: ")
}

/// Builds a client for one etcd endpoint (one per member, so that every
/// probe asks exactly that member).
pub async fn connect(
    endpoint: &str,
    tls: Option<&etcd_client::TlsOptions>,
    timeout: Duration,
) -> Result<etcd_client::Client, String> {
    let mut options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(5), timeout);
    if let Some(tls) = tls {
        options = options.with_tls(tls.clone());
    }
    etcd_client::Client::connect([endpoint], Some(options))
        .await
        .map_err(|e| describe(&e))
}

/// The innermost cause of an etcd-client error, lowercase and without the
/// OS error number: "connection refused", "etcdserver: no leader".
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    // etcd-client's error does not expose its cause through `source()`:
    // unwrap its variants by hand, then follow the chain to the root.
    let inner: &(dyn std::error::Error + 'static) = match error.downcast_ref::<etcd_client::Error>()
    {
        Some(etcd_client::Error::GRpcStatus(status)) => status,
        Some(etcd_client::Error::TransportError(e)) => e,
        Some(etcd_client::Error::IoError(e)) => e,
        _ => error,
    };
    let mut root = inner;
    while let Some(next) = root.source() {
        root = next;
    }
    let text = match root.downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_string(),
        None => root.to_string(),
    };
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    let mut chars = text.trim().chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => "unknown error".to_string(),
    }
}

/// Runs `call` with a deadline; a timeout becomes "no answer within ...".
pub async fn within<T, E>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String>
where
    E: std::error::Error + 'static,
{
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(describe(&e)),
        Err(_) => Err(format!("no answer within {}ms", limit.as_millis())),
    }
}
