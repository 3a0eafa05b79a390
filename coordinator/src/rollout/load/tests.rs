use std::path::Path;

use super::*;

fn flags() -> FlagDefaults {
    FlagDefaults {
        overdue_after: Duration::from_secs(15 * 60),
        kubernetes: true,
        ..FlagDefaults::default()
    }
}

fn parse_text(text: &str, flags: &FlagDefaults) -> Result<Loaded, PolicyError> {
    parse(Some(Path::new("policy.yaml")), text, flags, Utc::now())
}

const GOOD: &str = r#"
maxConcurrent: 2
windows:
  - "Mon-Fri 22:00-04:00 Europe/Berlin"
minWindowRemaining: 45m
prometheus:
  url: http://prometheus.monitoring:9090
  timeout: 3s
  interval: 5s
healthGate:
  nodesReady: true
  podDisruptionBudgets: true
  query: 'up{job="node"} == 0'
alertBlockers:
  alerts: [KubeAPIDown, EtcdNoLeader]
stuckLocks:
  releaseDeletedNodes: true
  forceReleaseOverdueAfter: 2h
webhooks:
  - url: https://hooks.example.invalid/services/T0/B0/X
    events: [granted, failed, overdue, paused, finished]
    template: '{"text": "baton: {{event}} {{node}} {{reason}}"}'
"#;

#[test]
fn a_good_file_overrides_the_flag_defaults() {
    let loaded = parse_text(GOOD, &flags()).unwrap();
    assert_eq!(loaded.engine_policy.max_concurrent, 2);
    assert_eq!(loaded.engine_policy.windows.windows.len(), 1);
    assert_eq!(
        loaded.engine_policy.windows.min_remaining,
        chrono::Duration::minutes(45)
    );
    assert_eq!(loaded.sha256.len(), 64);
    // What `batonctl policy` shows parses back to the same policy.
    let again: PolicyFile = serde_norway::from_str(&loaded.yaml()).unwrap();
    assert_eq!(again, loaded.effective);
}

#[test]
fn without_a_file_the_flags_are_the_policy() {
    let f = FlagDefaults {
        max_concurrent: Some(3),
        windows: vec!["Sat 01:00-05:00 UTC".into()],
        ..flags()
    };
    let loaded = parse(None, "", &f, Utc::now()).unwrap();
    assert_eq!(loaded.engine_policy.max_concurrent, 3);
    assert_eq!(loaded.engine_policy.windows.windows.len(), 1);
    assert_eq!(
        loaded.engine_policy.windows.min_remaining,
        chrono::Duration::minutes(30)
    );
    assert_eq!(loaded.source, "flags");
    let bad = FlagDefaults {
        windows: vec!["Someday".into()],
        ..flags()
    };
    let e = parse(None, "", &bad, Utc::now()).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("--window"));
}

#[test]
fn syntax_errors_and_unknown_fields_carry_their_line() {
    let e = parse_text("maxConcurrent: 2\nwindows: [\n", &flags()).unwrap_err();
    assert!(e.line.is_some(), "{e}");
    let e = parse_text(
        "maxConcurrent: 2\nhealthGate:\n  nodesReady: true\n  querry: x\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.line, Some(4), "{e}");
    assert!(e.message.contains("querry"), "{e}");
    assert!(e.to_string().starts_with("policy.yaml:4:"), "{e}");
    // A value checked while parsing: the line of the bad window.
    let e = parse_text(
        "windows:\n  - \"Mon 22:00-04:00 UTC\"\n  - \"Funday 1-2\"\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = parse_text("prometheus:\n  url: ftp://x\n", &flags()).unwrap_err();
    assert_eq!(e.line, Some(2), "{e}");
}

#[test]
fn a_setting_in_both_places_is_an_error_naming_both() {
    let f = FlagDefaults {
        max_concurrent: Some(3),
        ..flags()
    };
    let e = parse_text("# header\nmaxConcurrent: 2\n", &f).unwrap_err();
    assert_eq!(e.line, Some(2));
    assert!(e.message.contains("--max-concurrent=3"), "{e}");
    assert_eq!(e.field.as_deref(), Some("maxConcurrent"));
    let f = FlagDefaults {
        windows: vec!["Sat 01:00-05:00 UTC".into()],
        ..flags()
    };
    assert!(
        parse_text("windows: []\n", &f)
            .unwrap_err()
            .message
            .contains("--window")
    );
}

#[test]
fn checks_across_fields_name_the_field_and_line() {
    let e = parse_text(
        "healthGate:\n  nodesReady: false\n  podDisruptionBudgets: false\n  query: up == 0\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("healthGate.query"));
    assert_eq!(e.line, Some(4));
    let e = parse_text(
        "webhooks:\n  - url: http://a\n  - url: http://b\n    template: '{\"a\": {{node}}}'\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("webhooks[1].template"));
    assert_eq!(e.line, Some(4));
    let e = parse_text("stuckLocks:\n  forceReleaseOverdueAfter: 10m\n", &flags()).unwrap_err();
    assert!(e.message.contains("--overdue-after"), "{e}");
    let standalone = FlagDefaults {
        kubernetes: false,
        ..flags()
    };
    let e = parse_text("healthGate: {}\n", &standalone).unwrap_err();
    assert!(e.message.contains("Kubernetes"), "{e}");
    let e = parse_text("alertBlockers:\n  alerts: [A]\n", &flags()).unwrap_err();
    assert!(e.message.contains("prometheus"), "{e}");
    let e = parse_text("maxConcurrent: 0\n", &flags()).unwrap_err();
    assert_eq!(e.line, Some(1));
}

#[test]
fn canaries_name_valid_nodes() {
    let e = parse_text(
        "pools:\n  - name: a\n    selector:\n      nodeNames: [\"a-*\"]\n    canary:\n      nodes: [a-1, A_2]\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.field.as_deref(), Some("pools[0].canary.nodes[1]"));
    assert_eq!(e.line, Some(6));
    let e = parse_text("canary:\n  nodes: [\"\"]\n", &flags()).unwrap_err();
    assert_eq!(e.field.as_deref(), Some("canary.nodes[0]"));
    let e = parse_text("failureBudget:\n  maxFailedNodes: 0\n", &flags()).unwrap_err();
    assert_eq!(e.line, Some(2));
}

#[test]
fn pools_are_checked() {
    let e = parse_text(
        "pools:\n  - name: a\n    selector: {nodeNames: [\"a-*\"]}\n  - name: a\n    selector: {nodeNames: [\"b-*\"]}\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(
        (e.field.as_deref(), e.line),
        (Some("pools[1].name"), Some(4)),
        "{e}"
    );
    let e = parse_text("pools:\n  - name: a\n    selector: {}\n", &flags()).unwrap_err();
    assert!(e.message.contains("selects every node"), "{e}");
    let e = parse_text(
        "pools:\n  - name: a\n    selector:\n      matchExpressions:\n        - key: zone\n          operator: Exists\n          values: [x]\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(
        e.field.as_deref(),
        Some("pools[0].selector.matchExpressions[0]")
    );
    assert_eq!(e.line, Some(5));
    let e = parse_text("topology:\n  maxZonesInMaintenance: 0\n", &flags()).unwrap_err();
    assert_eq!(e.line, Some(2));
}

#[test]
fn oversized_files_are_refused_before_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, "#".repeat(MAX_POLICY_BYTES + 1)).unwrap();
    let e = load(Some(&path), &flags(), Utc::now()).unwrap_err();
    assert!(e.message.contains("limit"), "{e}");
    let e = load(Some(&dir.path().join("missing.yaml")), &flags(), Utc::now()).unwrap_err();
    assert!(e.message.contains("cannot read"), "{e}");
}

#[test]
fn value_errors_point_at_the_value() {
    let e = parse_text(
        "prometheus:\n  url: http://x\n  timeout: 5 parsecs\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!((e.line, e.column), (Some(3), Some(12)), "{e}");
    assert!(!e.message.contains('\u{0}'), "{e:?}");
    let e = parse_text(
        "webhooks:\n  - url: http://x\n    events: [granted, exploded]\n",
        &flags(),
    )
    .unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn the_readme_example_is_a_valid_policy() {
    let readme = include_str!("../../../../README.md");
    let start = readme
        .find("<!-- policy-example -->")
        .expect("marker in the README");
    let block = &readme[start..];
    let yaml_start = block.find("```yaml\n").unwrap() + "```yaml\n".len();
    let yaml = &block[yaml_start..yaml_start + block[yaml_start..].find("```").unwrap()];
    let loaded = parse_text(yaml, &flags()).unwrap();
    assert_eq!(loaded.effective.pools.len(), 3);
    assert_eq!(loaded.engine_policy.max_concurrent, 3);
}
