//! The floors a handoff cannot beat, measured in the same run as the
//! handoffs they are compared with (absolute times on a shared machine mean
//! little; the ratio travels):
//! - a unary gRPC round trip to the coordinator (Status on an idle one);
//! - an atomic state write on the embedded store's disk (write, fsync,
//!   rename, fsync of the directory), the shape of one save;
//! - a guarded etcd transaction of a state-sized document, the shape of one
//!   save on the etcd store.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use baton_proto::v1::{self as pb, admin_client::AdminClient};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use hdrhistogram::Histogram;
use tonic::transport::Channel;

/// `samples` Status round trips, in µs.
pub async fn grpc_round_trips(channel: Channel, samples: usize) -> Result<Histogram<u64>> {
    let mut admin = AdminClient::new(channel);
    let mut rtt = Histogram::<u64>::new(3)?;
    for _ in 0..samples {
        let t = Instant::now();
        admin.status(pb::StatusRequest {}).await?;
        rtt.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(rtt)
}

/// One atomic write of `body` as a file in `dir`; returns its time in µs.
pub fn atomic_write(dir: &Path, body: &[u8]) -> Result<u64> {
    let t = Instant::now();
    let tmp = dir.join("f.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("f"))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(t.elapsed().as_micros() as u64)
}

/// `samples` atomic writes of a `size`-byte file in `dir`, in µs.
pub fn atomic_writes(dir: &Path, size: usize, samples: usize) -> Result<Histogram<u64>> {
    let mut writes = Histogram::<u64>::new(3)?;
    std::fs::create_dir_all(dir)?;
    let body = vec![b'x'; size];
    for _ in 0..samples {
        writes.record(atomic_write(dir, &body)?)?;
    }
    Ok(writes)
}

/// Raw etcd: `samples` sequential transactions that put a `size`-byte
/// document under a compare on a guard key (the shape of a coordinator
/// save). Returns their latencies in µs and the rate per second.
pub async fn etcd_txns(
    etcd: &mut etcd_client::Client,
    size: usize,
    samples: usize,
) -> Result<(Histogram<u64>, f64)> {
    let guard = etcd_guard(etcd).await?;
    let doc = vec![b'x'; size];
    let mut latencies = Histogram::<u64>::new(3)?;
    let started = Instant::now();
    for _ in 0..samples {
        latencies.record(etcd_txn(etcd, guard, &doc).await?)?;
    }
    let rate = samples as f64 / started.elapsed().as_secs_f64();
    Ok((latencies, rate))
}

/// Creates the guard key the raw transactions compare; returns its create
/// revision.
pub async fn etcd_guard(etcd: &mut etcd_client::Client) -> Result<i64> {
    etcd.put("/bench/guard", "x", None).await?;
    Ok(etcd.get("/bench/guard", None).await?.kvs()[0].create_revision())
}

/// One guarded put of `doc`; returns its time in µs.
pub async fn etcd_txn(etcd: &mut etcd_client::Client, guard: i64, doc: &[u8]) -> Result<u64> {
    let t = Instant::now();
    let txn = Txn::new()
        .when([Compare::create_revision(
            "/bench/guard",
            CompareOp::Equal,
            guard,
        )])
        .and_then([TxnOp::put("/bench/state", doc.to_vec(), None)]);
    if !etcd.txn(txn).await?.succeeded() {
        bail!("raw txn compare failed");
    }
    Ok(t.elapsed().as_micros() as u64)
}
