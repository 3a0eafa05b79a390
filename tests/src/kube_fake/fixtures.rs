//! Small builders of the objects tests put into the fake (and plain
//! functions for ServiceAccounts and Leases):
//! `node("n1").control_plane().ready(false)`, `pod("apps", "web-1").on("n1")
//! .owned_by("ReplicaSet").label("app", "web")`, `pdb("apps", "web")
//! .min_available(1).selecting("app", "web")`.

use serde_json::{Value, json};

/// A Node builder.
pub struct NodeBuilder(Value);

/// A Ready, schedulable node.
pub fn node(name: &str) -> NodeBuilder {
    NodeBuilder(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
            "nodeInfo": {"bootID": "boot-1", "machineID": "m", "systemUUID": "s", "kernelVersion": "6.1", "osImage": "Debian",
                "containerRuntimeVersion": "containerd://1.7", "kubeletVersion": "v1.33.0", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
        },
    }))
}

impl NodeBuilder {
    /// Labels it a control-plane node.
    pub fn control_plane(mut self) -> Self {
        self.0["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = json!("");
        self
    }
    /// Sets its Ready condition.
    pub fn ready(mut self, ready: bool) -> Self {
        self.0["status"]["conditions"][0]["status"] = json!(if ready { "True" } else { "False" });
        self
    }
    /// Cordons it.
    pub fn unschedulable(mut self) -> Self {
        self.0["spec"]["unschedulable"] = json!(true);
        self
    }
    /// Sets the boot id the kubelet reports.
    pub fn boot_id(mut self, boot_id: &str) -> Self {
        self.0["status"]["nodeInfo"]["bootID"] = json!(boot_id);
        self
    }
    /// The object.
    pub fn build(self) -> Value {
        self.0
    }
}

/// A Pod builder.
pub struct PodBuilder(Value);

/// A Running, Ready pod with no owner, a 1 s grace period, on no node.
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {}},
        "spec": {"containers": [{"name": "main", "image": "registry.example/app:1"}], "terminationGracePeriodSeconds": 1},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }))
}

impl PodBuilder {
    /// Binds it to `node`.
    pub fn on(mut self, node: &str) -> Self {
        self.0["spec"]["nodeName"] = json!(node);
        self
    }
    /// Gives it a controller owner of `kind`.
    pub fn owned_by(mut self, kind: &str) -> Self {
        self.0["metadata"]["ownerReferences"] = json!([{
            "apiVersion": "apps/v1", "kind": kind, "name": "owner", "uid": "owner-uid", "controller": true,
        }]);
        self
    }
    /// Makes it a mirror pod of a static pod.
    pub fn mirror(mut self) -> Self {
        self.0["metadata"]["annotations"] = json!({"kubernetes.io/config.mirror": "hash"});
        self
    }
    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.0["metadata"]["labels"][key] = json!(value);
        self
    }
    /// Sets the termination grace period.
    pub fn grace(mut self, seconds: u64) -> Self {
        self.0["spec"]["terminationGracePeriodSeconds"] = json!(seconds);
        self
    }
    /// Serves `port` (a container port named `port_name`) at `ip`, which
    /// the fake's port-forward connects to.
    pub fn serving(mut self, ip: &str, port_name: &str, port: u16) -> Self {
        self.0["status"]["podIP"] = json!(ip);
        self.0["spec"]["containers"][0]["ports"] =
            json!([{"name": port_name, "containerPort": port, "protocol": "TCP"}]);
        self
    }
    /// Sets its phase (Pending, Succeeded, ...).
    pub fn phase(mut self, phase: &str) -> Self {
        self.0["status"]["phase"] = json!(phase);
        self
    }
    /// Adds an emptyDir volume.
    pub fn empty_dir(mut self) -> Self {
        self.0["spec"]["volumes"] = json!([{"name": "scratch", "emptyDir": {}}]);
        self
    }
    /// The object.
    pub fn build(self) -> Value {
        self.0
    }
}

/// A PodDisruptionBudget builder.
pub struct PdbBuilder(Value);

/// A budget selecting nothing yet.
pub fn pdb(namespace: &str, name: &str) -> PdbBuilder {
    PdbBuilder(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"selector": {"matchLabels": {}}},
    }))
}

impl PdbBuilder {
    /// Requires `n` healthy pods.
    pub fn min_available(mut self, n: i64) -> Self {
        self.0["spec"]["minAvailable"] = json!(n);
        self
    }
    /// Selects pods labelled `key=value`.
    pub fn selecting(mut self, key: &str, value: &str) -> Self {
        self.0["spec"]["selector"]["matchLabels"][key] = json!(value);
        self
    }
    /// The object.
    pub fn build(self) -> Value {
        self.0
    }
}

/// A ServiceAccount.
pub fn service_account(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
}

/// A coordination.k8s.io/v1 Lease held by `holder` (renewed now).
pub fn lease(namespace: &str, name: &str, holder: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": super::now_rfc3339().replace('Z', ".000000Z")},
    })
}
