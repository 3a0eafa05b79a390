//! Lease election timing (red-team finding on issue 9): a leader that can
//! no longer renew steps down before its Lease can expire in any other
//! replica's view, whatever the flags and however late its last renewal was
//! answered. Runs the real [`Elector`] against the fake API server
//! in-process, on tokio's paused clock, so every instant is exact.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Result;
use baton_coordinator::config::{Cli, Command};
use baton_coordinator::kube::election::{Elector, Timings};
use baton_coordinator::server;
use baton_coordinator::store::Leadership;
use baton_tests::kube_fake::{Endpoint, FakeApi};
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use tokio::sync::watch;
use tokio::time::Instant;

const NS: &str = "baton-system";
const LEASE: &str = "baton-coordinator";

/// Starts the elector `id` over `endpoint`; its leadership channel.
fn elector(endpoint: &Endpoint, id: &str, timings: Timings) -> watch::Receiver<Leadership> {
    yielding_elector(endpoint, id, timings, Arc::new(AtomicBool::new(false)))
}

/// [`elector`], handing the Lease over while `yielding` is set (as when
/// this replica's own node holds the baton).
fn yielding_elector(
    endpoint: &Endpoint,
    id: &str,
    timings: Timings,
    yielding: Arc<AtomicBool>,
) -> watch::Receiver<Leadership> {
    let (tx, rx) = watch::channel(Leadership::default());
    let elector = Elector::new(
        kube::Api::<Lease>::namespaced(endpoint.client(), NS),
        LEASE,
        id,
        timings,
        Arc::new(tx),
        yielding,
    );
    tokio::spawn(elector.run());
    rx
}

fn lease_version(fake: &FakeApi) -> Option<String> {
    let lease = fake.get("coordination.k8s.io/v1/leases", NS, LEASE)?;
    lease["metadata"]["resourceVersion"]
        .as_str()
        .map(str::to_string)
}

/// Waits until `rx` says `is_leader == leading`; when it changed.
async fn until_leading(rx: &mut watch::Receiver<Leadership>, leading: bool) -> Instant {
    rx.wait_for(|l| l.is_leader == leading)
        .await
        .expect("the elector runs");
    Instant::now()
}

#[tokio::test(start_paused = true)]
async fn a_leader_whose_renewal_is_answered_late_steps_down_before_its_lease_expires_for_others()
-> Result<()> {
    // Valid flags: 2s > 950ms + 450ms + one round of at most 450ms.
    let timings = Timings {
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(950),
        retry_period: Duration::from_millis(450),
    };
    timings.validate()?;
    let fake = FakeApi::new();
    let (to_a, to_b) = (fake.in_process(), fake.in_process());
    let mut a = elector(&to_a, "coord-a", timings);
    until_leading(&mut a, true).await;
    let mut b = elector(&to_b, "coord-b", timings);
    // a renews a few times; b follows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(a.borrow().is_leader);
    assert!(!b.borrow().is_leader);

    // a's next renewal lands at once, but its answer comes 300ms later
    // (well within a round); every later renewal of a hangs.
    let before = lease_version(&fake);
    to_a.delay_write_answers(Some(("leases", Duration::from_millis(300))));
    while lease_version(&fake) == before {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // No replica can see the Lease as expired before this + 2s.
    let written = Instant::now();
    to_a.stall_writes(Some("leases"));
    to_a.delay_write_answers(None);

    let stepped_down = until_leading(&mut a, false).await;
    let b_leads = until_leading(&mut b, true).await;
    let expires = written + timings.duration;
    assert!(
        stepped_down < expires,
        "a stepped down {:?} after its last renewal landed, its Lease expires for others after {:?}",
        stepped_down - written,
        timings.duration
    );
    assert!(b_leads >= expires, "b took over a live Lease");
    assert!(stepped_down < b_leads);
    Ok(())
}

#[tokio::test]
async fn lease_flags_that_could_make_two_leaders_are_refused_at_start() -> Result<()> {
    let fake = FakeApi::new();
    let endpoint = fake.serve().await;
    let argv = [
        "baton-coordinator",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--store",
        "kubernetes",
        "--id",
        "coord-a",
        "--kube-api-url",
        &endpoint.url,
        "--kube-namespace",
        NS,
        "--lease-duration",
        "15s",
        "--lease-renew-deadline",
        "12s",
        "--lease-retry-period",
        "2s",
    ];
    let Command::Serve(args) = Cli::try_parse_from(argv)?.command;
    let Err(err) = server::start(*args, std::future::pending()).await else {
        panic!("a coordinator with overlapping lease timings must not start");
    };
    let message = err.to_string();
    for flag in [
        "--lease-duration",
        "--lease-renew-deadline",
        "--lease-retry-period",
    ] {
        assert!(message.contains(flag), "{message}");
    }
    assert!(
        fake.get("coordination.k8s.io/v1/leases", NS, LEASE)
            .is_none(),
        "nothing was written"
    );
    Ok(())
}

/// Red-team finding: a leader handing its Lease over (its own node holds
/// the baton) stops leading before the release is written, not after its
/// answer came back: once the write lands another replica may take over.
#[tokio::test(start_paused = true)]
async fn a_yielding_leader_stops_leading_before_its_release_lands() -> Result<()> {
    let timings = Timings {
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(950),
        retry_period: Duration::from_millis(450),
    };
    let fake = FakeApi::new();
    let to_a = fake.in_process();
    let yielding = Arc::new(AtomicBool::new(false));
    let mut a = yielding_elector(&to_a, "coord-a", timings, yielding.clone());
    until_leading(&mut a, true).await;
    let holder = |fake: &FakeApi| {
        fake.get("coordination.k8s.io/v1/leases", NS, LEASE)
            .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
    };
    assert_eq!(holder(&fake).as_deref(), Some("coord-a"));

    // Answers to a's Lease writes come back 300ms after they landed.
    to_a.delay_write_answers(Some(("leases", Duration::from_millis(300))));
    yielding.store(true, std::sync::atomic::Ordering::SeqCst);
    while holder(&fake).is_some() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        !a.borrow().is_leader,
        "coord-a still led when its release landed"
    );
    Ok(())
}
