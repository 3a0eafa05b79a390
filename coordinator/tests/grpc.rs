//! The gRPC API against a real server on 127.0.0.1:0: the lease protocol,
//! bad input, persistence across restarts, metrics and clean shutdown.

mod support;

use std::time::Duration;

use baton_proto::v1 as pb;
use support::{TestServer, acquire, insecure_args, next_queued, serve_args, until_granted};
use tonic::Code;

#[tokio::test]
async fn grants_in_order_and_refuses_stale_or_foreign_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, mut admin) = server.clients().await;

    let mut a = acquire(&mut lease, "n1", true).await.unwrap();
    let (ga, _) = until_granted(&mut a).await;
    assert!(!ga.resumed);
    let mut b = acquire(&mut lease, "n2", true).await.unwrap();
    let q = next_queued(&mut b).await;
    assert_eq!((q.position, q.queue_length), (1, 1));
    assert_eq!(q.reason, "concurrency limit: 1 of 1 in use (n1 holds it)");

    // n2's status shows in the queue with its reason.
    let status = admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.holders.len(), 1);
    assert_eq!(status.holders[0].node, "n1");
    assert_eq!(status.queue[0].reason, q.reason);

    // A stale token, the other node's token, and a non-holder are refused.
    for (node, token) in [
        ("n1", ga.fencing_token + 1),
        ("n1", 0),
        ("n2", ga.fencing_token),
    ] {
        let err = lease
            .renew(pb::RenewRequest {
                node: node.into(),
                fencing_token: token,
            })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::FailedPrecondition,
            "{node}/{token}: {err}"
        );
        let err = lease
            .release(pb::ReleaseRequest {
                node: node.into(),
                fencing_token: token,
                reason: String::new(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
    }
    let after = admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.holders, status.holders,
        "refused calls changed nothing"
    );

    lease
        .report(pb::ReportRequest {
            node: "n1".into(),
            fencing_token: ga.fencing_token,
            phase: pb::Phase::Updating as i32,
            boot_id: "boot-1".into(),
            message: "apt-get upgrade".into(),
            error: String::new(),
        })
        .await
        .unwrap();
    lease
        .release(pb::ReleaseRequest {
            node: "n1".into(),
            fencing_token: ga.fencing_token,
            reason: "done".into(),
        })
        .await
        .unwrap();
    let (gb, _) = until_granted(&mut b).await;
    assert!(gb.fencing_token > ga.fencing_token);
    server.stop().await;
}

#[tokio::test]
async fn malformed_requests_get_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, mut admin) = server.clients().await;
    let long = "a".repeat(254);
    for node in ["", long.as_str(), "Upper", "a_b", "../etc"] {
        let err = acquire(&mut lease, node, false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{node:?}: {err}");
        assert!(err.message().starts_with("node: "), "{}", err.message());
    }
    let err = lease
        .report(pb::ReportRequest {
            node: "n1".into(),
            fencing_token: 1,
            phase: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = lease
        .acquire(pb::AcquireRequest {
            node: "n1".into(),
            reason: "x".repeat(5000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = admin
        .force_release(pb::ForceReleaseRequest {
            node: "n1".into(),
            reason: " ".into(),
            any_token: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "a force-release needs a reason"
    );
    let err = admin
        .force_release(pb::ForceReleaseRequest {
            node: "n1".into(),
            reason: "gone".into(),
            any_token: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "not a holder");
    server.stop().await;
}

#[tokio::test]
async fn a_late_force_release_does_not_drop_a_newer_grant() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, mut admin) = server.clients().await;
    let (g1, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    lease
        .release(pb::ReleaseRequest {
            node: "n1".into(),
            fencing_token: g1.fencing_token,
            reason: "done".into(),
        })
        .await
        .unwrap();
    let (g2, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    let force = |fencing_token: u64, any_token: bool| pb::ForceReleaseRequest {
        node: "n1".into(),
        reason: "looked stuck in status a minute ago".into(),
        fencing_token,
        any_token,
    };
    // Neither a token nor an explicit "any", or both: refused as malformed.
    for (token, any) in [(0, false), (g2.fencing_token, true)] {
        let err = admin.force_release(force(token, any)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{token}/{any}: {err}");
    }
    // The token the operator saw is gone: the fresh grant stays.
    let err = admin
        .force_release(force(g1.fencing_token, false))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let status = admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.holders[0].fencing_token, g2.fencing_token);
    assert!(status.audit.iter().all(|a| a.action != "force-release"));
    let released = admin
        .force_release(force(g2.fencing_token, false))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.fencing_token, g2.fencing_token);
    server.stop().await;
}

#[tokio::test]
async fn an_empty_window_is_an_error_not_always() {
    let dir = tempfile::tempdir().unwrap();
    for windows in [&["--window", ""][..], &["--window", "Sat 01:00-02:00;"][..]] {
        let mut extra = vec!["--insecure"];
        extra.extend_from_slice(windows);
        let outcome = baton_coordinator::server::start(
            support::serve_args(dir.path(), &extra),
            std::future::pending(),
        )
        .await;
        match outcome {
            Err(baton_coordinator::server::ServeError::Window(e)) => {
                assert!(e.to_string().contains("is not of the form"), "{e}")
            }
            Err(e) => panic!("{windows:?}: wrong error {e}"),
            Ok(_) => panic!("{windows:?}: an empty window must not mean \"always\""),
        }
    }
}

#[tokio::test]
async fn state_survives_a_restart_and_tokens_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, mut admin) = server.clients().await;
    let (g1, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    admin
        .pause(pb::PauseRequest {
            reason: "freeze".into(),
        })
        .await
        .unwrap();
    server.stop().await;

    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, mut admin) = server.clients().await;
    let status = admin
        .status(pb::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(status.paused);
    assert_eq!(status.pause_reason, "freeze");
    assert_eq!(status.holders[0].node, "n1");
    assert_eq!(status.holders[0].fencing_token, g1.fencing_token);
    // The holder reconnecting learns what it holds.
    let (resumed, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    assert!(resumed.resumed);
    assert_eq!(resumed.fencing_token, g1.fencing_token);
    lease
        .release(pb::ReleaseRequest {
            node: "n1".into(),
            fencing_token: g1.fencing_token,
            reason: "done".into(),
        })
        .await
        .unwrap();
    admin.resume(pb::ResumeRequest {}).await.unwrap();
    let (g2, _) = until_granted(&mut acquire(&mut lease, "n2", false).await.unwrap()).await;
    assert!(g2.fencing_token > g1.fencing_token);
    server.stop().await;
}

#[tokio::test]
async fn refuses_to_start_on_a_corrupt_state_file_or_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, b"{\"format\":1,\"state\":{\"last_token\":").unwrap();
    let err = baton_coordinator::server::start(insecure_args(dir.path()), std::future::pending())
        .await
        .err()
        .expect("start fails");
    let message = err.to_string();
    assert!(
        message.contains("is corrupt") && message.contains("left untouched"),
        "{message}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"{\"format\":1,\"state\":{\"last_token\":"
    );

    let clean = tempfile::tempdir().unwrap();
    let err =
        baton_coordinator::server::start(serve_args(clean.path(), &[]), std::future::pending())
            .await
            .err()
            .expect("no auth, no start");
    assert!(
        err.to_string()
            .contains("refusing to start without client authentication"),
        "{err}"
    );

    let err = baton_coordinator::server::start(
        serve_args(
            clean.path(),
            &["--insecure", "--window", "Mon-Fri 22:00-04:00 Mars/Olympus"],
        ),
        std::future::pending(),
    )
    .await
    .err()
    .expect("bad window, no start");
    assert!(err.to_string().contains("unknown time zone"), "{err}");
}

#[tokio::test]
async fn shutdown_ends_streams_and_metrics_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, _) = server.clients().await;
    let (_, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    let mut waiting = acquire(&mut lease, "n2", false).await.unwrap();
    next_queued(&mut waiting).await;

    let base = format!("http://{}", server.running.metrics_addr);
    let metrics = http_get(&format!("{base}/metrics")).await;
    for series in [
        "baton_holders 1",
        "baton_queue_length 1",
        "baton_grants_total 1",
        "baton_overdue_holders 0",
        "baton_handoff_latency_seconds_count",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    assert!(http_get(&format!("{base}/healthz")).await.contains("ok"));
    assert!(
        http_get(&format!("{base}/readyz"))
            .await
            .contains("ready: leading")
    );

    let watcher = {
        let mut admin = baton_proto::v1::admin_client::AdminClient::new(server.channel().await);
        let mut stream = admin.watch(pb::WatchRequest {}).await.unwrap().into_inner();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok(Some(_)) = stream.message().await {
                n += 1;
            }
            n
        })
    };
    server.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(10), waiting.message())
        .await
        .expect("stream ends");
    assert_eq!(ended.unwrap_err().code(), Code::Unavailable);
    assert!(
        tokio::time::timeout(Duration::from_secs(10), watcher)
            .await
            .unwrap()
            .unwrap()
            >= 1
    );
    // The state on disk still has the holder.
    let state = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(state.contains("\"n1\""));
}

/// A minimal HTTP/1.1 GET (keeps the test free of an HTTP client dependency).
async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

#[tokio::test]
async fn a_wrong_data_dir_is_refused_not_started_empty() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, _) = server.clients().await;
    let (g1, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    server.stop().await;

    // Restarted with a typo in --data-dir: no state there. Starting empty
    // would forget n1 (mid-reboot) and could grant n2 at once.
    let wrong = tempfile::tempdir().unwrap();
    let mut args = insecure_args(wrong.path());
    args.initialize = false;
    let err = baton_coordinator::server::start(args, std::future::pending())
        .await
        .err()
        .expect("an empty store after the first start is refused");
    let message = err.to_string();
    assert!(message.contains("no lease state in"), "{message}");
    assert!(message.contains("--initialize"), "{message}");
    assert!(!wrong.path().join("state.json").exists());

    // --initialize on the real directory is refused too: it holds state.
    let mut args = insecure_args(dir.path());
    args.initialize = true;
    let err = baton_coordinator::server::start(args, std::future::pending())
        .await
        .err()
        .expect("--initialize over existing state is refused");
    assert!(err.to_string().contains("remove --initialize"), "{err}");

    // The right directory, as usual: n1 still holds its token.
    let server = TestServer::start(insecure_args(dir.path())).await;
    let (mut lease, _) = server.clients().await;
    let (resumed, _) = until_granted(&mut acquire(&mut lease, "n1", false).await.unwrap()).await;
    assert_eq!(resumed.fencing_token, g1.fencing_token);
    server.stop().await;
}
