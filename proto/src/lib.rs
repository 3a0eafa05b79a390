//! The `baton.v1` API: generated from `proto/baton/v1/*.proto`.
//!
//! - [`v1::coordinator_client`] / [`v1::coordinator_server`]: the lease service
//!   agents use (Acquire, Renew, Report, Release);
//! - [`v1::admin_client`] / [`v1::admin_server`]: the operators' service
//!   (Status, Watch, Pause, Resume, ForceRelease);
//! - the messages they share ([`v1::Holder`], [`v1::QueueEntry`], ...).
//!
//! The `.proto` files are the documentation of every field.

/// Version 1 of the API (`package baton.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("baton.v1");
}

pub use prost_types::{Duration as ProtoDuration, Timestamp};
