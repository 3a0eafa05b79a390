//! The observer: follows the coordinators' Watch stream (through the front,
//! with the admin certificate) and records each node's queue reasons,
//! phases, grants and releases. This is Baton's own account, used for the
//! progress display and the phase figures; the monitors check Baton
//! against the host's and etcd's records instead.

use std::time::Duration;

use anyhow::{Context, Result};
use baton_proto::v1::{self as pb, admin_client::AdminClient};
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::certs::Pair;
use super::seen::{Shared, Time};

/// A channel to the front with the admin identity; calls time out after
/// `timeout` (None for the Watch stream, which lasts).
pub fn admin_channel(
    url: &str,
    ca: &std::path::Path,
    admin: &Pair,
    timeout: Option<Duration>,
) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca)?))
        .identity(Identity::from_pem(
            std::fs::read(&admin.cert)?,
            std::fs::read(&admin.key)?,
        ));
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .context("front URL")?
        .connect_timeout(Duration::from_secs(2))
        .tls_config(tls)?;
    if let Some(timeout) = timeout {
        endpoint = endpoint.timeout(timeout);
    }
    Ok(endpoint.connect_lazy())
}

/// The status now, from whichever replica leads (retried for a while: a
/// failover takes seconds).
pub async fn status(channel: &Channel) -> Result<pb::StatusResponse> {
    let mut last = None;
    for _ in 0..60 {
        match AdminClient::new(channel.clone())
            .status(pb::StatusRequest {})
            .await
        {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("no status")))
    .context("no coordinator answered Status")
}

fn time(t: Option<&prost_types::Timestamp>) -> Option<Time> {
    t.and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
}

/// The name the status JSON uses for a phase (batonctl's names).
pub fn phase_name(value: i32) -> &'static str {
    match pb::Phase::try_from(value).unwrap_or(pb::Phase::Unspecified) {
        pb::Phase::Unspecified => "granted",
        pb::Phase::Granted => "granted",
        pb::Phase::Draining => "preparing",
        pb::Phase::EtcdPrepare => "preparing",
        pb::Phase::Updating => "updating",
        pb::Phase::Rebooting => "rebooting",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Uncordoning => "finishing",
        pb::Phase::Failed => "failed",
        pb::Phase::Manual => "manual",
    }
}

/// Folds one status into the record.
pub fn record(shared: &Shared, status: &pb::StatusResponse) {
    let mut seen = shared.lock();
    let started = seen.started;
    let mut lines = Vec::new();
    for audit in &status.audit {
        let Some(at) = time(audit.time.as_ref()) else {
            continue;
        };
        let Some(node) = seen.nodes.get_mut(&audit.node) else {
            continue;
        };
        match audit.action.as_str() {
            "grant" if !node.grants.iter().any(|(_, t)| *t == audit.fencing_token) => {
                node.grants.push((at, audit.fencing_token));
                lines.push(format!(
                    "{} granted (token {})",
                    audit.node, audit.fencing_token
                ));
            }
            "release" | "force-release"
                if !node
                    .releases
                    .iter()
                    .any(|(_, t, ..)| *t == audit.fencing_token) =>
            {
                node.releases.push((
                    at,
                    audit.fencing_token,
                    format!("{} by {}", audit.action, audit.actor),
                    audit.reason.clone(),
                ));
                lines.push(format!(
                    "{} released (token {}): {}",
                    audit.node, audit.fencing_token, audit.reason
                ));
            }
            _ => {}
        }
    }
    let names: Vec<String> = seen.nodes.keys().cloned().collect();
    for name in names {
        let holder = status.holders.iter().find(|h| h.node == name);
        let queued = status.queue.iter().find(|q| q.node == name);
        let finished = {
            let n = &seen.nodes[&name];
            started.is_some_and(|s| {
                n.releases
                    .iter()
                    .any(|(t, _, _, reason)| *t >= s && !super::seen::aborted(reason))
            })
        };
        let node = seen.nodes.get_mut(&name).expect("listed above");
        match (holder, queued) {
            (Some(h), _) => {
                let phase = phase_name(h.phase).to_string();
                let since = time(h.phase_since.as_ref()).unwrap_or_else(Utc::now);
                let changed = node
                    .phases
                    .last()
                    .is_none_or(|(_, p, t)| *p != phase || *t != h.fencing_token);
                if changed {
                    node.phases.push((since, phase.clone(), h.fencing_token));
                    let note = h.message.lines().next().unwrap_or_default();
                    lines.push(format!("{name}: {phase} {note}"));
                }
                node.phase = phase;
                node.token = h.fencing_token;
                node.reason = if h.error.is_empty() {
                    String::new()
                } else {
                    h.error.clone()
                };
            }
            (None, Some(q)) => {
                node.phase = "waiting".into();
                node.token = 0;
                if started.is_some() && node.asked.is_none() {
                    node.asked = time(q.waiting_since.as_ref()).or_else(|| Some(Utc::now()));
                }
                if node.reason != q.reason {
                    node.reason = q.reason.clone();
                    if !q.reason.is_empty()
                        && node.reasons.last().is_none_or(|(_, r)| *r != q.reason)
                    {
                        node.reasons.push((Utc::now(), q.reason.clone()));
                        lines.push(format!("{name} waits: {}", q.reason));
                    }
                }
            }
            (None, None) => {
                node.phase = if finished { "done" } else { "idle" }.into();
                node.token = 0;
                node.reason.clear();
            }
        }
    }
    for line in lines {
        seen.note(line);
    }
}

/// Follows the Watch stream until `cancel`, reconnecting after failovers.
pub async fn follow(channel: Channel, shared: Shared, cancel: CancellationToken) {
    while !cancel.is_cancelled() {
        let mut client = AdminClient::new(channel.clone());
        let stream = tokio::select! {
            s = client.watch(pb::WatchRequest {}) => s,
            _ = cancel.cancelled() => return,
        };
        if let Ok(stream) = stream {
            let mut stream = stream.into_inner();
            loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    _ = cancel.cancelled() => return,
                };
                match message {
                    Ok(Some(status)) => record(&shared, &status),
                    _ => break,
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
