//! Maintenance windows: when the baton may be granted.
//!
//! A window is written `DAYS HH:MM-HH:MM [TIME_ZONE]`, e.g.
//! `Mon-Fri 22:00-04:00 Europe/Berlin` or `Sat,Sun 00:00-24:00`. `DAYS` is a
//! comma-separated list of days (`Mon`) or ranges (`Fri-Mon` wraps), or
//! `daily`/`*`. A window whose end is not after its start crosses midnight and
//! belongs to the day it starts on (`Fri 22:00-04:00` covers Saturday 02:00).
//! The time zone is an IANA name (default UTC); daylight-saving gaps move a
//! boundary to the first valid instant after it.
//!
//! Evaluation is pure: the clock is passed in.

use std::fmt;
use std::str::FromStr;

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveTime, TimeZone, Utc, Weekday,
};
use chrono_tz::Tz;

/// Why a window string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// The string does not have the `DAYS HH:MM-HH:MM [TZ]` shape.
    #[error(
        "window {0:?} is not of the form \"DAYS HH:MM-HH:MM [TIME_ZONE]\", e.g. \"Mon-Fri 22:00-04:00 Europe/Berlin\""
    )]
    Shape(String),
    /// A day name is unknown.
    #[error(
        "window {window:?}: unknown day {day:?} (use Mon, Tue, Wed, Thu, Fri, Sat, Sun, ranges like Mon-Fri, or daily)"
    )]
    Day {
        /// The window string.
        window: String,
        /// The offending day.
        day: String,
    },
    /// A time is not `HH:MM` (00:00 to 24:00).
    #[error("window {window:?}: bad time {time:?} (use HH:MM from 00:00 to 24:00)")]
    Time {
        /// The window string.
        window: String,
        /// The offending time.
        time: String,
    },
    /// The time zone is not an IANA name.
    #[error(
        "window {window:?}: unknown time zone {zone:?} (use an IANA name such as Europe/Berlin)"
    )]
    Zone {
        /// The window string.
        window: String,
        /// The offending zone.
        zone: String,
    },
}

/// One maintenance window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaintenanceWindow {
    source: String,
    /// Days the window starts on, indexed by `Weekday::num_days_from_monday`.
    days: [bool; 7],
    start: NaiveTime,
    /// Length of the window (up to 24 hours).
    length: Duration,
    zone: Tz,
}

impl MaintenanceWindow {
    /// If `now` is inside the window, the time left until it closes.
    pub fn remaining(&self, now: DateTime<Utc>) -> Option<Duration> {
        let today = now.with_timezone(&self.zone).date_naive();
        [today.pred_opt(), Some(today)]
            .into_iter()
            .flatten()
            .filter_map(|day| self.occurrence(day))
            .filter(|(start, end)| *start <= now && now < *end)
            .map(|(_, end)| end - now)
            .max()
    }

    /// The next time the window opens strictly after `now` (within 8 days).
    pub fn next_opening(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let today = now.with_timezone(&self.zone).date_naive();
        (0..=8)
            .filter_map(|offset| today.checked_add_signed(Duration::days(offset)))
            .filter_map(|day| self.occurrence(day))
            .map(|(start, _)| start)
            .find(|start| *start > now)
    }

    /// The window's occurrence starting on local `day`, as UTC instants.
    fn occurrence(&self, day: NaiveDate) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        if !self.days[day.weekday().num_days_from_monday() as usize] {
            return None;
        }
        let start_local = day.and_time(self.start);
        let start = self.to_utc(start_local)?;
        let end = self.to_utc(start_local + self.length)?;
        Some((start, end))
    }

    /// Maps a local wall-clock time to UTC. An ambiguous time (clocks going
    /// back) takes its first instant; a time in a gap (clocks going forward)
    /// moves to the first valid instant after it.
    fn to_utc(&self, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
        let mut candidate = local;
        for _ in 0..4 {
            match self.zone.from_local_datetime(&candidate) {
                LocalResult::Single(t) => return Some(t.with_timezone(&Utc)),
                LocalResult::Ambiguous(first, _) => return Some(first.with_timezone(&Utc)),
                LocalResult::None => candidate += Duration::minutes(30),
            }
        }
        None
    }
}

impl fmt::Display for MaintenanceWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl FromStr for MaintenanceWindow {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let source = s.trim().to_string();
        let parts: Vec<&str> = source.split_whitespace().collect();
        let (days_part, times_part, zone_part) = match parts.as_slice() {
            [d, t] => (*d, *t, None),
            [d, t, z] => (*d, *t, Some(*z)),
            _ => return Err(WindowError::Shape(source)),
        };
        let days = parse_days(days_part).map_err(|day| WindowError::Day {
            window: source.clone(),
            day,
        })?;
        let (start_s, end_s) = times_part
            .split_once('-')
            .ok_or_else(|| WindowError::Shape(source.clone()))?;
        let time_err = |time: &str| WindowError::Time {
            window: source.clone(),
            time: time.to_string(),
        };
        let start = parse_minutes(start_s).ok_or_else(|| time_err(start_s))?;
        let end = parse_minutes(end_s).ok_or_else(|| time_err(end_s))?;
        if start == 24 * 60 {
            return Err(time_err(start_s));
        }
        // An end not after the start crosses midnight; equal means 24 hours.
        let length_minutes = if end > start {
            end - start
        } else {
            end + 24 * 60 - start
        };
        let zone = match zone_part {
            None => Tz::UTC,
            Some(z) => z.parse::<Tz>().map_err(|_| WindowError::Zone {
                window: source.clone(),
                zone: z.to_string(),
            })?,
        };
        Ok(Self {
            start: NaiveTime::from_hms_opt(start / 60, start % 60, 0)
                .ok_or_else(|| time_err(start_s))?,
            length: Duration::minutes(i64::from(length_minutes)),
            days,
            zone,
            source,
        })
    }
}

/// Parses `HH:MM` into minutes after midnight (24:00 allowed).
fn parse_minutes(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let h: u32 = h.parse().ok()?;
    let m: u32 = m.parse().ok()?;
    let total = h * 60 + m;
    (m < 60 && total <= 24 * 60).then_some(total)
}

/// Parses `Mon-Fri,Sun` or `daily`; the error is the offending token.
fn parse_days(s: &str) -> Result<[bool; 7], String> {
    let mut days = [false; 7];
    if s.eq_ignore_ascii_case("daily") || s == "*" {
        return Ok([true; 7]);
    }
    for item in s.split(',') {
        let (from, to) = match item.split_once('-') {
            Some((a, b)) => (parse_day(a)?, parse_day(b)?),
            None => {
                let d = parse_day(item)?;
                (d, d)
            }
        };
        let mut day = from;
        loop {
            days[day.num_days_from_monday() as usize] = true;
            if day == to {
                break;
            }
            day = day.succ();
        }
    }
    Ok(days)
}

fn parse_day(s: &str) -> Result<Weekday, String> {
    match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Ok(Weekday::Mon),
        "tue" | "tuesday" => Ok(Weekday::Tue),
        "wed" | "wednesday" => Ok(Weekday::Wed),
        "thu" | "thursday" => Ok(Weekday::Thu),
        "fri" | "friday" => Ok(Weekday::Fri),
        "sat" | "saturday" => Ok(Weekday::Sat),
        "sun" | "sunday" => Ok(Weekday::Sun),
        _ => Err(s.to_string()),
    }
}

/// The windows in force: the baton may be granted when `now` is inside any
/// of them with at least `min_remaining` left, or always when there are none.
#[derive(Clone, Debug, Default)]
pub struct WindowSet {
    /// The configured windows (empty = always open).
    pub windows: Vec<MaintenanceWindow>,
    /// A grant is not given when less than this is left of the window.
    pub min_remaining: Duration,
}

impl WindowSet {
    /// `Ok(())` when a grant may be given at `now`, else the reason it may not.
    pub fn check(&self, now: DateTime<Utc>) -> Result<(), String> {
        if self.windows.is_empty() {
            return Ok(());
        }
        let best = self.windows.iter().filter_map(|w| w.remaining(now)).max();
        match best {
            Some(left) if left >= self.min_remaining => Ok(()),
            Some(left) => Err(format!(
                "maintenance window closes in {}, less than the minimum of {}",
                human(left),
                human(self.min_remaining)
            )),
            None => {
                let next = self
                    .windows
                    .iter()
                    .filter_map(|w| w.next_opening(now))
                    .min();
                Err(match next {
                    Some(t) => format!(
                        "outside maintenance windows; next opens at {}",
                        t.format("%Y-%m-%dT%H:%M:%SZ")
                    ),
                    None => "outside maintenance windows".to_string(),
                })
            }
        }
    }
}

fn human(d: Duration) -> String {
    let secs = d.num_seconds().max(0);
    format!("{}h{:02}m{:02}s", secs / 3600, (secs / 60) % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn w(s: &str) -> MaintenanceWindow {
        s.parse().unwrap()
    }

    #[test]
    fn crossing_midnight_belongs_to_its_start_day() {
        let window = w("Fri 22:00-04:00");
        // Friday 2026-11-20 23:00 UTC and Saturday 02:00: inside.
        assert_eq!(
            window.remaining(at("2026-11-20T23:00:00Z")),
            Some(Duration::hours(5))
        );
        assert_eq!(
            window.remaining(at("2026-11-21T02:00:00Z")),
            Some(Duration::hours(2))
        );
        // Saturday 22:30 and Friday 04:30: outside.
        assert_eq!(window.remaining(at("2026-11-21T22:30:00Z")), None);
        assert_eq!(window.remaining(at("2026-11-20T03:00:00Z")), None);
        assert_eq!(
            window.next_opening(at("2026-11-21T05:00:00Z")),
            Some(at("2026-11-27T22:00:00Z"))
        );
    }

    #[test]
    fn time_zones_apply() {
        // 22:00 Berlin in November (CET, UTC+1) is 21:00 UTC.
        let window = w("Mon-Fri 22:00-04:00 Europe/Berlin");
        assert_eq!(window.remaining(at("2026-11-20T20:59:00Z")), None);
        assert_eq!(
            window.remaining(at("2026-11-20T21:00:00Z")),
            Some(Duration::hours(6))
        );
        // Saturday 03:00 UTC = 04:00 Berlin: closed.
        assert_eq!(window.remaining(at("2026-11-21T03:00:00Z")), None);
    }

    #[test]
    fn daylight_saving_gap_moves_boundary_forward() {
        // 2026-03-29 02:30 does not exist in Berlin; the window opens at 03:00 CEST (01:00 UTC).
        let window = w("Sun 02:30-05:00 Europe/Berlin");
        assert_eq!(
            window.next_opening(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T01:00:00Z"))
        );
    }

    #[test]
    fn day_lists_ranges_and_daily() {
        let window = w("Sat,Sun 00:00-24:00");
        assert!(window.remaining(at("2026-11-22T12:00:00Z")).is_some());
        assert!(window.remaining(at("2026-11-23T12:00:00Z")).is_none());
        let wrap = w("Fri-Mon 10:00-11:00");
        assert!(wrap.remaining(at("2026-11-23T10:30:00Z")).is_some()); // Monday
        assert!(wrap.remaining(at("2026-11-24T10:30:00Z")).is_none()); // Tuesday
        assert!(
            w("daily 00:00-00:00")
                .remaining(at("2026-11-24T10:30:00Z"))
                .is_some()
        );
    }

    #[test]
    fn malformed_windows_are_refused_with_a_reason() {
        assert!(matches!(
            "".parse::<MaintenanceWindow>(),
            Err(WindowError::Shape(_))
        ));
        assert!(matches!(
            "Mon-Fri".parse::<MaintenanceWindow>(),
            Err(WindowError::Shape(_))
        ));
        assert!(matches!(
            "Mon-Fri 22:00".parse::<MaintenanceWindow>(),
            Err(WindowError::Shape(_))
        ));
        assert!(matches!(
            "Mo-Fr 22:00-04:00".parse::<MaintenanceWindow>(),
            Err(WindowError::Day { .. })
        ));
        assert!(matches!(
            "Mon 25:00-04:00".parse::<MaintenanceWindow>(),
            Err(WindowError::Time { .. })
        ));
        assert!(matches!(
            "Mon 22:60-04:00".parse::<MaintenanceWindow>(),
            Err(WindowError::Time { .. })
        ));
        assert!(matches!(
            "Mon 24:00-04:00".parse::<MaintenanceWindow>(),
            Err(WindowError::Time { .. })
        ));
        assert!(matches!(
            "Mon 2200-0400".parse::<MaintenanceWindow>(),
            Err(WindowError::Time { .. })
        ));
        assert!(matches!(
            "Mon 22:00-04:00 Mars/Olympus".parse::<MaintenanceWindow>(),
            Err(WindowError::Zone { .. })
        ));
        assert!(matches!(
            "Mon 22:00-04:00 UTC extra".parse::<MaintenanceWindow>(),
            Err(WindowError::Shape(_))
        ));
    }

    #[test]
    fn min_remaining_blocks_the_tail_of_a_window() {
        let set = WindowSet {
            windows: vec![w("daily 22:00-04:00")],
            min_remaining: Duration::minutes(30),
        };
        assert!(set.check(at("2026-11-21T03:00:00Z")).is_ok());
        let err = set.check(at("2026-11-21T03:45:00Z")).unwrap_err();
        assert!(err.contains("closes in 0h15m00s"), "{err}");
        let err = set.check(at("2026-11-21T12:00:00Z")).unwrap_err();
        assert!(err.contains("next opens at 2026-11-21T22:00:00Z"), "{err}");
        assert!(
            WindowSet::default()
                .check(at("2026-11-21T12:00:00Z"))
                .is_ok()
        );
    }
}
