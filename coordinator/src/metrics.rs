//! Prometheus metrics (names prefixed `baton_`) and the HTTP endpoints
//! `/metrics`, `/healthz` (the process is alive) and `/readyz` (this replica
//! leads and grants: the Service routes agents only to it).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::Engine;

/// The coordinator's metrics. Clones share the same series.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Nodes holding the baton.
    pub holders: Gauge,
    /// Nodes waiting.
    pub queue_length: Gauge,
    /// Holders that are overdue now.
    pub overdue: Gauge,
    /// 1 while granting is paused.
    pub paused: Gauge,
    /// 1 while this replica leads.
    pub is_leader: Gauge,
    /// The last fencing token granted.
    pub last_token: Gauge,
    /// Grants given.
    pub grants: Counter,
    /// Releases (including forced ones).
    pub releases: Counter,
    /// Holders that became overdue.
    pub overdue_events: Counter,
    /// Failed state saves.
    pub store_errors: Counter,
    /// Seconds from a release that left waiters to the next grant.
    pub handoff_latency: Histogram,
    /// Handoffs measured (the histogram's count).
    pub handoffs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every series.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("baton");
        let holders = Gauge::default();
        let queue_length = Gauge::default();
        let overdue = Gauge::default();
        let paused = Gauge::default();
        let is_leader = Gauge::default();
        let last_token = Gauge::default();
        let grants = Counter::default();
        let releases = Counter::default();
        let overdue_events = Counter::default();
        let store_errors = Counter::default();
        let handoffs = Counter::default();
        // 100 µs to ~26 s.
        let handoff_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 19),
        );
        registry.register("holders", "Nodes holding the baton", holders.clone());
        registry.register(
            "queue_length",
            "Nodes waiting for the baton",
            queue_length.clone(),
        );
        registry.register(
            "overdue_holders",
            "Holders that have not renewed in time (they keep the baton)",
            overdue.clone(),
        );
        registry.register("paused", "1 while granting is paused", paused.clone());
        registry.register(
            "is_leader",
            "1 while this coordinator leads",
            is_leader.clone(),
        );
        registry.register(
            "last_fencing_token",
            "The last fencing token granted",
            last_token.clone(),
        );
        registry.register("grants", "Grants given", grants.clone());
        registry.register(
            "releases",
            "Releases, including forced ones",
            releases.clone(),
        );
        registry.register(
            "overdue",
            "Holders that became overdue",
            overdue_events.clone(),
        );
        registry.register(
            "store_errors",
            "State saves that failed",
            store_errors.clone(),
        );
        registry.register(
            "handoff_latency_seconds",
            "Time from a release that left waiters to the next grant",
            handoff_latency.clone(),
        );
        registry.register(
            "handoffs",
            "Handoffs from a release to the next waiter",
            handoffs.clone(),
        );
        Self {
            registry: Arc::new(registry),
            handoffs,
            holders,
            queue_length,
            overdue,
            paused,
            is_leader,
            last_token,
            grants,
            releases,
            overdue_events,
            store_errors,
            handoff_latency,
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The router for `/metrics`, `/healthz` and `/readyz`.
pub fn router(engine: Arc<Engine>, metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State((_, metrics)): State<(Arc<Engine>, Metrics)>| async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        metrics.encode(),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state((engine, metrics))
}

async fn readyz(State((engine, _)): State<(Arc<Engine>, Metrics)>) -> impl IntoResponse {
    if engine.is_shutting_down().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n".to_string(),
        );
    }
    let leadership = engine.leadership();
    if leadership.is_leader && engine.is_current().await {
        (StatusCode::OK, "ready: leading\n".to_string())
    } else if leadership.is_leader {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: leading, the state is not loaded yet\n".to_string(),
        )
    } else {
        let leader = leadership.leader.unwrap_or_else(|| "unknown".into());
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: following (leader: {leader})\n"),
        )
    }
}

/// Serves the router on `addr` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
