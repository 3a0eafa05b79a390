//! The monitoring add-on (`manifests/monitoring/`): the alert rules pass
//! Debian's `promtool` (`check rules`, and `test rules` with a unit test
//! for every alert), every alert has a runbook, the Grafana dashboard is
//! dashboard JSON whose queries parse and name only metrics a real
//! coordinator exports, a real coordinator's `/metrics` passes `promtool
//! check metrics`, and the add-on renders with `kubectl kustomize` into
//! objects that select what the install creates.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context, Result};
use baton_tests::coordinator::CoordinatorProcess;
use baton_tests::run_checked;
use serde::Deserialize;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn monitoring_dir() -> PathBuf {
    root().join("manifests/monitoring")
}

/// Every YAML document of `text`, as JSON values.
fn yaml_documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn yaml_file(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    yaml_documents(&text)?
        .into_iter()
        .next()
        .with_context(|| format!("{} is empty", path.display()))
}

/// Runs `program` with `args` in `dir`; fails with its output when it fails.
fn run(program: &str, args: &[&str], dir: &Path) -> Result<Output> {
    run_checked(Command::new(program).args(args).current_dir(dir))
}

fn promtool(args: &[&str], dir: &Path) -> Result<Output> {
    run("promtool", args, dir)
}

/// The PrometheusRule as the add-on ships it.
fn prometheus_rule() -> Result<Value> {
    yaml_file(&monitoring_dir().join("prometheusrule.yaml"))
}

/// Every alerting rule of the PrometheusRule.
fn alerts() -> Result<Vec<Value>> {
    let rule = prometheus_rule()?;
    let mut alerts = Vec::new();
    for group in rule["spec"]["groups"].as_array().context("spec.groups")? {
        for r in group["rules"].as_array().context("rules")? {
            if r["alert"].is_string() {
                alerts.push(r.clone());
            }
        }
    }
    Ok(alerts)
}

/// A temp dir holding the PrometheusRule's spec as `rules.yaml` (what
/// Prometheus loads from it) and a copy of the unit tests beside it.
fn rules_dir() -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let spec = &prometheus_rule()?["spec"];
    std::fs::write(dir.path().join("rules.yaml"), serde_json::to_string(spec)?)?;
    std::fs::copy(
        monitoring_dir().join("alerts_test.yaml"),
        dir.path().join("alerts_test.yaml"),
    )?;
    Ok(dir)
}

/// Names of `baton_*` metrics a PromQL expression reads.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with("baton_"))
        .map(str::to_string)
        .collect()
}

/// Every name a `/metrics` page in the text format exposes: families
/// (HELP/TYPE) and samples.
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| {
            let name = match line
                .strip_prefix("# HELP ")
                .or(line.strip_prefix("# TYPE "))
            {
                Some(rest) => rest.split(' ').next(),
                None if line.starts_with('#') => None,
                None => line.split(['{', ' ']).next(),
            }?;
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

fn dashboard() -> Result<Value> {
    let text = std::fs::read_to_string(monitoring_dir().join("baton-dashboard.json"))?;
    Ok(serde_json::from_str(&text)?)
}

/// Every (panel id, refId, expr) of the dashboard, Grafana's variables
/// replaced by what they stand for so promtool can parse the query.
fn dashboard_queries(dashboard: &Value) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_default()
                .replace("$__rate_interval", "5m")
                .replace("$namespace", "baton-system");
            out.push((
                panel["id"].as_u64().unwrap_or_default(),
                target["refId"].as_str().unwrap_or_default().to_string(),
                expr,
            ));
        }
    }
    out
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() -> Result<()> {
    let dir = rules_dir()?;
    let checked = promtool(&["check", "rules", "rules.yaml"], dir.path())?;
    let said = String::from_utf8_lossy(&checked.stdout);
    let alerts = alerts()?;
    assert!(
        said.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{said}"
    );
    promtool(&["test", "rules", "alerts_test.yaml"], dir.path())?;

    // Every alert has a unit test in which it fires (so a new alert
    // without a test fails here).
    let tests = yaml_file(&monitoring_dir().join("alerts_test.yaml"))?;
    let fired: BTreeSet<&str> = tests["tests"]
        .as_array()
        .context("tests")?
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter(|a| a["exp_alerts"].as_array().is_some_and(|e| !e.is_empty()))
        .filter_map(|a| a["alertname"].as_str())
        .collect();
    let untested: Vec<&str> = alerts
        .iter()
        .filter_map(|a| a["alert"].as_str())
        .filter(|a| !fired.contains(a))
        .collect();
    assert!(
        untested.is_empty(),
        "alerts without a firing unit test: {untested:?}"
    );
    let wanted = [
        "BatonHolderOverdue",
        "BatonNodeFailed",
        "BatonRolloutStalled",
        "BatonEtcdGuardBlocking",
        "BatonAgentWithoutBackups",
        "BatonNoLeader",
        "BatonEtcdSnapshotFailed",
        "BatonPausedByFailureBudget",
        "BatonPolicyReloadRefused",
        "BatonHealthGateClosed",
        "BatonWebhookGivingUp",
        "BatonEventsDropped",
    ];
    for name in wanted {
        assert!(fired.contains(name), "{name} is missing");
    }
    Ok(())
}

#[test]
fn a_broken_rule_fails_the_unit_tests() -> Result<()> {
    // The tests can fail: without the leader join, a follower's stale
    // overdue gauge pages, which alerts_test.yaml says must not happen.
    let dir = rules_dir()?;
    let rules = std::fs::read_to_string(dir.path().join("rules.yaml"))?;
    let broken = rules.replace(
        "baton_overdue_holders and on (instance) (baton_is_leader == 1)",
        "baton_overdue_holders",
    );
    assert_ne!(rules, broken, "the rule to break was not found");
    std::fs::write(dir.path().join("rules.yaml"), broken)?;
    let err = promtool(&["test", "rules", "alerts_test.yaml"], dir.path())
        .expect_err("the broken rule must fail its unit test");
    assert!(err.to_string().contains("BatonHolderOverdue"), "{err}");
    Ok(())
}

#[test]
fn every_alert_has_annotations_and_a_runbook_section() -> Result<()> {
    let runbooks = std::fs::read_to_string(root().join("docs/runbooks.md"))?;
    let cargo = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let repository = cargo
        .lines()
        .find_map(|l| l.strip_prefix("repository = "))
        .context("workspace repository")?
        .trim_matches('"');
    for alert in alerts()? {
        let name = alert["alert"].as_str().context("alert name")?;
        let annotations = &alert["annotations"];
        for key in ["summary", "description", "runbook"] {
            assert!(
                annotations[key].as_str().is_some_and(|s| s.len() > 10),
                "{name}: annotation {key} missing"
            );
        }
        assert!(
            alert["labels"]["severity"]
                .as_str()
                .is_some_and(|s| ["critical", "warning"].contains(&s)),
            "{name}: severity"
        );
        let url = annotations["runbook_url"].as_str().context("runbook_url")?;
        let expected = format!(
            "{repository}/blob/main/docs/runbooks.md#{}",
            name.to_lowercase()
        );
        assert_eq!(url, expected, "{name}");
        assert!(
            runbooks.contains(&format!("\n## {name}\n")),
            "docs/runbooks.md has no section for {name}"
        );
    }
    Ok(())
}

#[test]
fn the_dashboard_is_grafana_dashboard_json_with_queries_that_parse() -> Result<()> {
    let dashboard = dashboard()?;
    // What Grafana needs to load (and provision) a dashboard.
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let uid = dashboard["uid"].as_str().context("uid")?;
    assert!(
        !uid.is_empty()
            && uid.len() <= 40
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "uid {uid:?}"
    );
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dashboard["time"]["from"].is_string() && dashboard["time"]["to"].is_string());
    let variables = dashboard["templating"]["list"]
        .as_array()
        .context("templating.list")?;
    assert!(
        variables.iter().any(|v| v["name"] == "datasource"
            && v["type"] == "datasource"
            && v["query"] == "prometheus"),
        "a Prometheus datasource variable"
    );
    let panels = dashboard["panels"].as_array().context("panels")?;
    let mut ids = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in panels {
        let id = panel["id"].as_u64().context("panel id")?;
        assert!(ids.insert(id), "panel id {id} twice");
        let title = panel["title"].as_str().context("panel title")?;
        assert!(panel["type"].is_string(), "{title}: type");
        let grid = &panel["gridPos"];
        let (x, w, h) = (
            grid["x"].as_u64().context("gridPos.x")?,
            grid["w"].as_u64().context("gridPos.w")?,
            grid["h"].as_u64().context("gridPos.h")?,
        );
        assert!(
            grid["y"].is_u64() && w >= 1 && h >= 1 && x + w <= 24,
            "{title}: gridPos {grid}"
        );
        if panel["type"] == "row" {
            continue;
        }
        titles.insert(title.to_string());
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().context("targets")?;
        assert!(!targets.is_empty(), "{title}: no query");
        let refs: BTreeSet<&str> = targets.iter().filter_map(|t| t["refId"].as_str()).collect();
        assert_eq!(
            refs.len(),
            targets.len(),
            "{title}: refIds missing or repeated"
        );
    }
    for wanted in [
        "Rollout progress",
        "Holders and queue",
        "Handoff latency",
        "etcd guard",
        "Per-node phases",
    ] {
        assert!(titles.contains(wanted), "no panel {wanted:?}: {titles:?}");
    }

    // Every query parses: promtool checks them as recording rules.
    let rules: Vec<Value> = dashboard_queries(&dashboard)
        .into_iter()
        .map(|(id, ref_id, expr)| {
            serde_json::json!({"record": format!("baton_dashboard:panel_{id}_{ref_id}"), "expr": expr})
        })
        .collect();
    assert!(rules.len() >= 15, "{} queries", rules.len());
    let dir = tempfile::tempdir()?;
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("queries.yaml"), file.to_string())?;
    promtool(&["check", "rules", "queries.yaml"], dir.path())?;
    Ok(())
}

#[test]
fn real_metrics_pass_promtool_and_cover_every_alert_and_panel() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A webhook nobody answers (given up after one attempt), so the
    // webhook series have samples too.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "webhooks:\n  - url: http://127.0.0.1:1/hook\n    maxAttempts: 1\n    timeout: 1s\n",
    )?;
    let policy_flag = format!("--policy={}", policy.display());
    let coordinator = CoordinatorProcess::start(&dir.path().join("data"), &[&policy_flag]);
    // A grant, a waiter, a release and a handoff, so every kind of series
    // (holders' phases, the latency histogram) has samples.
    let token = coordinator.ctl(&["acquire", "n1"]);
    assert!(token.status.success());
    let token = String::from_utf8_lossy(&token.stdout).trim().to_string();
    let mut waiter = coordinator
        .ctl_command(&["acquire", "n2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    for _ in 0..200 {
        if coordinator.status()["queue"]
            .as_array()
            .is_some_and(|q| !q.is_empty())
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let released = coordinator.ctl(&["release", "n1", "--token", &token]);
    assert!(released.status.success());
    assert!(waiter.wait()?.success(), "n2 was granted");

    let given_up = "baton_webhook_deliveries_total{hook=\"1:127.0.0.1:1\",result=\"given_up\"}";
    let gave_up = (0..200).any(|_| {
        let seen = coordinator
            .metrics_text()
            .lines()
            .any(|l| l.starts_with(given_up) && !l.ends_with(" 0"));
        if !seen {
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        seen
    });
    assert!(gave_up, "{given_up} never counted the dead webhook");
    let text = coordinator.metrics_text();
    for series in [
        "baton_health_gate_open 1",
        "baton_health_gate_waiting{cause=\"nodes_not_ready\"} 0",
        "baton_policy_generation 1",
        "baton_webhook_deliveries_total{hook=\"1:127.0.0.1:1\",result=\"delivered\"} 0",
        "baton_holder_phase{node=\"n2\",phase=\"granted\"} 1",
        "baton_handoffs_total 1",
        "baton_grants_total 2",
        "baton_window_open 1",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    let checked = dir.path().join("metrics.txt");
    std::fs::write(&checked, &text)?;
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&checked)?)
        .output()
        .context("running promtool (cargo xtask deps installs it)")?;
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every metric the alerts and the dashboard read is one the
    // coordinator exports.
    let exported = exported_names(&text);
    let mut used: Vec<(String, String)> = Vec::new();
    for alert in alerts()? {
        let name = alert["alert"].as_str().unwrap_or_default().to_string();
        for metric in metric_names(alert["expr"].as_str().unwrap_or_default()) {
            used.push((name.clone(), metric));
        }
    }
    for (id, ref_id, expr) in dashboard_queries(&dashboard()?) {
        for metric in metric_names(&expr) {
            used.push((format!("dashboard panel {id} {ref_id}"), metric));
        }
    }
    let unknown: Vec<String> = used
        .iter()
        .filter(|(_, m)| !exported.contains(m))
        .map(|(w, m)| format!("{w}: {m}"))
        .collect();
    assert!(
        unknown.is_empty(),
        "metrics the coordinator does not export: {unknown:?}\nexported: {exported:?}"
    );
    assert!(used.len() > 20, "{used:?}");
    Ok(())
}

#[test]
fn the_add_on_renders_and_selects_what_the_install_creates() -> Result<()> {
    let render = |dir: &str| -> Result<Vec<Value>> {
        let out = run("kubectl", &["kustomize", dir], &root())?;
        yaml_documents(&String::from_utf8(out.stdout)?)
    };
    let install = render("manifests")?;
    let addon = render("manifests/monitoring")?;
    let find = |objects: &[Value], kind: &str| -> Result<Value> {
        objects
            .iter()
            .find(|o| o["kind"] == kind)
            .cloned()
            .with_context(|| format!("no {kind}"))
    };
    let monitor = find(&addon, "ServiceMonitor")?;
    let service = find(&addon, "Service")?;
    let deployment = find(&install, "Deployment")?;
    for object in &addon {
        assert_eq!(object["metadata"]["namespace"], "baton-system", "{object}");
    }
    // The ServiceMonitor selects the metrics Service, which selects the
    // coordinator pods (followers too) and names their metrics port.
    let wanted = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("matchLabels")?;
    for (k, v) in wanted {
        assert_eq!(&service["metadata"]["labels"][k], v, "service label {k}");
    }
    assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
    let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"]
        .as_object()
        .context("selector")?
    {
        assert_eq!(&pod_labels[k], v, "pod label {k}");
    }
    let port = monitor["spec"]["endpoints"][0]["port"]
        .as_str()
        .context("port")?;
    assert!(
        service["spec"]["ports"].as_array().is_some_and(|p| p
            .iter()
            .any(|p| p["name"] == port && p["targetPort"] == port)),
        "service port {port}"
    );
    assert!(
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == port)),
        "container port {port}"
    );
    // The dashboard ConfigMap carries the file as it is, for the sidecar.
    let config_map = find(&addon, "ConfigMap")?;
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let shipped: Value = serde_json::from_str(
        config_map["data"]["baton-dashboard.json"]
            .as_str()
            .context("dashboard data")?,
    )?;
    assert_eq!(shipped, dashboard()?);
    assert_eq!(
        find(&addon, "PrometheusRule")?["spec"],
        prometheus_rule()?["spec"]
    );
    Ok(())
}
