//! A real Prometheus (Debian's `prometheus`) on loopback, scraping a tiny
//! exporter the test runs, with alert rules checked by `promtool`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::free_port;

/// Gauges served on `/metrics` that the test sets.
#[derive(Clone)]
pub struct Exporter {
    /// Where it listens.
    pub addr: SocketAddr,
    values: Arc<Mutex<BTreeMap<String, f64>>>,
}

impl Exporter {
    /// Serves the gauges on 127.0.0.1:0 until the runtime ends.
    pub async fn start(initial: &[(&str, f64)]) -> Self {
        let values: Arc<Mutex<BTreeMap<String, f64>>> = Arc::new(Mutex::new(
            initial.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ));
        let served = values.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let values = served.clone();
                async move {
                    let values = values.lock().unwrap().clone();
                    values
                        .iter()
                        .map(|(k, v)| format!("# TYPE {k} gauge\n{k} {v}\n"))
                        .collect::<String>()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, values }
    }

    /// Sets a gauge.
    pub fn set(&self, name: &str, value: f64) {
        self.values.lock().unwrap().insert(name.to_string(), value);
    }
}

/// A Prometheus process. Killed on drop.
pub struct Prometheus {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second and evaluating
    /// `rules` (a rule file's YAML, checked with `promtool check rules`
    /// first) every second; waits until it is ready.
    pub fn start(target: SocketAddr, rules: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules_path = dir.path().join("rules.yml");
        std::fs::write(&rules_path, rules).unwrap();
        let check = Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules_path)
            .output()
            .expect("running promtool (Debian package prometheus)");
        assert!(
            check.status.success(),
            "promtool refused the rules: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [{rules:?}]\nscrape_configs:\n  - job_name: test\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules = rules_path.display().to_string()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = dir.path().join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting prometheus (Debian package prometheus)");
        let mut me = Self {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = me.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("prometheus exited with {status}: {}", me.log_text());
            }
            if get(port, "/-/ready").is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
                return me;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("prometheus was not ready within 30s: {}", me.log_text());
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it (its URL then refuses connections).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A plain HTTP/1.1 GET on 127.0.0.1 (enough to poll readiness).
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    stream.read_to_string(&mut out).ok()?;
    Some(out)
}
