//! The pure rules of the fake API server: selectors, merge patches and
//! disruption budgets, on plain `serde_json` values.

use serde_json::Value;

/// Formats Unix seconds as an RFC 3339 UTC timestamp.
pub fn rfc3339(unix_seconds: u64) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp(unix_seconds as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Decodes a `application/x-www-form-urlencoded` query into pairs.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True when `labels` satisfy an equality-based label selector string
/// (`a=b,c!=d,e,!f`; `==` is `=`). Set-based terms (`in`, `notin`) are not
/// supported by the fake and match nothing, so a test using them fails
/// loudly instead of passing by accident.
pub fn labels_match(selector: &str, labels: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let get = |k: &str| labels.get(k.trim()).and_then(Value::as_str);
            if term.contains(" in ") || term.contains(" notin ") || term.contains('(') {
                false
            } else if let Some((k, v)) = term.split_once("!=") {
                get(k) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                get(k) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                get(k).is_none()
            } else {
                get(term).is_some()
            }
        })
}

/// True when `labels` satisfy a structured `LabelSelector` (`matchLabels`
/// and `matchExpressions` with In, NotIn, Exists, DoesNotExist). An empty
/// selector matches everything, as in policy/v1.
pub fn label_selector_matches(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let match_labels = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let expressions = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|v| v.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => get(key).is_some_and(|v| values.contains(&v)),
                Some("NotIn") => get(key).is_none_or(|v| !values.contains(&v)),
                Some("Exists") => get(key).is_some(),
                Some("DoesNotExist") => get(key).is_none(),
                _ => false,
            }
        })
    });
    match_labels && expressions
}

/// True when `object` satisfies a field selector (`spec.nodeName=n,
/// metadata.name!=x`), comparing the dotted path's string value.
pub fn fields_match(selector: &str, object: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .all(|term| {
            let lookup = |path: &str| {
                path.trim()
                    .split('.')
                    .try_fold(object, |v, seg| v.get(seg))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string()
            };
            if let Some((path, v)) = term.split_once("!=") {
                lookup(path) != v.trim()
            } else if let Some((path, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                lookup(path) == v.trim()
            } else {
                false
            }
        })
}

/// The most bytes a ConfigMap's (or Secret's) data may hold, keys included
/// (the API server's `MaxSecretSize`, 1 MiB).
pub const CONFIGMAP_MAX_BYTES: usize = 1024 * 1024;

/// The most bytes of an Event's message: the events.k8s.io API's limit on
/// `note`. The core/v1 API checks only the object's total size; the fake
/// applies the stricter limit to both, so an Event that passes here reads
/// the same through either API.
pub const EVENT_MESSAGE_MAX_BYTES: usize = 1024;
/// The most characters of an Event's reason (events.k8s.io's limit).
pub const EVENT_REASON_MAX: usize = 128;

/// Why the API server would refuse an Event: no involved object (kind and
/// name), a reason over [`EVENT_REASON_MAX`], a message over
/// [`EVENT_MESSAGE_MAX_BYTES`], a type other than Normal or Warning.
fn invalid_event(event: &Value) -> Option<String> {
    let name = event["metadata"]["name"].as_str().unwrap_or_default();
    let involved = &event["involvedObject"];
    let problem = if involved["kind"].as_str().unwrap_or_default().is_empty()
        || involved["name"].as_str().unwrap_or_default().is_empty()
    {
        "involvedObject: Required value: kind and name".to_string()
    } else if event["reason"].as_str().unwrap_or_default().len() > EVENT_REASON_MAX {
        format!("reason: Too long: may not be more than {EVENT_REASON_MAX} bytes")
    } else if event["message"].as_str().unwrap_or_default().len() > EVENT_MESSAGE_MAX_BYTES {
        format!("message: Too long: may not be more than {EVENT_MESSAGE_MAX_BYTES} bytes")
    } else if !matches!(event["type"].as_str(), Some("Normal" | "Warning")) {
        format!("type: Unsupported value: {}", event["type"])
    } else {
        return None;
    };
    Some(format!("Event \"{name}\" is invalid: {problem}"))
}

/// Why the API server would refuse `object` as invalid (422), for the
/// limits the fake enforces: a ConfigMap whose `data` and `binaryData`
/// (keys and values, binary data decoded) exceed [`CONFIGMAP_MAX_BYTES`];
/// an Event that breaks [`invalid_event`]'s rules.
pub fn invalid(object: &Value) -> Option<String> {
    if object["kind"] == "Event" {
        return invalid_event(object);
    }
    if object["kind"] != "ConfigMap" {
        return None;
    }
    let text: usize = object["data"]
        .as_object()
        .map(|d| {
            d.iter()
                .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
                .sum()
        })
        .unwrap_or(0);
    // binaryData is base64: every 4 characters carry 3 bytes.
    let binary: usize = object["binaryData"]
        .as_object()
        .map(|d| {
            d.iter()
                .map(|(k, v)| {
                    k.len()
                        + v.as_str()
                            .map_or(0, |s| s.trim_end_matches('=').len() * 3 / 4)
                })
                .sum()
        })
        .unwrap_or(0);
    let total = text + binary;
    (total > CONFIGMAP_MAX_BYTES).then(|| {
        format!(
            "ConfigMap \"{}\" is invalid: []: Too long: must have at most {CONFIGMAP_MAX_BYTES} bytes",
            object["metadata"]["name"].as_str().unwrap_or_default()
        )
    })
}

/// Applies an RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let map = target.as_object_mut().expect("made an object above");
            for (k, v) in fields {
                if v.is_null() {
                    map.remove(k);
                } else {
                    merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// True when a pod counts as healthy for a disruption budget: not being
/// deleted and its Ready condition True.
pub fn pod_healthy(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// How many more pods the budget `pdb` allows to be disrupted, given every
/// pod it selects. Like the disruption controller: `minAvailable` allows
/// `healthy - minAvailable`; `maxUnavailable` allows `maxUnavailable -
/// (expected - healthy)` where expected counts every selected pod. Only
/// integer values are understood (percentages allow nothing).
pub fn disruptions_allowed(pdb: &Value, selected: &[&Value]) -> i64 {
    let healthy = selected.iter().filter(|p| pod_healthy(p)).count() as i64;
    let expected = selected.len() as i64;
    if let Some(min) = pdb["spec"]["minAvailable"].as_i64() {
        healthy - min
    } else if let Some(max) = pdb["spec"]["maxUnavailable"].as_i64() {
        max - (expected - healthy)
    } else {
        0
    }
}

/// The status the disruption controller keeps on a budget, from the pods
/// it selects (integer `minAvailable`/`maxUnavailable` only, as above).
pub fn pdb_status(pdb: &Value, selected: &[&Value]) -> Value {
    let healthy = selected.iter().filter(|p| pod_healthy(p)).count() as i64;
    let expected = selected.len() as i64;
    let desired = if let Some(min) = pdb["spec"]["minAvailable"].as_i64() {
        min
    } else if let Some(max) = pdb["spec"]["maxUnavailable"].as_i64() {
        (expected - max).max(0)
    } else {
        expected
    };
    serde_json::json!({
        "currentHealthy": healthy,
        "desiredHealthy": desired,
        "expectedPods": expected,
        "disruptionsAllowed": disruptions_allowed(pdb, selected).max(0),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_selectors() {
        let labels = json!({"app": "web", "tier": "front"});
        assert!(labels_match("app=web", &labels));
        assert!(labels_match("app==web,tier", &labels));
        assert!(labels_match("app!=db,!gone", &labels));
        assert!(!labels_match("app=db", &labels));
        assert!(!labels_match("app in (web)", &labels));
        assert!(labels_match("", &labels));
    }

    #[test]
    fn structured_selectors() {
        let labels = json!({"app": "web"});
        assert!(label_selector_matches(
            &json!({"matchLabels": {"app": "web"}}),
            &labels
        ));
        assert!(!label_selector_matches(
            &json!({"matchLabels": {"app": "db"}}),
            &labels
        ));
        let expr =
            json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "x"]}]});
        assert!(label_selector_matches(&expr, &labels));
        assert!(label_selector_matches(&json!({}), &labels));
    }

    #[test]
    fn field_selectors_and_queries() {
        let pod = json!({"spec": {"nodeName": "n1"}, "metadata": {"name": "p"}});
        assert!(fields_match("spec.nodeName=n1", &pod));
        assert!(!fields_match("spec.nodeName=n2", &pod));
        assert!(fields_match("metadata.name!=q", &pod));
        let q = parse_query("labelSelector=app%3Dweb%2Ctier&watch=true");
        assert_eq!(
            q[0],
            ("labelSelector".to_string(), "app=web,tier".to_string())
        );
    }

    #[test]
    fn merge_patch_sets_and_removes() {
        let mut v = json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "spec": {}});
        merge_patch(
            &mut v,
            &json!({"metadata": {"labels": {"a": null, "c": "3"}}, "spec": {"unschedulable": true}}),
        );
        assert_eq!(
            v,
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "spec": {"unschedulable": true}})
        );
    }

    #[test]
    fn configmaps_over_one_mebibyte_are_invalid() {
        let cm = |size: usize| json!({"kind": "ConfigMap", "metadata": {"name": "s"}, "data": {"k": "x".repeat(size)}});
        assert_eq!(invalid(&cm(CONFIGMAP_MAX_BYTES - 1)), None);
        let message = invalid(&cm(CONFIGMAP_MAX_BYTES)).unwrap();
        assert!(
            message.contains("Too long: must have at most 1048576 bytes"),
            "{message}"
        );
        assert_eq!(invalid(&json!({"kind": "Lease"})), None);
    }

    #[test]
    fn budgets() {
        let ready = json!({"metadata": {}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let going = json!({"metadata": {"deletionTimestamp": "x"}, "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let min1 = json!({"spec": {"minAvailable": 1}});
        assert_eq!(disruptions_allowed(&min1, &[&ready]), 0);
        assert_eq!(disruptions_allowed(&min1, &[&ready, &ready]), 1);
        let max1 = json!({"spec": {"maxUnavailable": 1}});
        assert_eq!(disruptions_allowed(&max1, &[&ready, &ready]), 1);
        assert_eq!(disruptions_allowed(&max1, &[&ready, &going]), 0);
    }
}
