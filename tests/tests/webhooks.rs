//! Webhooks on rollout events: a local receiver that fails the first
//! attempts gets every event after retries, with the template filled in
//! and JSON-escaped; a webhook that never answers does not delay a grant.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use axum::http::StatusCode;
use baton_proto::v1::{PauseRequest, Phase, ReportRequest};
use baton_tests::coordinator::{InProcess, wait_granted};

/// Answers 500 to the first `fail_first` requests, then 200; keeps the
/// bodies it accepted.
async fn receiver(
    fail_first: usize,
) -> (
    String,
    Arc<Mutex<Vec<serde_json::Value>>>,
    Arc<Mutex<usize>>,
) {
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let attempts = Arc::new(Mutex::new(0usize));
    let (acc, att) = (accepted.clone(), attempts.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let (acc, att) = (acc.clone(), att.clone());
            async move {
                let n = {
                    let mut a = att.lock().unwrap();
                    *a += 1;
                    *a
                };
                if n <= fail_first {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                acc.lock()
                    .unwrap()
                    .push(serde_json::from_str(&body).expect("the body is JSON"));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, accepted, attempts)
}

/// Accepts connections and never answers.
async fn black_hole() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    url
}

async fn until_texts(accepted: &Mutex<Vec<serde_json::Value>>, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let texts: Vec<String> = accepted
            .lock()
            .unwrap()
            .iter()
            .map(|b| b["text"].as_str().unwrap_or_default().to_string())
            .collect();
        if texts.len() >= n {
            return texts;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "fewer than {n} webhook deliveries: {:?}",
        accepted.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_flaky_webhook_and_a_dead_one_blocks_nothing() -> Result<()> {
    let (url, accepted, attempts) = receiver(2).await;
    let dead = black_hole().await;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        format!(
            r#"webhooks:
  - url: {dead}
    timeout: 10s
    maxAttempts: 3
  - url: {url}
    events: [granted, failed, released, paused, finished]
    template: '{{"text": "baton {{{{event}}}} {{{{node}}}}: {{{{reason}}}}"}}'
"#
        ),
    )?;
    let coord = InProcess::start(dir.path(), &[format!("--policy={}", policy.display())]).await?;

    // The dead hook (10 s timeout per attempt) does not delay the grant.
    let started = Instant::now();
    let mut n1 = coord.acquire("n1", false).await?;
    let t1 = wait_granted(&mut n1, Duration::from_secs(5)).await?;
    assert!(started.elapsed() < Duration::from_secs(5));

    // A failed step, with text that would break naive JSON.
    coord
        .lease()
        .await?
        .report(ReportRequest {
            node: "n1".into(),
            fencing_token: t1,
            phase: Phase::Failed as i32,
            error: "apt said \"no\"\nexit 100".into(),
            ..Default::default()
        })
        .await?;
    coord.release("n1", t1).await?;
    until_texts(&accepted, 4).await;
    coord
        .admin()
        .await?
        .pause(PauseRequest {
            reason: "weekend".into(),
        })
        .await?;

    let texts = until_texts(&accepted, 5).await;
    assert_eq!(
        texts,
        [
            "baton granted n1: test",
            "baton failed n1: apt said \"no\"\nexit 100",
            "baton released n1: done",
            "baton finished : no node holds the baton and none waits",
            "baton paused : weekend",
        ]
    );
    // The first two attempts failed and were retried.
    assert_eq!(*attempts.lock().unwrap(), 7);
    // Counted by hook (position and host, never the path) and result.
    let host = url
        .trim_start_matches("http://")
        .trim_end_matches("/hook")
        .to_string();
    let metrics = coord
        .until_metric(&format!(
            "baton_webhook_deliveries_total{{hook=\"2:{host}\",result=\"delivered\"}} 5"
        ))
        .await?;
    assert!(
        metrics.contains(&format!(
            "baton_webhook_deliveries_total{{hook=\"2:{host}\",result=\"retried\"}} 2"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "baton_webhook_queue_length{{hook=\"2:{host}\"}} 0"
        )),
        "{metrics}"
    );
    Ok(())
}
