//! The lab's nodes: systemd-nspawn containers from the test harness
//! ([`baton_tests::nspawn`]: the cached debootstrap rootfs, a copy per
//! node, the boot loop that boots a node again when it exits 133, boot
//! records on the host, the agent as a systemd service).
//!
//! On top of the harness this module adds what makes them a cluster:
//! - etcd nodes run their etcd member as a systemd unit inside the node
//!   (stacked etcd), on the node's own loopback address (`SUBNET.N`, ports
//!   2379 and 2380), with its data in the node's rootfs, so a reboot of the
//!   node really takes its member down and brings it back with its data;
//!   the etcd and etcdctl binaries are the host's, bind-mounted read-only;
//! - every agent talks mutual TLS to the coordinators through the lab's
//!   front address, with the node's own certificate;
//! - the update is a real apt upgrade from the lab's repository; small
//!   scripts around it record, on the node's disk, when the update and the
//!   post-check ran (the lab's own instrumentation, read at the end).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use baton_tests::nspawn::{Node, NodeSpec};

use super::certs::LabCa;

/// The demo package the update upgrades.
pub const PACKAGE: &str = "baton-demo";

/// One node as the lab plans it.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The node's name (also its etcd member's and its certificate's).
    pub name: String,
    /// The node's etcd member's address (etcd nodes only).
    pub etcd_addr: Option<String>,
}

impl Plan {
    /// True for nodes that carry an etcd member.
    pub fn is_etcd(&self) -> bool {
        self.etcd_addr.is_some()
    }

    /// The member's client URL (etcd nodes only).
    pub fn client_url(&self) -> Option<String> {
        self.etcd_addr.as_ref().map(|a| format!("http://{a}:2379"))
    }
}

/// The nodes of a lab with `etcd` etcd nodes and `workers` workers.
pub fn plan(etcd: usize, workers: usize, subnet: &str) -> Vec<Plan> {
    (1..=etcd)
        .map(|i| Plan {
            name: format!("etcd-{i}"),
            etcd_addr: Some(format!("{subnet}.{i}")),
        })
        .chain((1..=workers).map(|i| Plan {
            name: format!("worker-{i}"),
            etcd_addr: None,
        }))
        .collect()
}

/// `--initial-cluster` of the etcd members.
fn initial_cluster(plans: &[Plan]) -> String {
    plans
        .iter()
        .filter_map(|p| Some(format!("{}=http://{}:2380", p.name, p.etcd_addr.as_ref()?)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Where the lab finds things on the host.
pub struct Inputs<'a> {
    /// The agent binary.
    pub agent: &'a Path,
    /// The host's etcd and etcdctl.
    pub etcd: &'a Path,
    /// The host's etcdctl.
    pub etcdctl: &'a Path,
    /// The local apt repository (bind-mounted at /repo).
    pub repo: &'a Path,
    /// Version 1 of the demo package, installed before the first boot.
    pub v1: &'a Path,
    /// The lab's CA.
    pub ca: &'a LabCa,
    /// Where per-node files (its certificate) go.
    pub dir: &'a Path,
    /// The front address the agents reach the coordinators at.
    pub coordinator_url: &'a str,
    /// How often agents check for updates.
    pub check_interval: &'a str,
}

const UPDATE_CHECK: &str = "#!/bin/sh\n\
# Exit 0 when an upgrade of the demo package is available.\n\
apt-get update -qq >/dev/null 2>&1 || exit 1\n\
apt-get -s upgrade 2>/dev/null | grep -q '^Inst baton-demo'\n";

const UPDATE: &str = "#!/bin/sh\n\
# The update, with its start and end recorded on the node's disk.\n\
set -e\n\
echo \"update-start $(date +%s.%N)\" >> /var/lib/lab/timings\n\
apt-get update -q\n\
DEBIAN_FRONTEND=noninteractive apt-get -y -q upgrade\n\
echo \"update-end $(date +%s.%N)\" >> /var/lib/lab/timings\n";

/// The post-check of an etcd node: its member answers a linearizable read
/// (it has rejoined and caught up). Bounded: a member that does not come
/// back fails the maintenance, which stops the rollout.
fn etcd_post_check(addr: &str) -> String {
    format!(
        "#!/bin/sh\n\
         echo \"check-start $(date +%s.%N)\" >> /var/lib/lab/timings\n\
         i=0\n\
         until ETCDCTL_API=3 /usr/local/bin/etcdctl --endpoints=http://{addr}:2379 \
         --dial-timeout=1s --command-timeout=2s endpoint health; do\n\
         \x20 i=$((i+1)); [ $i -ge 240 ] && exit 1; sleep 0.25\n\
         done\n\
         echo \"check-end $(date +%s.%N)\" >> /var/lib/lab/timings\n"
    )
}

/// The post-check of a worker: the new version is installed.
const WORKER_POST_CHECK: &str = "#!/bin/sh\n\
echo \"check-start $(date +%s.%N)\" >> /var/lib/lab/timings\n\
dpkg-query -W -f '${Version}' baton-demo | grep -qx 2\n\
echo \"check-end $(date +%s.%N)\" >> /var/lib/lab/timings\n";

fn etcd_unit(plan: &Plan, cluster: &str) -> String {
    let addr = plan.etcd_addr.as_deref().unwrap_or_default();
    format!(
        "[Unit]\n\
         Description=etcd member {name} (stacked etcd of the baton lab)\n\
         \n\
         [Service]\n\
         ExecStart=/usr/local/bin/etcd --name {name} --data-dir /var/lib/etcd/{name} \
         --listen-client-urls http://{addr}:2379 --advertise-client-urls http://{addr}:2379 \
         --listen-peer-urls http://{addr}:2380 --initial-advertise-peer-urls http://{addr}:2380 \
         --initial-cluster {cluster} --initial-cluster-state new \
         --initial-cluster-token baton-lab --heartbeat-interval 100 --election-timeout 1000 \
         --logger zap --log-level warn\n\
         Restart=always\n\
         RestartSec=1\n\
         StandardOutput=append:/var/log/etcd.log\n\
         StandardError=append:/var/log/etcd.log\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        name = plan.name,
    )
}

/// What the agents of the lab's control-plane nodes back up before their
/// maintenance: the certificates and the kubeadm configuration, where a
/// kubeadm control plane keeps them.
pub const BACKUP_PATHS: &str = "/etc/kubernetes/pki,/etc/kubernetes/kubeadm-config.yaml";

/// The files that make an etcd node look like a kubeadm control-plane node
/// to its agent's backup: `/etc/kubernetes/pki` (the lab's CA and the
/// node's own pair as the API server's, keys 0600) and a kubeadm
/// configuration. Written on the host under the node's directory and
/// bind-mounted read-only, as the DaemonSet mounts `/etc/kubernetes`.
fn control_plane_files(
    plan: &Plan,
    inputs: &Inputs,
    pair: &super::certs::Pair,
) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = inputs.dir.join(&plan.name).join("kubernetes");
    let pki = root.join("pki");
    std::fs::create_dir_all(&pki)?;
    for (from, to, mode) in [
        (&inputs.ca.ca, "ca.crt", 0o644),
        (&pair.cert, "apiserver.crt", 0o644),
        (&pair.key, "apiserver.key", 0o600),
    ] {
        let path = pki.join(to);
        std::fs::copy(from, &path).with_context(|| format!("copying {}", from.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    let addr = plan.etcd_addr.as_deref().unwrap_or("127.0.0.1");
    std::fs::write(
        root.join("kubeadm-config.yaml"),
        format!(
            "apiVersion: kubeadm.k8s.io/v1beta3\n\
             kind: ClusterConfiguration\n\
             clusterName: baton-lab\n\
             etcd:\n  local:\n    dataDir: /var/lib/etcd\n\
             # {name}'s member listens on {addr}\n",
            name = plan.name,
        ),
    )?;
    Ok(root)
}

/// The harness's spec for `plan`.
pub fn spec(plan: &Plan, plans: &[Plan], inputs: &Inputs) -> Result<NodeSpec> {
    let tls_dir = inputs.dir.join(&plan.name).join("tls");
    std::fs::create_dir_all(&tls_dir)?;
    let pair = inputs.ca.node(&plan.name)?;
    for (from, to) in [
        (&inputs.ca.ca, "ca.pem"),
        (&pair.cert, "node.pem"),
        (&pair.key, "node-key.pem"),
    ] {
        std::fs::copy(from, tls_dir.join(to))
            .with_context(|| format!("copying {}", from.display()))?;
    }
    let post_check = match &plan.etcd_addr {
        Some(addr) => etcd_post_check(addr),
        None => WORKER_POST_CHECK.to_string(),
    };
    let mut spec = NodeSpec::new(&plan.name, inputs.coordinator_url)
        .without_env("BATON_INSECURE")
        .env("BATON_CA", "/etc/baton/tls/ca.pem")
        .env("BATON_CERT", "/etc/baton/tls/node.pem")
        .env("BATON_KEY", "/etc/baton/tls/node-key.pem")
        .env("BATON_CHECK_INTERVAL", inputs.check_interval)
        .env("BATON_CHECK_TIMEOUT", "60s")
        .env(
            "BATON_UPDATE_CHECK_COMMAND",
            "/bin/sh /usr/local/sbin/lab-update-check",
        )
        .env("BATON_UPDATE_COMMAND", "/bin/sh /usr/local/sbin/lab-update")
        .env("BATON_UPDATE_TIMEOUT", "5m")
        .env(
            "BATON_POST_CHECK_COMMAND",
            "/bin/sh /usr/local/sbin/lab-post-check",
        )
        .env("BATON_POST_CHECK_TIMEOUT", "2m")
        .env("BATON_REBOOT_TIMEOUT", "2m")
        // The lab runs in minutes, not hours: a maintenance aborted before
        // the node went down (a backup refused after a failover) is asked
        // again soon, as its hold-back would after 5 minutes in production.
        .env("BATON_ABORT_BACKOFF", "10s")
        .env("RUST_LOG", "info")
        .file("usr/local/sbin/lab-update-check", UPDATE_CHECK)
        .file("usr/local/sbin/lab-update", UPDATE)
        .file("usr/local/sbin/lab-post-check", &post_check)
        .file("var/lib/lab/timings", "")
        .bind_ro(&tls_dir, "/etc/baton/tls");
    if plan.is_etcd() {
        let kubernetes = control_plane_files(plan, inputs, &pair)?;
        spec = spec
            .env("BATON_CONTROL_PLANE", "true")
            .env("BATON_BACKUP_PATHS", BACKUP_PATHS)
            .bind_ro(&kubernetes, "/etc/kubernetes")
            .unit("etcd.service", &etcd_unit(plan, &initial_cluster(plans)))
            .bind_ro(inputs.etcd, "/usr/local/bin/etcd")
            .bind_ro(inputs.etcdctl, "/usr/local/bin/etcdctl");
    }
    spec.agent_binary = Some(inputs.agent.to_path_buf());
    spec.repo = Some(inputs.repo.to_path_buf());
    spec.preinstall = vec![inputs.v1.to_path_buf()];
    Ok(spec)
}

/// Boots every node at once (each copies the rootfs and boots it in its
/// own thread); the first error wins, and the nodes already booted are
/// dropped (stopped) with it.
pub fn boot_all(specs: Vec<NodeSpec>) -> Result<Vec<Node>> {
    let handles: Vec<_> = specs
        .into_iter()
        .map(|spec| {
            let name = spec.name.clone();
            (name, std::thread::spawn(move || Node::boot(spec)))
        })
        .collect();
    let mut nodes = Vec::new();
    let mut first_error = None;
    for (name, handle) in handles {
        match handle.join() {
            Ok(Ok(node)) => nodes.push(node),
            Ok(Err(e)) => {
                first_error.get_or_insert(e.context(format!("booting {name}")));
            }
            Err(_) => {
                first_error.get_or_insert(anyhow::anyhow!("booting {name} panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(nodes),
    }
}

/// What the lab reads from a node's disk at the end: the update's and the
/// post-check's start and end (seconds since the epoch), in order.
pub fn timings(rootfs: &Path) -> Vec<(String, f64)> {
    std::fs::read_to_string(rootfs.join("var/lib/lab/timings"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (what, when) = l.split_once(' ')?;
            Some((what.to_string(), when.trim().parse().ok()?))
        })
        .collect()
}

/// Processes on the host, found by their command line: every agent (by the
/// `BATON_NODE` in its environment) and every etcd member (by `--name`).
#[derive(Debug, Default, Clone)]
pub struct Processes {
    /// node → the agent's PID.
    pub agents: BTreeMap<String, i32>,
    /// member → etcd's PID.
    pub members: BTreeMap<String, i32>,
}

/// One scan of /proc.
pub fn scan_processes() -> Processes {
    let mut found = Processes::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        match args.first() {
            Some(&b"/usr/local/bin/baton-agent") => {
                let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
                if let Some(node) = environ
                    .split(|b| *b == 0)
                    .find_map(|kv| kv.strip_prefix(b"BATON_NODE="))
                {
                    found
                        .agents
                        .insert(String::from_utf8_lossy(node).into_owned(), pid);
                }
            }
            Some(&b"/usr/local/bin/etcd") => {
                if let Some(i) = args.iter().position(|a| *a == b"--name")
                    && let Some(name) = args.get(i + 1)
                {
                    found
                        .members
                        .insert(String::from_utf8_lossy(name).into_owned(), pid);
                }
            }
            _ => {}
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_gives_etcd_nodes_their_own_addresses() {
        let plans = plan(3, 2, "127.0.1");
        assert_eq!(plans.len(), 5);
        assert_eq!(plans[0].name, "etcd-1");
        assert_eq!(plans[2].etcd_addr.as_deref(), Some("127.0.1.3"));
        assert!(!plans[4].is_etcd());
        assert_eq!(
            initial_cluster(&plans),
            "etcd-1=http://127.0.1.1:2380,etcd-2=http://127.0.1.2:2380,etcd-3=http://127.0.1.3:2380"
        );
    }

    #[test]
    fn timings_skip_garbage() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("var/lib/lab")).unwrap();
        std::fs::write(
            dir.path().join("var/lib/lab/timings"),
            "update-start 10.5\nnonsense\nupdate-end 12.25\n",
        )
        .unwrap();
        assert_eq!(
            timings(dir.path()),
            vec![("update-start".into(), 10.5), ("update-end".into(), 12.25)]
        );
    }
}
