//! How long to hold back before asking for the baton again (pure).
//!
//! Every maintenance that ends leaves a [`HoldBack`] in the state file. The
//! next request waits for it unless the need was found gone in between
//! (which clears it). Its length doubles with every maintenance in a row
//! that did not make the need go away: one that was aborted (a drain held
//! up by a disruption budget), lost (force-released, e.g. after it failed),
//! or that finished while the need stayed (phased or held packages, a
//! bootloader that still boots the old kernel). Persisted, so a crash loop
//! or a restart does not shorten it.

use crate::state::HoldBack;
use std::time::Duration;

/// The longest hold-back, unless the base backoff itself is longer.
pub const MAX_ABORT_BACKOFF: Duration = Duration::from_secs(3600);

/// How long to hold back after the `aborts`-th maintenance in a row that
/// did not clear the need: `base`, doubling each time, at most
/// [`MAX_ABORT_BACKOFF`] (or `base` when that is longer). A drain blocked
/// by a disruption budget is likely to be blocked again at once, so asking
/// again at the next check would only take the node out of service and
/// back over and over.
pub fn abort_backoff(base: Duration, aborts: u32) -> Duration {
    doubling(base, aborts, MAX_ABORT_BACKOFF)
}

/// `base` doubled for every time after the first of `n`, at most `cap`
/// (or `base` when that is longer).
pub(super) fn doubling(base: Duration, n: u32, cap: Duration) -> Duration {
    let doublings = n.saturating_sub(1).min(16);
    base.saturating_mul(1 << doublings).min(cap.max(base))
}

/// How a maintenance ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Verified and released.
    Done,
    /// Preparing gave up and the node was given back (or blockers
    /// appeared after the grant).
    Aborted,
    /// The baton was taken away (force-released).
    Lost,
}

/// The hold-back after a maintenance for `reason` that ended as `ending`
/// at `now_ms`, given the one left by the maintenance before (`previous`,
/// None when the need was found gone since).
pub(super) fn after_maintenance(
    previous: Option<&HoldBack>,
    reason: &str,
    ending: Ending,
    base: Duration,
    now_ms: u64,
) -> HoldBack {
    let streak = previous.map_or(0, |p| p.streak).saturating_add(1);
    let wait = abort_backoff(base, streak);
    let why = match ending {
        Ending::Done => "the last maintenance finished".to_string(),
        Ending::Aborted => "the last maintenance was aborted".to_string(),
        Ending::Lost => "the baton was taken away during the last maintenance".to_string(),
    };
    HoldBack {
        reason: reason.to_string(),
        streak,
        until_ms: now_ms.saturating_add(wait.as_millis() as u64),
        why: format!("{why} ({streak} in a row without the need going away)"),
    }
}

/// How long to wait now for `hold_back` (None: not at all). Never longer
/// than the longest hold-back `base` can give, so a wall clock that jumped
/// back cannot hold the node back for days.
pub(super) fn remaining(hold_back: &HoldBack, base: Duration, now_ms: u64) -> Option<Duration> {
    let left = Duration::from_millis(hold_back.until_ms.checked_sub(now_ms)?);
    (!left.is_zero()).then(|| left.min(abort_backoff(base, u32::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_backoff_doubles_up_to_the_cap() {
        let base = Duration::from_secs(300);
        assert_eq!(abort_backoff(base, 1), base);
        assert_eq!(abort_backoff(base, 2), base * 2);
        assert_eq!(abort_backoff(base, 3), base * 4);
        assert_eq!(abort_backoff(base, 50), MAX_ABORT_BACKOFF);
        let long = Duration::from_secs(7200);
        assert_eq!(abort_backoff(long, 5), long);
    }

    #[test]
    fn the_streak_grows_until_the_need_goes_away() {
        let base = Duration::from_secs(60);
        let first = after_maintenance(None, "r", Ending::Done, base, 1_000);
        assert_eq!((first.streak, first.until_ms), (1, 61_000));
        let second = after_maintenance(Some(&first), "r", Ending::Lost, base, 100_000);
        assert_eq!((second.streak, second.until_ms), (2, 220_000));
        assert!(second.why.contains("taken away"));
        // After the need was seen gone the previous one is None: fresh start.
        let fresh = after_maintenance(None, "r", Ending::Aborted, base, 0);
        assert_eq!(fresh.streak, 1);
    }

    #[test]
    fn remaining_is_bounded_and_ends() {
        let base = Duration::from_secs(60);
        let h = after_maintenance(None, "r", Ending::Done, base, 0);
        assert_eq!(remaining(&h, base, 0), Some(base));
        assert_eq!(remaining(&h, base, 60_000), None);
        assert_eq!(remaining(&h, base, 90_000), None);
        let far = HoldBack {
            until_ms: u64::MAX,
            ..h
        };
        assert_eq!(remaining(&far, base, 0), Some(MAX_ABORT_BACKOFF));
    }
}
