//! Builds the etcd guard and the etcd store from `serve`'s arguments.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Identity, TlsOptions};

use super::backup::BackupSettings;
use super::guard::{EtcdGuard, GuardSettings};
use super::mapping::{MemberMap, MemberMapError};
use super::probe::{ProbeSettings, Prober};
use super::rule::QuorumSettings;
use super::snapshot::SnapshotSettings;
use crate::config::{EtcdArgs, ServeArgs};
use crate::engine::Clock;
use crate::node::{NodeName, NodeNameError};
use crate::store::StoreError;
use crate::store::etcd::{EtcdStore, EtcdStoreSettings};

/// Why the etcd settings were refused.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    /// A member map entry is malformed.
    #[error(transparent)]
    MemberMap(#[from] MemberMapError),
    /// An exempt node name is invalid.
    #[error("--etcd-exempt-node: {0}")]
    ExemptNode(#[from] NodeNameError),
    /// A TLS file could not be read.
    #[error("reading {path} (--etcd-cacert, --etcd-cert or --etcd-key): {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// `--store etcd` without endpoints.
    #[error("--store etcd needs --etcd-endpoints")]
    NoEndpoints,
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, EtcdConfigError> {
    std::fs::read(path).map_err(|source| EtcdConfigError::TlsFile {
        path: path.display().to_string(),
        source,
    })
}

/// TLS settings for etcd clients, when any TLS flag is given.
pub fn tls(args: &EtcdArgs) -> Result<Option<TlsOptions>, EtcdConfigError> {
    if args.etcd_cacert.is_none() && args.etcd_cert.is_none() {
        return Ok(None);
    }
    let mut tls = TlsOptions::new();
    if let Some(ca) = &args.etcd_cacert {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&args.etcd_cert, &args.etcd_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(tls))
}

/// The etcd guard, when `--etcd-endpoints` is given.
pub fn guard(args: &ServeArgs, clock: Clock) -> Result<Option<Arc<EtcdGuard>>, EtcdConfigError> {
    let e = &args.etcd;
    if e.etcd_endpoints.is_empty() {
        return Ok(None);
    }
    let exempt = e
        .etcd_exempt_node
        .iter()
        .filter(|n| !n.trim().is_empty())
        .map(|n| NodeName::new(n.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    let settings = GuardSettings {
        map: MemberMap::new(&e.etcd_member_map, &exempt)?,
        quorum: QuorumSettings {
            allow_degraded: e.etcd_allow_degraded,
            allow_outage: e.etcd_allow_outage,
            max_age: chrono::Duration::from_std(e.etcd_max_health_age)
                .unwrap_or(chrono::Duration::seconds(5)),
        },
        probe_interval: e.etcd_probe_interval,
        snapshots: SnapshotSettings {
            dir: snapshot_dir(args),
            keep: e.etcd_snapshot_keep as usize,
            stall_timeout: Duration::from_secs(30),
        },
        back_after: e.etcd_back_after,
    };
    let prober = Prober::new(ProbeSettings {
        endpoints: e.etcd_endpoints.clone(),
        tls: tls(e)?,
        timeout: e.etcd_timeout,
        max_apply_lag: e.etcd_max_apply_lag,
        read_key: format!("{}/health-probe", e.etcd_prefix),
    });
    Ok(Some(EtcdGuard::new(settings, prober, clock)))
}

/// Where snapshots (and the backups kept with them) go.
fn snapshot_dir(args: &ServeArgs) -> std::path::PathBuf {
    args.etcd
        .etcd_snapshot_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("etcd-snapshots"))
}

/// Where control-plane backups are kept: beside the snapshots, when the
/// etcd guard takes them (`--etcd-endpoints`).
pub fn backups(args: &ServeArgs) -> Option<BackupSettings> {
    (!args.etcd.etcd_endpoints.is_empty())
        .then(|| BackupSettings::new(snapshot_dir(args), args.etcd.backup_max_bytes))
}

/// The etcd store for `--store etcd`.
pub async fn store(args: &ServeArgs, id: &str) -> Result<EtcdStore, EtcdStoreOpenError> {
    let e = &args.etcd;
    if e.etcd_endpoints.is_empty() {
        return Err(EtcdConfigError::NoEndpoints.into());
    }
    Ok(EtcdStore::open(EtcdStoreSettings {
        endpoints: e.etcd_endpoints.clone(),
        tls: tls(e)?,
        prefix: e.etcd_prefix.trim_end_matches('/').to_string(),
        id: id.to_string(),
        election_ttl: e.etcd_election_ttl,
        timeout: e.etcd_timeout.max(Duration::from_secs(2)),
    })
    .await?)
}

/// Why the etcd store did not open.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStoreOpenError {
    /// The settings were refused.
    #[error(transparent)]
    Config(#[from] EtcdConfigError),
    /// Connecting failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
