//! The lab's front: one address for the two coordinators, as a Kubernetes
//! Service or a load balancer with health checks gives a real cluster.
//!
//! It routes each new TCP connection (TLS passes through untouched) to a
//! replica whose `/readyz` answers 200 (only the leader is ready), round
//! robin if several claim to be, and closes the connections of a replica
//! that stops being ready, so clients reconnect to the new leader. Which
//! replicas are ready comes from [`Readiness`], polled by the lab.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Which replicas are ready, by index (updated by the lab's poller).
pub type Readiness = watch::Receiver<Vec<bool>>;

/// The replicas' gRPC addresses, by index (filled in as they start).
pub type Backends = Arc<Mutex<Vec<SocketAddr>>>;

/// Starts the front on a free port of 127.0.0.1; it runs until `cancel`.
pub async fn start(
    backends: Backends,
    ready: Readiness,
    cancel: CancellationToken,
) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        let next = AtomicUsize::new(0);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = cancel.cancelled() => return,
            };
            let Ok((client, _)) = accepted else { continue };
            let pick = next.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(route(
                client,
                backends.clone(),
                ready.clone(),
                pick,
                cancel.clone(),
            ));
        }
    });
    Ok(addr)
}

/// The index of a ready replica (the `pick`-th of those ready), waiting up
/// to two seconds for one; None when none is ready.
async fn choose(ready: &mut Readiness, pick: usize) -> Option<usize> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        let ready_now: Vec<usize> = ready
            .borrow_and_update()
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.then_some(i))
            .collect();
        if !ready_now.is_empty() {
            return Some(ready_now[pick % ready_now.len()]);
        }
        if tokio::time::timeout_at(deadline, ready.changed())
            .await
            .map_or(true, |r| r.is_err())
        {
            return None;
        }
    }
}

async fn route(
    mut client: TcpStream,
    backends: Backends,
    mut ready: Readiness,
    pick: usize,
    cancel: CancellationToken,
) {
    let Some(index) = choose(&mut ready, pick).await else {
        return;
    };
    let Some(backend) = backends
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(index)
        .copied()
    else {
        return;
    };
    let Ok(Ok(mut server)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(backend)).await
    else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let still_ready = async {
        loop {
            if ready.changed().await.is_err() {
                return;
            }
            if !ready.borrow().get(index).copied().unwrap_or(false) {
                return;
            }
        }
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = still_ready => {}
        _ = cancel.cancelled() => {}
    }
    let _ = client.shutdown().await;
    let _ = server.shutdown().await;
}

/// One `/readyz` probe of a replica's metrics address: true for a 200
/// within `limit` (a frozen replica does not answer, so it is not ready).
pub async fn probe_ready(metrics: &str, limit: Duration) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(metrics).await.ok()?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: lab\r\n\r\n")
            .await
            .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        Some(head.ends_with(b" 200"))
    };
    matches!(tokio::time::timeout(limit, probe).await, Ok(Some(true)))
}
