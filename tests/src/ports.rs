//! Loopback ports for the servers the tests start (etcd members,
//! coordinators, exporters), handed out so that nothing else takes them
//! between the moment they are chosen and the moment the server binds.
//!
//! Binding `127.0.0.1:0` and closing the listener is not enough: the kernel
//! picks such a port from its *ephemeral* range, the same range every
//! outgoing connection's local port comes from, and these tests open
//! hundreds of connections (gRPC clients, etcd peers talking to each
//! other). One of them can take the port before the server binds it: an
//! etcd member then dies with "address already in use" and the cluster never
//! forms. So [`free_port`] hands out ports *outside* the ephemeral range
//! (read from `/proc/sys/net/ipv4/ip_local_port_range`), where the kernel
//! never puts an outgoing connection, walking a process-wide counter from a
//! random offset (test binaries and benches run side by side on one
//! machine), checking each candidate by binding it, and never giving the
//! same port twice in one process.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::ops::RangeInclusive;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The lowest port handed out: below it live well-known and registered
/// services a developer's machine may run (Prometheus on 9090, ...).
const LOWEST: u16 = 20_000;

/// The kernel's default ephemeral range, used when /proc cannot be read.
const DEFAULT_EPHEMERAL: RangeInclusive<u16> = 32_768..=60_999;

/// The kernel's ephemeral port range on this machine.
pub fn ephemeral_range() -> RangeInclusive<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_range(&text))
        .unwrap_or(DEFAULT_EPHEMERAL)
}

/// Parses `ip_local_port_range` ("32768\t60999\n").
fn parse_range(text: &str) -> Option<RangeInclusive<u16>> {
    let mut words = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (words.next()?.ok()?, words.next()?.ok()?);
    (low <= high).then_some(low..=high)
}

/// The ports [`free_port`] chooses from: the larger stretch of
/// `LOWEST..=65535` below or above the ephemeral range (20000..=32767 with
/// the kernel's default range).
pub fn pool(ephemeral: &RangeInclusive<u16>) -> RangeInclusive<u16> {
    let below = LOWEST..=ephemeral.start().saturating_sub(1);
    let above = ephemeral.end().saturating_add(1).max(LOWEST)..=u16::MAX;
    let len = |r: &RangeInclusive<u16>| {
        if r.is_empty() {
            0
        } else {
            usize::from(*r.end()) - usize::from(*r.start()) + 1
        }
    };
    // An ephemeral range that ends at 65535 leaves `above` as 65535..=65535,
    // which still lies inside it.
    let above_len = if *ephemeral.end() == u16::MAX {
        0
    } else {
        len(&above)
    };
    if len(&below) >= above_len {
        below
    } else {
        above
    }
}

/// The allocator of one process: its pool, where it started in the pool,
/// and how many candidates it has used.
struct Allocator {
    pool: RangeInclusive<u16>,
    offset: usize,
    next: AtomicUsize,
}

impl Allocator {
    fn new(pool: RangeInclusive<u16>, offset: usize) -> Self {
        Self {
            pool,
            offset,
            next: AtomicUsize::new(0),
        }
    }

    fn size(&self) -> usize {
        (usize::from(*self.pool.end()) + 1).saturating_sub(usize::from(*self.pool.start()))
    }

    /// The next candidate that `usable` accepts; every candidate is taken
    /// from the counter once, so no port comes back twice. `None` once the
    /// whole pool has been walked.
    fn take(&self, usable: impl Fn(u16) -> bool) -> Option<u16> {
        let size = self.size();
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            if n >= size {
                return None;
            }
            let port = *self.pool.start() as usize + (self.offset + n) % size;
            let port = u16::try_from(port).expect("the pool lies within u16");
            if usable(port) {
                return Some(port);
            }
        }
    }
}

/// A random number for this process: the standard library seeds
/// `RandomState` from the OS's randomness, and the pid separates processes
/// started in the same instant.
fn random_offset() -> usize {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish() as usize
}

fn allocator() -> &'static Allocator {
    static ALLOCATOR: OnceLock<Allocator> = OnceLock::new();
    ALLOCATOR.get_or_init(|| Allocator::new(pool(&ephemeral_range()), random_offset()))
}

/// True when nothing holds `port`: binding it on every address (which also
/// fails while any socket on this host, listening or connected, is bound
/// to it on 127.0.0.1 or elsewhere) succeeds. The listener is closed at
/// once; outside the ephemeral range no outgoing connection takes the
/// port before the server binds it.
fn unused(port: u16) -> bool {
    TcpListener::bind(("0.0.0.0", port)).is_ok()
}

/// A TCP port for a server on 127.0.0.1: outside the kernel's ephemeral
/// range, free when checked, and never the same twice in one process.
///
/// # Panics
/// When every port of the pool has been handed out or found taken (more
/// than 12,000 with the kernel's default range): a test process that
/// needs that many leaks servers.
pub fn free_port() -> u16 {
    let allocator = allocator();
    allocator.take(unused).unwrap_or_else(|| {
        panic!(
            "no free test port left in {:?} (outside the ephemeral range {:?}); \
             every port of it was handed out or taken",
            allocator.pool,
            ephemeral_range()
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn the_pool_lies_outside_the_ephemeral_range() {
        assert_eq!(pool(&(32_768..=60_999)), 20_000..=32_767);
        // A range starting low leaves the stretch above it.
        assert_eq!(pool(&(15_000..=50_000)), 50_001..=65_535);
        // A range reaching 65535 leaves only the stretch below it.
        assert_eq!(pool(&(40_000..=65_535)), 20_000..=39_999);
        assert_eq!(parse_range("32768\t60999\n"), Some(32_768..=60_999));
        assert_eq!(parse_range("garbage"), None);
    }

    #[test]
    fn ports_are_never_ephemeral_and_never_handed_out_twice() {
        let ephemeral = ephemeral_range();
        let mut seen = HashSet::new();
        for _ in 0..500 {
            let port = free_port();
            assert!(
                !ephemeral.contains(&port),
                "{port} lies in the ephemeral range {ephemeral:?}"
            );
            assert!(port >= LOWEST, "{port} is below {LOWEST}");
            assert!(seen.insert(port), "{port} was handed out twice");
        }
    }

    #[test]
    fn a_taken_port_is_skipped_and_a_walked_pool_ends_with_none() {
        let allocator = Allocator::new(40_000..=40_009, 7);
        let taken = [40_007, 40_008];
        let mut got = Vec::new();
        while let Some(port) = allocator.take(|p| !taken.contains(&p)) {
            got.push(port);
        }
        // Starts at the offset, wraps around, skips what is taken, and
        // gives each of the others exactly once.
        assert_eq!(
            got,
            [
                40_009, 40_000, 40_001, 40_002, 40_003, 40_004, 40_005, 40_006
            ]
        );
        assert_eq!(allocator.take(|_| true), None);
    }

    #[test]
    fn a_port_someone_listens_on_is_not_unused() {
        let listener = TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(!unused(port));
        drop(listener);
        assert!(unused(port));
    }
}
