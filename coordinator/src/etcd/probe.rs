//! Probes etcd: one client per member endpoint (etcd-client's `status()`
//! asks whichever endpoint it is connected to, so a shared client would
//! report one member's view for all), short timeouts, and any failure counts
//! as unhealthy.
//!
//! A round, for every started member, through that member's own endpoint:
//! Status (no errors, not a learner, a leader known), a linearizable read
//! (it needs the member to reach the leader), and Status again; apply lag is
//! the leader's raft index minus the member's applied index, sampled twice
//! (once with each Status) and both samples must be under the bound. The
//! alarm list is read once per round. The result is a
//! [`HealthSnapshot`](super::health::HealthSnapshot).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use etcd_client::{AlarmAction, AlarmType, Client, StatusResponse, TlsOptions};
use tokio::sync::Mutex;
use tracing::debug;

use super::health::{Alarm, HealthSnapshot, MemberHealth};
use super::{connect, within};

/// How to reach and judge etcd.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// The configured client endpoints (used to read the member list, and
    /// preferred over a member's advertised URL when they match).
    pub endpoints: Vec<String>,
    /// TLS for every client, if any.
    pub tls: Option<TlsOptions>,
    /// The timeout of every call.
    pub timeout: Duration,
    /// The largest acceptable apply lag, in raft entries.
    pub max_apply_lag: u64,
    /// The key read (linearizably) through every member.
    pub read_key: String,
}

/// One member's Status, reduced to what the rule needs.
#[derive(Clone, Copy, Debug)]
struct Status {
    leader: u64,
    term: u64,
    raft_index: u64,
    applied_index: u64,
    is_learner: bool,
}

/// What one member's checks found.
struct MemberProbe {
    first: Result<Status, String>,
    read: Result<(), String>,
    second: Result<Status, String>,
}

/// The prober, with its cache of one client per endpoint.
pub struct Prober {
    settings: ProbeSettings,
    clients: Mutex<HashMap<String, Client>>,
}

fn reduce(s: &StatusResponse) -> Result<Status, String> {
    if !s.errors().is_empty() {
        return Err(format!("reports errors: {}", s.errors().join("; ")));
    }
    Ok(Status {
        leader: s.leader(),
        term: s.raft_term(),
        raft_index: s.raft_index(),
        applied_index: s.raft_applied_index(),
        is_learner: s.is_learner(),
    })
}

impl Prober {
    /// A prober with no connections yet (clients connect lazily).
    pub fn new(settings: ProbeSettings) -> Self {
        Self {
            settings,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ProbeSettings {
        &self.settings
    }

    /// The client of `endpoint` (one per endpoint, reused).
    pub async fn client(&self, endpoint: &str) -> Result<Client, String> {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(endpoint) {
            return Ok(c.clone());
        }
        // The client's own deadline is longer than the probe's, so a hung
        // member is reported as "no answer within ...".
        let client = connect(
            endpoint,
            self.settings.tls.as_ref(),
            self.settings.timeout * 2,
        )
        .await?;
        clients.insert(endpoint.to_string(), client.clone());
        Ok(client)
    }

    /// The endpoint to probe a member through: a configured endpoint among
    /// its client URLs, else its first advertised one.
    fn endpoint_of(&self, client_urls: &[String]) -> Option<String> {
        let norm = |u: &str| u.trim_end_matches('/').to_string();
        client_urls
            .iter()
            .find(|u| self.settings.endpoints.iter().any(|e| norm(e) == norm(u)))
            .or_else(|| client_urls.first())
            .map(|u| norm(u))
    }

    /// Runs one round and returns what it saw, stamped with `now()` at the end.
    pub async fn probe(&self, now: impl Fn() -> DateTime<Utc>) -> HealthSnapshot {
        let t = self.settings.timeout;
        let mut list = Err("no etcd endpoint configured".to_string());
        for endpoint in &self.settings.endpoints {
            list = match self.client(endpoint).await {
                Ok(mut c) => within(t, c.member_list())
                    .await
                    .map_err(|e| format!("{endpoint}: {e}")),
                Err(e) => Err(format!("{endpoint}: {e}")),
            };
            if list.is_ok() {
                break;
            }
        }
        let list = match list {
            Ok(l) => l,
            Err(e) => return HealthSnapshot::unreadable(now(), format!("member list: {e}")),
        };
        let members: Vec<(u64, String, bool, Option<String>)> = list
            .members()
            .iter()
            .map(|m| {
                (
                    m.id(),
                    m.name().to_string(),
                    m.is_learner(),
                    self.endpoint_of(m.client_urls()),
                )
            })
            .collect();
        // Kept as listed, for the mapping of nodes to members by InternalIP.
        let urls: Vec<(Vec<String>, Vec<String>)> = list
            .members()
            .iter()
            .map(|m| (m.peer_urls().to_vec(), m.client_urls().to_vec()))
            .collect();
        let probes =
            futures::future::join_all(members.iter().map(|(_, name, _, endpoint)| async move {
                match (name.is_empty(), endpoint) {
                    (false, Some(ep)) => Some(self.probe_member(ep).await),
                    _ => None,
                }
            }))
            .await;
        // The leader's own raft index, as the leader reported it in each sample.
        let statuses: Vec<(u64, &MemberProbe)> = members
            .iter()
            .zip(&probes)
            .filter_map(|((id, ..), p)| p.as_ref().map(|p| (*id, p)))
            .collect();
        let leader_index = |pick: fn(&MemberProbe) -> &Result<Status, String>| -> Option<u64> {
            let leader = statuses
                .iter()
                .find_map(|(_, p)| pick(p).as_ref().ok().map(|s| s.leader))?;
            statuses
                .iter()
                .find(|(id, _)| *id == leader)
                .and_then(|(_, p)| pick(p).as_ref().ok().map(|s| s.raft_index))
        };
        let leader_first = leader_index(|p| &p.first);
        let leader_second = leader_index(|p| &p.second);

        let mut out = Vec::new();
        for (((id, name, is_learner, endpoint), probe), (peer_urls, client_urls)) in
            members.iter().zip(probes).zip(urls)
        {
            let mut m = MemberHealth {
                id: *id,
                name: name.clone(),
                is_learner: *is_learner,
                endpoint: endpoint.clone().unwrap_or_default(),
                peer_urls,
                client_urls,
                problem: None,
                leader: 0,
                term: 0,
                applied_index: 0,
            };
            match probe {
                None => m.problem = Some("not started".to_string()),
                Some(p) => {
                    if let Ok(s) = p.second.as_ref().or(p.first.as_ref()) {
                        m.leader = s.leader;
                        m.term = s.term;
                        m.applied_index = s.applied_index;
                        m.is_learner |= s.is_learner;
                    }
                    m.problem = self.judge(&p, leader_first, leader_second).err();
                }
            }
            out.push(m);
        }
        let (alarms, alarm_error) = match self.alarms(&out).await {
            Ok(alarms) => (alarms, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        HealthSnapshot {
            taken_at: now(),
            probed_at: tokio::time::Instant::now(),
            unreadable: None,
            members: out,
            alarms,
            alarm_error,
        }
    }

    fn judge(
        &self,
        p: &MemberProbe,
        leader_first: Option<u64>,
        leader_second: Option<u64>,
    ) -> Result<(), String> {
        let first = p.first.clone()?;
        p.read
            .clone()
            .map_err(|e| format!("linearizable read failed: {e}"))?;
        let second = p.second.clone()?;
        if first.is_learner || second.is_learner {
            return Err("is a learner".to_string());
        }
        if second.leader == 0 {
            return Err("has no leader".to_string());
        }
        let bound = self.settings.max_apply_lag;
        for (sample, leader_index) in [(first, leader_first), (second, leader_second)] {
            let Some(leader_index) = leader_index else {
                return Err("the leader's raft index is unknown (leader not reachable)".to_string());
            };
            let lag = leader_index.saturating_sub(sample.applied_index);
            if lag > bound {
                return Err(format!(
                    "apply lag {lag} entries behind the leader (limit {bound})"
                ));
            }
        }
        Ok(())
    }

    async fn probe_member(&self, endpoint: &str) -> MemberProbe {
        let t = self.settings.timeout;
        let mut client = match self.client(endpoint).await {
            Ok(c) => c,
            Err(e) => {
                return MemberProbe {
                    first: Err(e.clone()),
                    read: Err(e.clone()),
                    second: Err(e),
                };
            }
        };
        let first = within(t, client.status()).await.and_then(|s| reduce(&s));
        if let Err(e) = &first {
            debug!(endpoint, error = %e, "etcd member status failed");
            return MemberProbe {
                first: first.clone(),
                read: first.clone().map(|_| ()),
                second: first,
            };
        }
        let read = within(t, client.get(self.settings.read_key.as_str(), None))
            .await
            .map(|_| ());
        let second = within(t, client.status()).await.and_then(|s| reduce(&s));
        MemberProbe {
            first,
            read,
            second,
        }
    }

    /// The alarm list, asked of the healthy members first, then the others
    /// (an active alarm makes every member report errors in Status, so
    /// unhealthy members must be asked too).
    async fn alarms(&self, members: &[MemberHealth]) -> Result<Vec<Alarm>, String> {
        let mut last = "no member to ask".to_string();
        let healthy_first = members
            .iter()
            .filter(|m| m.healthy())
            .chain(members.iter().filter(|m| !m.healthy()))
            .filter(|m| !m.endpoint.is_empty());
        for m in healthy_first {
            let mut client = self.client(&m.endpoint).await?;
            match within(
                self.settings.timeout,
                client.alarm(AlarmAction::Get, AlarmType::None, None),
            )
            .await
            {
                Ok(resp) => {
                    return Ok(resp
                        .alarms()
                        .iter()
                        .filter(|a| a.alarm() != AlarmType::None)
                        .map(|a| Alarm {
                            member_id: a.member_id(),
                            kind: a.alarm().as_str_name().to_string(),
                        })
                        .collect());
                }
                Err(e) => last = format!("{}: {e}", m.label()),
            }
        }
        Err(last)
    }
}
