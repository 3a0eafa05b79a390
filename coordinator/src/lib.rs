//! baton-coordinator: grants the baton, the cluster-wide maintenance lease.
//!
//! Layout (pure decision logic first, I/O at the edges):
//! - [`node`], [`window`], [`state`], [`policy`]: pure data and the grant
//!   rule, with the clock passed in;
//! - [`store`]: where the lease state lives ([`store::StateStore`]; the
//!   embedded file store);
//! - [`engine`]: the one writer that applies calls to the state, persists
//!   them, runs the grant rule and streams progress to waiters;
//! - [`service`], [`auth`], [`status_map`], [`text`]: the gRPC services, who
//!   may call them, how errors map to gRPC codes, and the bounds on text
//!   clients send;
//! - [`etcd`]: the etcd quorum guard, verified snapshots and leadership moves;
//! - [`metrics`]: Prometheus metrics and the health endpoints;
//! - [`server`], [`config`]: `baton-coordinator serve`;
//! - [`rollout`]: the rollout policy file (health gate, alert blockers,
//!   webhooks, stuck locks) and its reloading;
//! - [`kube`]: in a Kubernetes cluster: the Lease election and the
//!   ConfigMap store, the node watch, TokenReview authentication;
//! - [`ctl`]: the `batonctl` command line.

pub mod auth;
pub mod config;
pub mod ctl;
pub mod engine;
pub mod etcd;
pub mod kube;
pub mod metrics;
pub mod node;
pub mod policy;
pub mod rollout;
pub mod server;
pub mod service;
pub mod state;
pub mod status_map;
pub mod store;
pub mod text;
pub mod upload;
pub mod window;

/// The version `--version` shows: the package version and the git revision
/// the binary was built from (see build-support/build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BATON_GIT_REVISION"),
    ")"
);
