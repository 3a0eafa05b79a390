//! The etcd store: the lease state as one JSON document under
//! `<prefix>/state`, the audit under `<prefix>/audit/<number>`, one key
//! per save holding the records it made, named by the newest one's number
//! (each save puts its batch and deletes the batches past the newest
//! [`AUDIT_KEEP`] records, in its one transaction: a record exists exactly
//! when the state that made it does), and leader
//! election with etcd's election API under `<prefix>/election`, on a lease
//! with a short TTL.
//!
//! The audit read is only what belongs to the state document: keys named
//! past its `audit_seq` (left by saves after a backup that the `state` key
//! was restored from) are never read. A `state` key restored alone keeps
//! only those of its records the abandoned history did not delete (its
//! saves delete keys past their own newest [`AUDIT_KEEP`] records: the
//! keys stay bounded); a load that finds records missing warns. Each save
//! deletes, in its
//! transaction, every key its batch supersedes or that lies past it; the
//! save that creates the document (`--initialize`) deletes every audit key
//! an earlier installation left under the prefix. A document of the
//! previous release (format 1, the audit inside it) has its records moved
//! to an audit key by the first save after it, in that save's transaction.
//! The deletes walk only where keys can be live: from this replica's own
//! last save, that save's window (etcd keeps deleted keys in its index until
//! a compaction, and a range walks them all, so a range from the start of
//! the prefix would grow by a key per save); from a state it did not write
//! (another leader's, a restored one) and after any load, the whole prefix,
//! once. The module
//! `audit` (`store/etcd/audit.rs`) has the argument.
//!
//! Guarantees:
//! - Every save is one transaction that writes the state only if (a) this
//!   replica's election key still exists with the create revision it was
//!   elected with, and that revision is the term the engine's memory was
//!   loaded in, and (b) the state key's mod_revision is still the one the
//!   engine last read or wrote. The election key lives on this replica's
//!   lease, so once the lease is gone (expired while the replica was
//!   partitioned or frozen, or revoked) the key is gone and the save is
//!   refused, even if the old leader has not noticed yet; and a replica that
//!   lost and won again cannot overwrite what another leader wrote in
//!   between, even with a valid new key, because the state's revision moved.
//! - A confirmation ([`StateStore::confirm`]) is the same comparison as a
//!   read-only transaction, which etcd serves linearizably: one round trip.
//! - [`Leadership::term`] is the create revision of the leader's election
//!   key, which grows with every new leader.
//! - The election lease is kept alive through one endpoint at a time and
//!   moves to the next one when a member stops answering (a member that
//!   reboots or freezes must not cost the leadership); the leader steps
//!   down 2/3 of the TTL after the last renewal etcd answered was sent,
//!   before anything else, so never after etcd may have expired the lease.
//! - Followers keep [`Leadership::leader`] current (the leader's id), so
//!   their calls are refused with UNAVAILABLE naming the leader.

mod audit;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, ElectionClient, GetOptions, SortOrder, SortTarget,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use futures::future::BoxFuture;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    Fence, Leadership, Loaded, Numbered, Revision, StateStore, StoreError, attach_audit, decode,
    encode, numbered,
};
use crate::etcd::within;
use crate::state::{AUDIT_KEEP, LeaseState};
use audit::{AuditOp, Edge, Span};

/// How to reach etcd and where to keep the state.
#[derive(Clone, Debug)]
pub struct EtcdStoreSettings {
    /// Client endpoints.
    pub endpoints: Vec<String>,
    /// TLS, if any.
    pub tls: Option<TlsOptions>,
    /// Key prefix, e.g. `/baton`.
    pub prefix: String,
    /// This replica's id (the election value).
    pub id: String,
    /// The election lease's TTL.
    pub election_ttl: Duration,
    /// The timeout of every single call.
    pub timeout: Duration,
}

/// This replica's claim while it leads.
#[derive(Clone, Debug)]
struct Claim {
    key: Vec<u8>,
    create_revision: i64,
    lease: i64,
}

struct Shared {
    client: Client,
    /// One client per endpoint for the election lease's keep-alive, so it
    /// can move off a member that stopped answering (see
    /// [`Shared::keep_alive`]).
    keepers: Vec<(String, Client)>,
    /// The endpoint whose member last renewed the election lease.
    kept_alive_by: Mutex<Option<String>>,
    settings: EtcdStoreSettings,
    claim: Mutex<Option<Claim>>,
    /// The audit records a previous release's document carried (format 1)
    /// and the revision they were read at: the save from that revision
    /// writes them to an audit key.
    embedded: Mutex<Option<(Revision, Vec<Numbered>)>>,
    /// The revision of this replica's last save and where that save left
    /// live audit keys: the next save from that revision deletes only
    /// there (see [`audit`]).
    audit_written: Mutex<Option<(Revision, Span)>>,
    leadership: watch::Sender<Leadership>,
    /// Wakes the election task when a save found the claim gone.
    lost: Notify,
}

/// The etcd-backed store; campaigns for leadership as soon as it opens.
pub struct EtcdStore {
    shared: Arc<Shared>,
    election: JoinHandle<()>,
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.election.abort();
    }
}

/// Refuses a prefix whose keys would lie among the audit keys of an
/// installation at a shorter prefix (`<owner>/audit/...`): that
/// installation's saves and `--initialize` delete ranges of its audit keys,
/// which would take this one's state with them.
fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    let keys = format!("{prefix}/");
    match keys.find("/audit/") {
        Some(at) => Err(StoreError::NestedPrefix {
            prefix: prefix.to_string(),
            audit: format!("{}/audit/", &keys[..at]),
            owner: keys[..at].to_string(),
        }),
        None => Ok(()),
    }
}

impl EtcdStore {
    /// Connects and starts campaigning (in the background). Refuses a
    /// prefix that lies among another installation's audit keys.
    pub async fn open(settings: EtcdStoreSettings) -> Result<Self, StoreError> {
        check_prefix(&settings.prefix)?;
        // No per-request timeout on these clients: a campaign waits as long
        // as another replica leads, and a keep-alive stream lives as long as
        // the lease. Each other call gets its own deadline. (Connecting is
        // lazy: nothing is dialled here.)
        let connect = |endpoints: &[String]| {
            let mut options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(settings.timeout)
                .with_keep_alive(Duration::from_secs(2), settings.timeout);
            if let Some(tls) = &settings.tls {
                options = options.with_tls(tls.clone());
            }
            let endpoints = endpoints.to_vec();
            let list = endpoints.join(",");
            async move {
                Client::connect(&endpoints, Some(options))
                    .await
                    .map_err(|e| {
                        StoreError::Backend(format!(
                            "connecting to etcd at {list}: {}",
                            crate::etcd::describe(&e)
                        ))
                    })
            }
        };
        // Fails on an empty list, so there is a keep-alive client below.
        let client = connect(&settings.endpoints).await?;
        let mut keepers = Vec::with_capacity(settings.endpoints.len());
        for endpoint in &settings.endpoints {
            keepers.push((
                endpoint.clone(),
                connect(std::slice::from_ref(endpoint)).await?,
            ));
        }
        let shared = Arc::new(Shared {
            client,
            keepers,
            kept_alive_by: Mutex::new(None),
            settings,
            claim: Mutex::new(None),
            embedded: Mutex::new(None),
            audit_written: Mutex::new(None),
            leadership: watch::channel(Leadership::default()).0,
            lost: Notify::new(),
        });
        let election = tokio::spawn(shared.clone().run_election());
        Ok(Self { shared, election })
    }

    fn state_key(&self) -> String {
        format!("{}/state", self.shared.settings.prefix)
    }

    /// The prefix of the audit keys.
    fn audit_prefix(&self) -> String {
        format!("{}/audit/", self.shared.settings.prefix)
    }

    /// The key of the audit batch whose newest record is `number`
    /// (zero-padded, so keys sort by number).
    fn audit_key(&self, number: u64) -> String {
        format!("{}{number:020}", self.audit_prefix())
    }

    /// The end of the audit keys' range (the prefix with its last byte,
    /// `/`, moved on by one).
    fn audit_end(&self) -> String {
        format!("{}/audit0", self.shared.settings.prefix)
    }

    /// The key at `edge` of the audit keys' order.
    fn audit_edge(&self, edge: Edge) -> String {
        match edge {
            Edge::Start => self.audit_prefix(),
            Edge::Key(number) => self.audit_key(number),
            Edge::End => self.audit_end(),
        }
    }

    /// The audit operations of a save of `state` from `fence`: the batch of
    /// `records` (this change's, and those a previous release's document
    /// carried, numbered up to `state.audit_seq`) as one key named by the
    /// newest, and the deletes that keep only what belongs to the state,
    /// within `live`, where the save that wrote the state left live keys
    /// (see [`audit`]). Also where live keys are once this save commits.
    fn audit_ops(
        &self,
        state: &LeaseState,
        fence: &Fence,
        records: &[Numbered],
        live: Span,
    ) -> (Vec<TxnOp>, Span) {
        let batch = records.first().zip(records.last());
        let plan = audit::plan(
            state.audit_seq,
            fence.revision == Revision::Absent,
            batch.map(|(first, newest)| (first.number, newest.number)),
            live,
        );
        let ops = plan
            .ops
            .iter()
            .map(|op| match *op {
                AuditOp::Put(newest) => {
                    let batch = serde_json::to_vec(records).expect("audit records serialize");
                    TxnOp::put(self.audit_key(newest), batch, None)
                }
                AuditOp::Delete(Span { from, to }) => TxnOp::delete(
                    self.audit_edge(from),
                    Some(DeleteOptions::new().with_range(self.audit_edge(to))),
                ),
            })
            .collect();
        (ops, plan.live_after)
    }

    /// The endpoint whose member last renewed this replica's election
    /// lease (for tests and operators).
    pub fn kept_alive_by(&self) -> Option<String> {
        self.shared
            .kept_alive_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The election lease of this replica while it leads (for tests and
    /// operators: revoking it deposes this replica).
    pub fn election_lease(&self) -> Option<i64> {
        self.shared
            .claim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.lease)
    }
}

impl Shared {
    fn election_name(&self) -> String {
        format!("{}/election", self.settings.prefix)
    }

    /// Gives up the claim and wakes the election task to start over.
    fn step_down(&self, reason: &str) {
        self.give_up(reason);
        self.lost.notify_one();
    }

    /// Gives up the claim (the election task is already starting over).
    fn give_up(&self, reason: &str) {
        let had = self
            .claim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some();
        if had {
            warn!(reason, "stepping down as coordinator leader");
        }
        self.leadership.send_if_modified(|l| {
            let changed = l.is_leader;
            l.is_leader = false;
            changed
        });
    }

    /// Campaign, lead while the lease lives, step down, repeat.
    async fn run_election(self: Arc<Self>) {
        loop {
            if let Err(e) = self.clone().one_term().await {
                warn!(error = %e, "coordinator election: retrying");
            }
            self.give_up("election lease lost");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn one_term(self: Arc<Self>) -> Result<(), String> {
        let t = self.settings.timeout;
        let ttl = self.settings.election_ttl.as_secs().max(1) as i64;
        let mut client = self.client.clone();
        // etcd starts the lease's TTL after this is sent.
        let granted_from = tokio::time::Instant::now();
        let granted = within(t, client.lease_grant(ttl, None)).await?;
        // Time by what etcd granted (whole seconds, never more than asked):
        // a TTL rounded down, or shortened by etcd, must shorten how long
        // this replica believes it leads too.
        let granted_ttl = Duration::from_secs(granted.ttl().clamp(1, ttl) as u64);
        let lease = granted.id();
        let result = self
            .clone()
            .campaign_and_lead(lease, granted_from, granted_ttl)
            .await;
        // Step down before anything that can hang on an unreachable etcd:
        // the deadline to stop leading is now, not after the revoke below.
        match &result {
            Err(e) => self.give_up(e),
            Ok(()) => self.give_up("election term ended"),
        }
        // Best effort: free the election key at once instead of after the TTL.
        let _ = within(t, client.lease_revoke(lease)).await;
        result
    }

    async fn campaign_and_lead(
        self: Arc<Self>,
        lease: i64,
        granted_from: tokio::time::Instant,
        ttl: Duration,
    ) -> Result<(), String> {
        // A wake-up left over from an earlier term must not depose this one.
        let _ = futures::FutureExt::now_or_never(self.lost.notified());
        let keepalive = self.clone().keep_alive(lease, granted_from, ttl);
        tokio::pin!(keepalive);
        let mut election = self.client.election_client();
        let campaign = {
            let mut election = election.clone();
            let name = self.election_name();
            let id = self.settings.id.clone();
            async move { election.campaign(name, id, lease).await }
        };
        let won = tokio::select! {
            r = campaign => r.map_err(|e| format!("campaign: {}", crate::etcd::describe(&e)))?,
            r = &mut keepalive => return r,
            _ = self.follow(&mut election) => return Err("following stopped".to_string()),
        };
        let key = won
            .leader()
            .ok_or("campaign answered without a leader key")?;
        let claim = Claim {
            key: key.key().to_vec(),
            create_revision: key.rev(),
            lease,
        };
        info!(id = %self.settings.id, term = claim.create_revision, lease, "elected coordinator leader");
        *self.claim.lock().unwrap_or_else(|e| e.into_inner()) = Some(claim.clone());
        self.leadership.send_replace(Leadership {
            is_leader: true,
            leader: Some(self.settings.id.clone()),
            term: claim.create_revision as u64,
        });
        tokio::select! {
            r = &mut keepalive => r,
            _ = self.lost.notified() => Err("a save found the election key gone".to_string()),
        }
    }

    /// Keeps the election lease alive; returns when it is lost, or when it
    /// was not renewed for 2/3 of its TTL (counted from when the last
    /// renewal etcd answered was *sent*: etcd renewed it after that, so the
    /// lease lives at least a full TTL from then, and this replica steps
    /// down a third of the TTL before etcd can expire it, whichever member
    /// answered).
    ///
    /// Failover: the renewal runs every TTL/4 over a client of one endpoint
    /// at a time. A member that hangs (rebooting, frozen) keeps its TCP
    /// connection, so a stream on it stalls instead of failing; an attempt
    /// without an answer within TTL/8 (at most the call timeout, never
    /// past the give-up time) moves to the next endpoint with a fresh
    /// keep-alive stream, so one member's outage costs one short attempt,
    /// not the leadership.
    async fn keep_alive(
        self: Arc<Self>,
        lease: i64,
        granted_from: tokio::time::Instant,
        ttl: Duration,
    ) -> Result<(), String> {
        let every = ttl / 4;
        let attempt = (ttl / 8).clamp(
            Duration::from_millis(100),
            self.settings.timeout.max(Duration::from_millis(100)),
        );
        let give_up_after = ttl * 2 / 3;
        let mut renewed_from = granted_from;
        let mut endpoint = 0;
        let mut failed_in_a_row = 0;
        let mut stream = None;
        loop {
            let now = tokio::time::Instant::now();
            let deadline = renewed_from + give_up_after;
            if now >= deadline {
                return Err(format!(
                    "election lease not renewed for {}ms",
                    (now - renewed_from).as_millis()
                ));
            }
            let (url, client) = &self.keepers[endpoint];
            let sent = now;
            let renewed = within(
                attempt.min(deadline - now),
                renew_once(client, &mut stream, lease),
            )
            .await;
            match renewed {
                Ok(left) if left > 0 => {
                    renewed_from = sent;
                    failed_in_a_row = 0;
                    self.kept_alive_through(url, lease);
                    tokio::time::sleep(every).await;
                }
                Ok(_) => return Err("election lease expired".to_string()),
                Err(e) => {
                    warn!(endpoint = %url, error = %e, lease, "election keep-alive got no answer; moving to the next etcd endpoint");
                    stream = None;
                    endpoint = (endpoint + 1) % self.keepers.len();
                    failed_in_a_row += 1;
                    // Every endpoint failed fast (all refused): do not spin.
                    if failed_in_a_row % self.keepers.len() == 0 {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }

    fn kept_alive_through(&self, url: &str, lease: i64) {
        let mut by = self.kept_alive_by.lock().unwrap_or_else(|e| e.into_inner());
        if by.as_deref() != Some(url) {
            info!(endpoint = %url, lease, "election lease kept alive through this etcd endpoint");
            *by = Some(url.to_string());
        }
    }

    /// While not leading: keeps `leader` current with the elected id.
    async fn follow(&self, election: &mut ElectionClient) {
        loop {
            if let Ok(resp) =
                within(self.settings.timeout, election.leader(self.election_name())).await
                && let Some(kv) = resp.kv()
            {
                let next = Leadership {
                    is_leader: false,
                    leader: Some(String::from_utf8_lossy(kv.value()).to_string()),
                    term: kv.create_revision() as u64,
                };
                self.leadership.send_if_modified(|l| {
                    let changed = *l != next;
                    *l = next.clone();
                    changed
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A keep-alive stream on one endpoint: the sender and the answers.
type KeepAlive = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Renews `lease` once over `stream` (opened on `client` first when there
/// is none); the TTL etcd granted, in seconds (0: the lease is gone).
async fn renew_once(
    client: &Client,
    stream: &mut Option<KeepAlive>,
    lease: i64,
) -> Result<i64, etcd_client::Error> {
    let (keeper, answers) = match stream {
        Some(open) => open,
        None => stream.insert(client.clone().lease_keep_alive(lease).await?),
    };
    keeper.keep_alive().await?;
    match answers.message().await? {
        Some(answer) => Ok(answer.ttl()),
        None => Err(etcd_client::Error::InvalidArgs(
            "the keep-alive stream ended".to_string(),
        )),
    }
}

impl EtcdStore {
    /// The comparisons that make `fence` current: this replica's election
    /// key as elected in `fence.term`, and the state key at
    /// `fence.revision`.
    fn fenced(&self, fence: &Fence) -> Result<(Claim, Vec<Compare>), StoreError> {
        let claim = self
            .shared
            .claim
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                StoreError::NotLeader("this replica holds no election key".to_string())
            })?;
        if claim.create_revision as u64 != fence.term {
            return Err(StoreError::NotLeader(format!(
                "this replica leads in term {}, its memory is from term {}",
                claim.create_revision, fence.term
            )));
        }
        let mod_revision = match &fence.revision {
            // A key that does not exist has mod_revision 0.
            Revision::Absent => 0,
            Revision::At(r) => r
                .parse::<i64>()
                .map_err(|_| StoreError::Conflict(format!("{r} is not an etcd revision")))?,
        };
        let compares = vec![
            Compare::create_revision(claim.key.clone(), CompareOp::Equal, claim.create_revision),
            Compare::mod_revision(self.state_key(), CompareOp::Equal, mod_revision),
        ];
        Ok((claim, compares))
    }

    /// Runs a fenced transaction (`ops` when the fence holds) and tells
    /// which comparison failed.
    async fn fenced_txn(
        &self,
        fence: &Fence,
        ops: Vec<TxnOp>,
    ) -> Result<etcd_client::TxnResponse, StoreError> {
        let (claim, compares) = self.fenced(fence)?;
        let key = self.state_key();
        let txn = Txn::new()
            .when(compares)
            .and_then(ops)
            .or_else([TxnOp::get(claim.key.clone(), None)]);
        let mut client = self.shared.client.clone();
        let resp = within(self.shared.settings.timeout, client.txn(txn))
            .await
            .map_err(|e| StoreError::Backend(format!("transaction on {key}: {e}")))?;
        if resp.succeeded() {
            return Ok(resp);
        }
        let still_elected = resp.op_responses().iter().any(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => get
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == claim.create_revision),
            _ => false,
        });
        if still_elected {
            Err(StoreError::Conflict(format!(
                "{key} is no longer at revision {}",
                fence.revision
            )))
        } else {
            self.shared
                .step_down("the election key is gone; another replica may lead");
            Err(StoreError::NotLeader(
                "the election key is gone (lease expired or revoked): this replica was deposed"
                    .to_string(),
            ))
        }
    }
}

impl StateStore for EtcdStore {
    fn load(&self) -> BoxFuture<'_, Result<Loaded, StoreError>> {
        Box::pin(async move {
            // A remembered span is good only along an unbroken chain of
            // this replica's own saves: a state key found at the same
            // revision may be another history's (an etcd snapshot restore
            // repeats revisions), with audit keys the span does not cover.
            // The first save after a load deletes the whole prefix.
            *self
                .shared
                .audit_written
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = None;
            let key = self.state_key();
            let prefix = self.audit_prefix();
            // One transaction reads the document and the newest audit
            // records at the same revision.
            let newest = GetOptions::new()
                .with_prefix()
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(AUDIT_KEEP as i64);
            let read = Txn::new().and_then([
                TxnOp::get(key.as_str(), None),
                TxnOp::get(prefix.as_str(), Some(newest)),
            ]);
            let mut client = self.shared.client.clone();
            let resp = within(self.shared.settings.timeout, client.txn(read))
                .await
                .map_err(|e| StoreError::Backend(format!("reading {key}: {e}")))?;
            let gets: Vec<_> = resp
                .op_responses()
                .into_iter()
                .filter_map(|op| match op {
                    TxnOpResponse::Get(get) => Some(get),
                    _ => None,
                })
                .collect();
            let [document, audit] = gets.as_slice() else {
                return Err(StoreError::Backend(format!(
                    "reading {key}: the transaction answered {} reads, not 2",
                    gets.len()
                )));
            };
            match document.kvs().first() {
                Some(kv) => {
                    let mut state = decode(&format!("etcd key {key}"), kv.value())?;
                    let revision = Revision::At(kv.mod_revision().to_string());
                    // Only keys named up to the document's newest record
                    // belong to it. When later ones took the newest places
                    // (a restored state key), read again below them, at the
                    // same revision.
                    let last = self.audit_key(state.audit_seq);
                    let mut audit = audit.clone();
                    if audit.kvs().iter().any(|kv| kv.key() > last.as_bytes()) {
                        let at = resp.header().map(|h| h.revision()).ok_or_else(|| {
                            StoreError::Backend(format!("reading {key}: no header"))
                        })?;
                        let below = GetOptions::new()
                            .with_range(self.audit_key(state.audit_seq + 1))
                            .with_sort(SortTarget::Key, SortOrder::Descend)
                            .with_limit(AUDIT_KEEP as i64)
                            .with_revision(at);
                        audit = within(
                            self.shared.settings.timeout,
                            client.get(prefix.as_str(), Some(below)),
                        )
                        .await
                        .map_err(|e| StoreError::Backend(format!("reading {prefix}: {e}")))?;
                    }
                    // A previous release's document: its records go to an
                    // audit key with the first save from this revision.
                    let embedded: Vec<Numbered> = numbered(&state).collect();
                    *self
                        .shared
                        .embedded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) =
                        (!embedded.is_empty()).then(|| (revision.clone(), embedded));
                    let mut records = Vec::new();
                    for kv in audit.kvs() {
                        let batch: Vec<Numbered> =
                            serde_json::from_slice(kv.value()).map_err(|e| {
                                StoreError::Corrupt {
                                    path: format!("etcd key {}", String::from_utf8_lossy(kv.key())),
                                    detail: e.to_string(),
                                }
                            })?;
                        records.extend(batch);
                    }
                    attach_audit(&mut state, records);
                    // Saves delete the keys past their newest AUDIT_KEEP
                    // records (the audit stays bounded), so a `state` key
                    // restored alone after a long abandoned history finds
                    // its window gone, wholly or in part: say so.
                    let whole = state.audit_seq.min(AUDIT_KEEP as u64);
                    if (state.audit.len() as u64) < whole {
                        warn!(
                            key = %key,
                            audit_seq = state.audit_seq,
                            found = state.audit.len(),
                            expected = whole,
                            "audit records of this state are missing (a state key restored without its audit keys, after saves deleted them); the health gate and the canary tracker know only the records found"
                        );
                    }
                    Ok(Loaded {
                        state: Some(state),
                        revision,
                    })
                }
                None => Ok(Loaded {
                    state: None,
                    revision: Revision::Absent,
                }),
            }
        })
    }

    fn save<'a>(
        &'a self,
        state: &'a LeaseState,
        fence: &'a Fence,
    ) -> BoxFuture<'a, Result<Revision, StoreError>> {
        Box::pin(async move {
            let mut ops = vec![TxnOp::put(self.state_key(), encode(state), None)];
            // The records this change made, as one key named by the newest
            // one's number: one put however many (a tick that marks many
            // holders overdue stays within etcd's operations per txn); with
            // them, once, the records a previous release's document carried.
            let embedded = self
                .shared
                .embedded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .filter(|(at, _)| *at == fence.revision)
                .map(|(_, records)| records)
                .unwrap_or_default();
            let records: Vec<Numbered> = embedded
                .into_iter()
                .chain(numbered(state))
                .filter(|n| n.number <= state.audit_seq)
                .map(|n| (n.number, n))
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_values()
                .collect();
            // Where live audit keys can be: known only when this replica
            // wrote the state the save starts from (the transaction commits
            // only while the state key is still at that revision, so no
            // save has moved them since); anywhere otherwise.
            let live = self
                .shared
                .audit_written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(at, _)| *at == fence.revision)
                .map_or(Span::ALL, |(_, live)| *live);
            let (audit, live_after) = self.audit_ops(state, fence, &records, live);
            ops.extend(audit);
            let resp = self.fenced_txn(fence, ops).await?;
            // The transaction's revision is the put's mod_revision.
            let revision = resp.header().map(|h| h.revision()).ok_or_else(|| {
                StoreError::Backend("transaction answered without a header".to_string())
            })?;
            let revision = Revision::At(revision.to_string());
            *self
                .shared
                .audit_written
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some((revision.clone(), live_after));
            Ok(revision)
        })
    }

    fn confirm<'a>(&'a self, fence: &'a Fence) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move { self.fenced_txn(fence, Vec::new()).await.map(|_| ()) })
    }

    fn leadership(&self) -> watch::Receiver<Leadership> {
        self.shared.leadership.subscribe()
    }

    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn location(&self) -> String {
        format!("etcd key {}", self.state_key())
    }
}
