//! The install manifests: every object in the kustomization's resources
//! parses into its k8s-openapi type with no unknown field (checked by
//! round-tripping: a field the type does not know is dropped on
//! re-serialization, and the difference is reported) and no missing
//! required field (k8s-openapi defaults it, so it shows up on
//! re-serialization as a field we did not write); every RBAC rule says why; and
//! the properties the design relies on hold.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// Every YAML document of `path`, as JSON values.
fn documents(path: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let value =
            Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Paths where `typed` (re-serialized) lost or changed what `original` said.
fn differences(original: &Value, typed: &Value, path: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                match b.get(k) {
                    Some(w) => differences(v, w, &format!("{path}.{k}"), out),
                    None => out.push(format!("{path}.{k} is not a field of this type")),
                }
            }
            // k8s-openapi fills a missing required field with its default and
            // always serializes it; optional fields are skipped when absent.
            for k in b.keys().filter(|k| !a.contains_key(*k)) {
                out.push(format!("{path}.{k} is required but missing"));
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                differences(v, w, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: wrote {a}, the type reads it as {b}")),
    }
}

fn round_trip<T: DeserializeOwned + serde::Serialize>(object: &Value) -> Result<Vec<String>> {
    let typed: T = serde_json::from_value(object.clone())
        .map_err(|e| anyhow::anyhow!("does not parse: {e}"))?;
    let back = serde_json::to_value(&typed)?;
    let mut out = Vec::new();
    differences(object, &back, "", &mut out);
    Ok(out)
}

fn check_object(object: &Value) -> Result<Vec<String>> {
    let kind = object["kind"].as_str().unwrap_or_default();
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<Namespace>(object),
        ("v1", "ServiceAccount") => round_trip::<ServiceAccount>(object),
        ("v1", "Service") => round_trip::<Service>(object),
        ("apps/v1", "DaemonSet") => round_trip::<DaemonSet>(object),
        ("apps/v1", "Deployment") => round_trip::<Deployment>(object),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<PodDisruptionBudget>(object),
        ("networking.k8s.io/v1", "NetworkPolicy") => round_trip::<NetworkPolicy>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<ClusterRole>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<ClusterRoleBinding>(object)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<Role>(object),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<RoleBinding>(object),
        _ => bail!("{api_version} {kind} is not a kind this test knows; add it"),
    }
}

/// The kustomization's resources, checked against the directory listing.
fn resources() -> Result<Vec<PathBuf>> {
    let dir = manifests_dir();
    let kustomization = documents(&dir.join("kustomization.yaml"))?;
    let listed: Vec<String> = kustomization[0]["resources"]
        .as_array()
        .context("kustomization.yaml has resources")?
        .iter()
        .map(|r| {
            r.as_str()
                .map(str::to_string)
                .context("resource is a string")
        })
        .collect::<Result<_>>()?;
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    let listed_set: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(
        listed_set, on_disk,
        "kustomization.yaml resources and the YAML files differ"
    );
    Ok(listed.iter().map(|r| dir.join(r)).collect())
}

fn all_objects() -> Result<Vec<(String, Value)>> {
    let mut objects = Vec::new();
    for path in resources()? {
        let file = path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or_default()
            .to_string();
        for doc in documents(&path)? {
            objects.push((file.clone(), doc));
        }
    }
    Ok(objects)
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_object_parses_into_its_type_without_unknown_fields() -> Result<()> {
    let objects = all_objects()?;
    assert!(objects.len() >= 14, "only {} objects", objects.len());
    let mut problems = Vec::new();
    for (file, object) in &objects {
        let name = format!(
            "{file}: {} {}",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        match check_object(object) {
            Ok(diffs) => problems.extend(diffs.into_iter().map(|d| format!("{name}: {d}"))),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    assert!(
        problems.is_empty(),
        "manifest problems:\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[test]
fn the_round_trip_check_catches_unknown_and_missing_fields() {
    let typo = serde_json::json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"selectr": {"a": "b"}}});
    assert_eq!(
        check_object(&typo).unwrap(),
        vec![".spec.selectr is not a field of this type".to_string()]
    );
    let no_name = serde_json::json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "d"},
        "spec": {"selector": {}, "template": {"spec": {"containers": [{"image": "x"}]}}}});
    let problems = check_object(&no_name).unwrap();
    assert!(
        problems.contains(
            &".spec.template.spec.containers[0].name is required but missing".to_string()
        ),
        "{problems:?}"
    );
}

#[test]
fn every_rbac_rule_says_why() -> Result<()> {
    for file in [
        "rbac-agent.yaml",
        "rbac-coordinator.yaml",
        "rbac-batonctl.yaml",
    ] {
        let text = std::fs::read_to_string(manifests_dir().join(file))?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.trim_start().starts_with("- apiGroups:") {
                let previous = lines[..i]
                    .iter()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .copied()
                    .unwrap_or_default();
                assert!(
                    previous.trim_start().starts_with('#'),
                    "{file}:{}: rule without a comment saying why",
                    i + 1
                );
            }
        }
    }
    Ok(())
}

#[test]
fn workloads_have_the_properties_the_design_relies_on() -> Result<()> {
    let objects = all_objects()?;
    let agent = find(&objects, "DaemonSet", "baton-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "the agent tolerates every taint"
    );
    let container = &pod["containers"][0];
    assert_ne!(container["securityContext"]["privileged"], true);
    assert!(
        container["resources"]["requests"].is_object()
            && container["resources"]["limits"].is_object()
    );
    assert!(container["env"].as_array().is_some_and(|e| {
        e.iter()
            .any(|e| e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    }));
    let volumes = pod["volumes"].as_array().context("volumes")?;
    let host_paths: BTreeSet<&str> = volumes
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            "/run",
            "/run/dbus/system_bus_socket",
            "/var/lib/baton",
            "/var/log",
            "/run/log",
            "/etc/machine-id",
            // The control-plane backup reads /etc/kubernetes/pki.
            "/etc/kubernetes",
        ])
    );
    assert!(
        container["volumeMounts"].as_array().is_some_and(|m| m
            .iter()
            .any(|m| m["mountPath"] == "/etc/kubernetes" && m["readOnly"] == true)),
        "the node's certificates are mounted read-only"
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "baton")
    );

    let coordinator = find(&objects, "Deployment", "baton-coordinator");
    assert_eq!(coordinator["spec"]["replicas"], 2);
    let pod = &coordinator["spec"]["template"]["spec"];
    assert!(pod["affinity"]["podAntiAffinity"].is_object());
    assert_eq!(
        pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/readyz"
    );
    assert_eq!(
        coordinator["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let args: Vec<&str> = pod["containers"][0]["args"]
        .as_array()
        .context("args")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--store=kubernetes") && args.contains(&"--token-review"),
        "{args:?}"
    );

    // Names the code uses must match the manifests.
    let role = find(&objects, "Role", "baton-coordinator");
    let names: Vec<&str> = role["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .flat_map(|r| r["resourceNames"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    assert!(
        names.contains(&"baton-coordinator") && names.contains(&"baton-state"),
        "{names:?}"
    );
    // batonctl --kube: the coordinator admits the batonctl account, which
    // operators reach through the baton-operator Role.
    assert!(
        args.contains(&"--kube-admin=system:serviceaccount:baton-system:batonctl"),
        "{args:?}"
    );
    find(&objects, "ServiceAccount", "batonctl");
    let operator = find(&objects, "Role", "baton-operator");
    let token_rule = operator["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .find(|r| r["resources"][0] == "serviceaccounts/token")
        .context("a serviceaccounts/token rule")?;
    assert_eq!(token_rule["resourceNames"], serde_json::json!(["batonctl"]));
    find(&objects, "PodDisruptionBudget", "baton-coordinator");
    find(&objects, "NetworkPolicy", "baton-coordinator");
    find(&objects, "Service", "baton-coordinator");
    Ok(())
}

#[test]
fn the_readme_install_steps_name_what_the_manifests_and_code_use() -> Result<()> {
    let readme = std::fs::read_to_string(manifests_dir().join("../README.md"))?;
    let install = readme
        .split("## Installing on a Kubernetes cluster")
        .nth(1)
        .context("the install section")?;
    let objects = all_objects()?;
    // The images the task builds, retargeted by the kustomization's names.
    for step in [
        "cargo xtask image",
        "kustomize edit set image",
        "baton-agent=registry.example.com/baton/baton-agent:",
        "baton-coordinator=registry.example.com/baton/baton-coordinator:",
        "kubectl apply -k manifests/\n",
        "kubectl apply -k manifests/monitoring/",
        "install target/release/kubectl-baton",
    ] {
        assert!(
            install.contains(step),
            "README install section lacks {step:?}"
        );
    }
    // The Secret the workloads mount, the Role operators are bound to, the
    // CA ConfigMap batonctl reads by default.
    let deployment = find(&objects, "Deployment", "baton-coordinator");
    let secret = deployment["spec"]["template"]["spec"]["volumes"][0]["secret"]["secretName"]
        .as_str()
        .context("the TLS volume")?;
    assert!(install.contains(&format!("create secret generic {secret}")));
    find(&objects, "Role", "baton-operator");
    assert!(install.contains("--role=baton-operator"));
    let ctl = baton_coordinator::ctl::Cli::try_parse_from(["batonctl", "status"])?;
    assert!(install.contains(&format!(
        "create configmap {} --from-file=ca.crt=",
        ctl.conn.kube.kube_ca_configmap
    )));
    assert_eq!(ctl.conn.kube.kube_namespace, "baton-system");
    Ok(())
}
