//! Test support: start a coordinator on 127.0.0.1:0, clients, a tiny PKI.

#![allow(dead_code)]

pub mod pki;

use std::path::Path;
use std::time::Duration;

use baton_coordinator::config::{Cli, Command, ServeArgs};
use baton_coordinator::server::{Running, start};
use baton_proto::v1::{
    self as pb, admin_client::AdminClient, coordinator_client::CoordinatorClient,
};
use clap::Parser;
use tokio::sync::oneshot;
use tonic::transport::Channel;

/// Serve arguments parsed from a command line, as the binary would. A data
/// directory without state is a new installation: `--initialize` is added,
/// as an operator would for the first start (not for later ones).
pub fn serve_args(data_dir: &Path, extra: &[&str]) -> ServeArgs {
    let mut argv = vec![
        "baton-coordinator".to_string(),
        "serve".into(),
        "--listen=127.0.0.1:0".into(),
        "--metrics-listen=127.0.0.1:0".into(),
        format!("--data-dir={}", data_dir.display()),
        "--id=test-coordinator".into(),
    ];
    if !data_dir.join("state.json").exists() {
        argv.push("--initialize".into());
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    match Cli::try_parse_from(argv) {
        Ok(Cli {
            command: Command::Serve(args),
        }) => *args,
        Err(e) => panic!("{e}"),
    }
}

/// Serve arguments for a plaintext, unauthenticated coordinator on loopback.
pub fn insecure_args(data_dir: &Path) -> ServeArgs {
    serve_args(data_dir, &["--insecure"])
}

/// A running coordinator and the means to stop it.
pub struct TestServer {
    pub running: Running,
    stop: Option<oneshot::Sender<()>>,
}

impl TestServer {
    pub async fn start(args: ServeArgs) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let running = start(args, async {
            let _ = stopped.await;
        })
        .await
        .expect("coordinator starts");
        Self {
            running,
            stop: Some(stop),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.running.grpc_addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn clients(&self) -> (CoordinatorClient<Channel>, AdminClient<Channel>) {
        let channel = self.channel().await;
        (
            CoordinatorClient::new(channel.clone()),
            AdminClient::new(channel),
        )
    }

    /// SIGTERM-equivalent: graceful stop, waits until both servers are down.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.running.done)
            .await
            .expect("server stops in time")
            .unwrap()
            .unwrap();
    }
}

/// Sends Acquire and returns the event stream.
pub async fn acquire(
    client: &mut CoordinatorClient<Channel>,
    node: &str,
    control_plane: bool,
) -> Result<tonic::Streaming<pb::AcquireEvent>, tonic::Status> {
    client
        .acquire(pb::AcquireRequest {
            node: node.into(),
            control_plane,
            reason: "test".into(),
            manual: false,
            labels: Default::default(),
            backs_up_control_plane: true,
        })
        .await
        .map(|r| r.into_inner())
}

/// Reads events until the grant; returns it with the Queued events seen.
pub async fn until_granted(
    stream: &mut tonic::Streaming<pb::AcquireEvent>,
) -> (pb::Granted, Vec<pb::Queued>) {
    let mut queued = Vec::new();
    let wait = async {
        while let Some(event) = stream.message().await.expect("stream ok") {
            match event.event.expect("event set") {
                pb::acquire_event::Event::Queued(q) => queued.push(q),
                pb::acquire_event::Event::Granted(g) => return g,
            }
        }
        panic!("stream ended without a grant");
    };
    let granted = tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .expect("granted in time");
    (granted, queued)
}

/// Reads the next Queued event.
pub async fn next_queued(stream: &mut tonic::Streaming<pb::AcquireEvent>) -> pb::Queued {
    let event = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("event in time")
        .expect("stream ok")
        .expect("stream open");
    match event.event.expect("event set") {
        pb::acquire_event::Event::Queued(q) => q,
        pb::acquire_event::Event::Granted(g) => panic!("unexpected grant {g:?}"),
    }
}
