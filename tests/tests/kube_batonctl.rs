//! `batonctl --kube` and `kubectl baton` against the Kubernetes fake: the
//! real binaries, with only a kubeconfig, find the leading coordinator by
//! its Lease, reach it through the fake's port-forward (WebSocket,
//! `v4.channel.k8s.io`) with TLS inside the tunnel (CA from the
//! ConfigMap the install publishes), and act with a ServiceAccount token requested
//! with the user's identity, which the coordinator's TokenReview maps to an
//! admin through `--kube-admin`. Refusals name what to do.
//!
//! What the fake cannot show: RBAC (the fake authorizes every request, so
//! "may this user create batonctl's token / pods/portforward" is left to
//! a real API server), and the kubelet's side of the tunnel (the fake
//! connects to the pod's IP from the host instead of inside the pod's
//! network namespace).

#[path = "../../coordinator/tests/support/pki.rs"]
mod pki;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use baton_coordinator::config::{Cli, Command};
use baton_coordinator::server::{self, Running};
use baton_tests::binary;
use baton_tests::kube_fake::FakeApi;
use baton_tests::kube_fake::fixtures::{lease, node, pod, service_account};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const NS: &str = "baton-system";
const SERVICE_NAME: &str = "baton-coordinator.baton-system.svc";

/// A fake cluster with Baton installed: a coordinator replica (in this
/// process, as pod coord-0) leading on the Lease, its TLS Secret, the
/// batonctl ServiceAccount, and a kubeconfig for the fake.
struct Cluster {
    fake: FakeApi,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    _running: Running,
    _stop: oneshot::Sender<()>,
}

async fn cluster() -> Result<Cluster> {
    let fake = FakeApi::new();
    let url = fake.serve().await.url;
    let dir = tempfile::tempdir()?;
    let pki = pki::Pki::new(dir.path(), "cluster");
    let server = pki.issue("server", "baton-coordinator", &[SERVICE_NAME]);
    fake.put(serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "baton-coordinator-ca", "namespace": NS},
        "data": {"ca.crt": std::fs::read_to_string(&pki.ca)?},
    }));
    fake.put(service_account(NS, "batonctl"));
    fake.put(service_account(NS, "viewer"));
    fake.put(node("n1").build());

    let (cert, key) = (
        server.cert.display().to_string(),
        server.key.display().to_string(),
    );
    let argv = [
        "baton-coordinator",
        "serve",
        "--listen=127.0.0.1:0",
        "--metrics-listen=127.0.0.1:0",
        "--store=kubernetes",
        "--id=coord-0",
        &format!("--kube-api-url={url}"),
        "--kube-namespace=baton-system",
        "--token-review",
        "--kube-admin=system:serviceaccount:baton-system:batonctl",
        &format!("--tls-cert={cert}"),
        &format!("--tls-key={key}"),
        "--lease-duration=3s",
        "--lease-renew-deadline=1500ms",
        "--lease-retry-period=250ms",
        // A new cluster: the empty store is created, not refused.
        "--initialize",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = server::start(*args, async move {
        let _ = stopped.await;
    })
    .await?;
    for _ in 0..200 {
        if running.engine.leadership().is_leader {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(running.engine.leadership().is_leader, "coord-0 leads");
    fake.put(
        pod(NS, "coord-0")
            .label("app.kubernetes.io/name", "baton-coordinator")
            .serving("127.0.0.1", "grpc", running.grpc_addr.port())
            .build(),
    );
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
             users:\n- name: operator\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: operator\n\
             current-context: fake\n"
        ),
    )?;
    Ok(Cluster {
        fake,
        dir,
        kubeconfig,
        _running: running,
        _stop: stop,
    })
}

/// What a run of a binary printed.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Cluster {
    /// Runs `program` (batonctl or kubectl-baton) with only the kubeconfig.
    async fn run(&self, program: &str, args: &[&str]) -> Ran {
        let out = tokio::process::Command::new(binary(program))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.dir.path())
            .env_remove("BATON_COORDINATOR")
            .env_remove("BATON_CA")
            .output()
            .await
            .expect("running the binary");
        Ran {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn status(&self) -> serde_json::Value {
        self.fake
            .get("v1/configmaps", NS, "baton-state")
            .map(|c| c["data"].clone())
            .unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batonctl_kube_reaches_the_leader_through_a_port_forward() -> Result<()> {
    let c = cluster().await?;

    let status = c.run("batonctl", &["--kube", "status", "-o", "json"]).await;
    assert!(status.ok, "{}", status.stderr);
    let parsed: serde_json::Value = serde_json::from_str(&status.stdout)?;
    assert!(
        parsed["holders"].as_array().is_some_and(|h| h.is_empty()),
        "{parsed}"
    );

    // The admin identity of the batonctl ServiceAccount acts for any node.
    let acquired = c.run("batonctl", &["--kube", "acquire", "n1"]).await;
    assert!(acquired.ok, "{}", acquired.stderr);
    let token = acquired.stdout.trim().to_string();
    assert!(token.parse::<u64>().is_ok(), "{token}");

    // The plugin name implies --kube.
    let status = c.run("kubectl-baton", &["status", "-o", "json"]).await;
    assert!(status.ok, "{}", status.stderr);
    let parsed: serde_json::Value = serde_json::from_str(&status.stdout)?;
    assert_eq!(parsed["holders"][0]["node"], "n1", "{parsed}");
    let paused = c
        .run("kubectl-baton", &["pause", "--reason", "change freeze"])
        .await;
    assert!(paused.ok, "{}", paused.stderr);
    assert!(
        c.status().to_string().contains("change freeze"),
        "the pause was saved: {}",
        c.status()
    );
    // Requests went where they should: a TokenRequest and port-forwards to
    // the pod the Lease names.
    let served = c.fake.served();
    assert!(served.iter().any(|s| s.path
        == "/api/v1/namespaces/baton-system/serviceaccounts/batonctl/token"
        && s.status == 201));
    assert!(served.iter().any(|s| s.path
        == "/api/v1/namespaces/baton-system/pods/coord-0/portforward"
        && s.status == 101));
    let help = c.run("kubectl-baton", &["--help"]).await;
    assert!(help.stdout.contains("kubectl baton"), "{}", help.stdout);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batonctl_kube_fails_closed_and_says_what_to_do() -> Result<()> {
    let c = cluster().await?;

    // Another ServiceAccount's token authenticates but is no admin: the
    // rights come from the Kubernetes identity, not from reaching the pod.
    let denied = c
        .run(
            "batonctl",
            &["--kube", "--kube-service-account=viewer", "pause"],
        )
        .await;
    assert!(!denied.ok);
    assert!(
        denied.stderr.contains(
            "system:serviceaccount:baton-system:viewer is not the agents' service account"
        ) || denied.stderr.contains("not an admin"),
        "{}",
        denied.stderr
    );

    // No published CA and no --ca: say how to publish it.
    let ca = c.fake.remove("v1/configmaps", NS, "baton-coordinator-ca");
    let no_ca = c.run("batonctl", &["--kube", "status"]).await;
    assert!(!no_ca.ok);
    assert!(
        no_ca
            .stderr
            .contains("kubectl -n baton-system create configmap baton-coordinator-ca"),
        "{}",
        no_ca.stderr
    );
    c.fake.put(ca.expect("the CA ConfigMap"));

    // No batonctl ServiceAccount: say to apply the manifests.
    let missing = c
        .run(
            "batonctl",
            &["--kube", "--kube-service-account=nobody", "status"],
        )
        .await;
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("apply manifests/"),
        "{}",
        missing.stderr
    );

    // A certificate that does not chain to the CA given: no connection.
    let other = pki::Pki::new(c.dir.path(), "other");
    let ca = other.ca.display().to_string();
    let untrusted = c.run("batonctl", &["--kube", "--ca", &ca, "status"]).await;
    assert!(!untrusted.ok);
    assert!(
        untrusted.stderr.contains("through the Kubernetes API"),
        "{}",
        untrusted.stderr
    );

    // The Lease names a pod that is gone: a failover, retry.
    c.fake.put(lease(NS, "ghost-lease", "coord-9"));
    let gone = c
        .run(
            "batonctl",
            &["--kube", "--kube-lease=ghost-lease", "status"],
        )
        .await;
    assert!(!gone.ok);
    assert!(
        gone.stderr.contains("retry in a few seconds"),
        "{}",
        gone.stderr
    );

    // The pod refuses the port: the kubelet's message is shown.
    c.fake.put(lease(NS, "dead-lease", "coord-1"));
    let closed = baton_tests::ports::free_port();
    c.fake.put(
        pod(NS, "coord-1")
            .serving("127.0.0.1", "grpc", closed)
            .build(),
    );
    let refused = c
        .run("batonctl", &["--kube", "--kube-lease=dead-lease", "status"])
        .await;
    assert!(!refused.ok);
    assert!(
        refused
            .stderr
            .contains("the API server said: error forwarding port"),
        "{}",
        refused.stderr
    );

    // A pod that is not running is not forwarded to.
    c.fake.put(
        pod(NS, "coord-1")
            .serving("127.0.0.1", "grpc", closed)
            .phase("Pending")
            .build(),
    );
    let pending = c
        .run("batonctl", &["--kube", "--kube-lease=dead-lease", "status"])
        .await;
    assert!(!pending.ok);
    assert!(pending.stderr.contains("not running"), "{}", pending.stderr);

    // No kubeconfig at all.
    let out = tokio::process::Command::new(binary("batonctl"))
        .args(["--kube", "status"])
        .env("KUBECONFIG", c.dir.path().join("missing"))
        .env("HOME", c.dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("KUBECONFIG"), "{stderr}");
    Ok(())
}

/// A raw HTTP/1.1 request to the fake; returns the status line.
async fn raw_get(url: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let addr = url.strip_prefix("http://").expect("http url");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await.expect("read");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn the_fake_port_forward_is_as_strict_as_the_real_one() {
    let fake = FakeApi::new();
    let url = fake.serve().await.url;
    fake.put(pod(NS, "p").serving("127.0.0.1", "grpc", 1).build());
    let path = "/api/v1/namespaces/baton-system/pods/p/portforward?ports=1";
    let websocket = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    // Not a WebSocket upgrade (kubectl's SPDY is not spoken).
    assert!(raw_get(&url, path, &[]).await.contains(" 400 "));
    // A WebSocket without the v4 channel subprotocol.
    let mut v5 = websocket.to_vec();
    v5.push(("Sec-WebSocket-Protocol", "v5.channel.k8s.io"));
    assert!(raw_get(&url, path, &v5).await.contains(" 400 "));
    // No port, a missing pod.
    let mut v4 = websocket.to_vec();
    v4.push((
        "Sec-WebSocket-Protocol",
        "v5.channel.k8s.io, v4.channel.k8s.io",
    ));
    assert!(
        raw_get(
            &url,
            "/api/v1/namespaces/baton-system/pods/p/portforward",
            &v4
        )
        .await
        .contains(" 400 ")
    );
    assert!(
        raw_get(
            &url,
            "/api/v1/namespaces/baton-system/pods/q/portforward?ports=1",
            &v4
        )
        .await
        .contains(" 404 ")
    );
    // The real handshake.
    assert!(raw_get(&url, path, &v4).await.contains(" 101 "));
}
