//! Which pods a drain evicts, skips, waits for or refuses: a pure function
//! of the pods on the node and the drain options, so every rule is unit
//! tested without an API server.
//!
//! The rules follow `kubectl drain`: DaemonSet-managed pods would be
//! recreated on the node at once and mirror (static) pods cannot be evicted
//! through the API, so both are skipped; finished pods hold nothing; pods
//! already terminating are waited for but not evicted again; a pod with
//! `emptyDir` data loses it and an unmanaged pod (no controller) is never
//! recreated, so both refuse the drain unless the operator opted in.

use k8s_openapi::api::core::v1::Pod;

/// The annotation the kubelet puts on mirror pods of static pods.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// The grace period Kubernetes applies when a pod does not set one.
pub const DEFAULT_GRACE_SECONDS: i64 = 30;

/// A pod by namespace and name, with what waiting for it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID, so a replacement pod with the same name is not mistaken for it.
    pub uid: String,
    /// Its termination grace period in seconds.
    pub grace_seconds: i64,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Managed by a DaemonSet (it would come straight back).
    DaemonSet,
    /// A mirror pod of a static pod (the kubelet owns it).
    Mirror,
    /// Succeeded or Failed: nothing runs.
    Finished,
}

/// Why a pod refuses the drain unless the operator opted in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// It has `emptyDir` data, lost on eviction (`--delete-emptydir-data`).
    EmptyDirData,
    /// No controller would recreate it (`--evict-unmanaged-pods`).
    Unmanaged,
}

impl Refusal {
    /// The flag that allows evicting such pods.
    pub fn flag(self) -> &'static str {
        match self {
            Refusal::EmptyDirData => "--delete-emptydir-data",
            Refusal::Unmanaged => "--evict-unmanaged-pods",
        }
    }

    /// A short description.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::EmptyDirData => "has emptyDir data that eviction deletes",
            Refusal::Unmanaged => "is not managed by a controller and would not be recreated",
        }
    }
}

/// What the operator allows a drain to evict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Allowances {
    /// Evict pods with emptyDir volumes.
    pub delete_emptydir_data: bool,
    /// Evict pods no controller manages.
    pub evict_unmanaged: bool,
}

/// The drain's plan for the pods on a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DrainPlan {
    /// Pods to evict.
    pub evict: Vec<PodRef>,
    /// Pods already terminating: waited for, not evicted.
    pub terminating: Vec<PodRef>,
    /// Pods left alone, with why.
    pub skipped: Vec<(PodRef, Skip)>,
    /// Pods that refuse the drain, with why. A plan with refusals must not
    /// be carried out at all.
    pub refused: Vec<(PodRef, Refusal)>,
}

/// The reference of `pod`.
pub fn pod_ref(pod: &Pod) -> PodRef {
    PodRef {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        grace_seconds: pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(DEFAULT_GRACE_SECONDS),
    }
}

/// Decides what to do with each of `pods` (the pods bound to the node,
/// already narrowed by `--drain-pod-selector`).
pub fn plan(pods: &[Pod], allow: Allowances) -> DrainPlan {
    let mut plan = DrainPlan::default();
    for pod in pods {
        let r = pod_ref(pod);
        let owner = pod
            .metadata
            .owner_references
            .as_deref()
            .unwrap_or_default()
            .iter()
            .find(|o| o.controller == Some(true));
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let annotations = pod.metadata.annotations.as_ref();
        let has_empty_dir = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .is_some_and(|v| v.iter().any(|v| v.empty_dir.is_some()));
        if annotations.is_some_and(|a| a.contains_key(MIRROR_ANNOTATION)) {
            plan.skipped.push((r, Skip::Mirror));
        } else if owner.is_some_and(|o| o.kind == "DaemonSet") {
            plan.skipped.push((r, Skip::DaemonSet));
        } else if matches!(phase, Some("Succeeded" | "Failed")) {
            plan.skipped.push((r, Skip::Finished));
        } else if pod.metadata.deletion_timestamp.is_some() {
            plan.terminating.push(r);
        } else if owner.is_none() && !allow.evict_unmanaged {
            plan.refused.push((r, Refusal::Unmanaged));
        } else if has_empty_dir && !allow.delete_emptydir_data {
            plan.refused.push((r, Refusal::EmptyDirData));
        } else {
            plan.evict.push(r);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, PodSpec, PodStatus, Volume};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    use super::*;

    /// A pod builder: `pod("web-1").owned_by("ReplicaSet")`.
    struct PodBuilder(Pod);

    fn pod(name: &str) -> PodBuilder {
        PodBuilder(Pod {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                namespace: Some("apps".to_string()),
                uid: Some(format!("uid-{name}")),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                phase: Some("Running".to_string()),
                ..PodStatus::default()
            }),
        })
    }

    impl PodBuilder {
        fn owned_by(mut self, kind: &str) -> Self {
            self.0.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "apps/v1".to_string(),
                kind: kind.to_string(),
                name: "owner".to_string(),
                uid: "owner-uid".to_string(),
                controller: Some(true),
                block_owner_deletion: None,
            }]);
            self
        }
        fn mirror(mut self) -> Self {
            self.0.metadata.annotations =
                Some([(MIRROR_ANNOTATION.to_string(), "hash".to_string())].into());
            self
        }
        fn empty_dir(mut self) -> Self {
            if let Some(spec) = self.0.spec.as_mut() {
                spec.volumes = Some(vec![Volume {
                    name: "scratch".to_string(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Volume::default()
                }]);
            }
            self
        }
        fn phase(mut self, phase: &str) -> Self {
            if let Some(status) = self.0.status.as_mut() {
                status.phase = Some(phase.to_string());
            }
            self
        }
        fn grace(mut self, seconds: i64) -> Self {
            if let Some(spec) = self.0.spec.as_mut() {
                spec.termination_grace_period_seconds = Some(seconds);
            }
            self
        }
        fn build(self) -> Pod {
            self.0
        }
    }

    fn names(refs: &[PodRef]) -> Vec<&str> {
        refs.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn daemonset_mirror_and_finished_pods_are_skipped() {
        let pods = [
            pod("ds").owned_by("DaemonSet").build(),
            pod("static").mirror().build(),
            pod("done").owned_by("Job").phase("Succeeded").build(),
            pod("web").owned_by("ReplicaSet").grace(7).build(),
        ];
        let p = plan(&pods, Allowances::default());
        assert_eq!(
            p.skipped
                .iter()
                .map(|(r, s)| (r.name.as_str(), *s))
                .collect::<Vec<_>>(),
            vec![
                ("ds", Skip::DaemonSet),
                ("static", Skip::Mirror),
                ("done", Skip::Finished)
            ]
        );
        assert_eq!(names(&p.evict), vec!["web"]);
        assert_eq!(p.evict[0].grace_seconds, 7);
        assert!(p.refused.is_empty());
    }

    #[test]
    fn unmanaged_and_empty_dir_pods_refuse_unless_allowed() {
        let pods = [
            pod("bare").build(),
            pod("cache").owned_by("ReplicaSet").empty_dir().build(),
        ];
        let p = plan(&pods, Allowances::default());
        assert_eq!(
            p.refused
                .iter()
                .map(|(r, why)| (r.name.as_str(), *why))
                .collect::<Vec<_>>(),
            vec![
                ("bare", Refusal::Unmanaged),
                ("cache", Refusal::EmptyDirData)
            ]
        );
        assert!(p.evict.is_empty());
        let p = plan(
            &pods,
            Allowances {
                delete_emptydir_data: true,
                evict_unmanaged: true,
            },
        );
        assert!(p.refused.is_empty());
        assert_eq!(names(&p.evict), vec!["bare", "cache"]);
    }

    #[test]
    fn terminating_pods_are_waited_for_not_evicted() {
        let mut going = pod("going").owned_by("ReplicaSet").build();
        going.metadata.deletion_timestamp =
            serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).ok();
        assert!(going.metadata.deletion_timestamp.is_some());
        let p = plan(&[going], Allowances::default());
        assert_eq!(names(&p.terminating), vec!["going"]);
        assert!(p.evict.is_empty());
    }

    #[test]
    fn default_grace_period_applies() {
        let p = plan(
            &[pod("web").owned_by("ReplicaSet").build()],
            Allowances::default(),
        );
        assert_eq!(p.evict[0].grace_seconds, DEFAULT_GRACE_SECONDS);
    }
}
