//! Retention policies: which snapshots `forget` keeps (a pure function).
//!
//! Snapshots are grouped by host and paths (like restic; by tags too on
//! request, see [`GroupBy`]). Within a group,
//! newest first, a snapshot is kept when any rule wants it:
//! - `last N`: it is among the N newest;
//! - `hourly/daily/weekly/monthly/yearly N`: it is the newest of its hour
//!   (day, ISO week, month, year), and fewer than N such periods were kept;
//! - `within D`: it is at most D older than the group's newest snapshot;
//! - `tags`: it carries one of the tags.
//!
//! Calendar periods are those of the snapshot's own recorded UTC offset: the
//! wall clock of the machine that took it. A snapshot at 23:30-05:00 belongs
//! to that day, not to the next day in UTC, so "one per day" means the days
//! the user lived through, wherever the repository is pruned from.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, FixedOffset, Timelike};
use serde::Serialize;

use crate::id::SnapshotId;
use crate::snapshot::Snapshot;

/// What to keep; all zero/empty keeps nothing (see [`Policy::is_empty`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
///
/// A snapshot is kept when any rule wants it; 0 (or `None`, or empty)
/// turns a rule off. Counts are per group ([`GroupBy`]).
pub struct Policy {
    /// Keep the N newest snapshots (`--keep-last`).
    pub last: u32,
    /// Keep the newest snapshot of each of the N newest hours that have
    /// one (`--keep-hourly`), in the snapshot's own UTC offset.
    pub hourly: u32,
    /// As `hourly`, for calendar days (`--keep-daily`).
    pub daily: u32,
    /// As `hourly`, for ISO weeks (`--keep-weekly`).
    pub weekly: u32,
    /// As `hourly`, for calendar months (`--keep-monthly`).
    pub monthly: u32,
    /// As `hourly`, for calendar years (`--keep-yearly`).
    pub yearly: u32,
    /// Keep every snapshot at most this much older than the group's newest
    /// (`--keep-within`); measured from the newest snapshot, not from now.
    pub within: Option<chrono::Duration>,
    /// Keep every snapshot carrying one of these tags (exact match, `--keep-tag`).
    pub tags: Vec<String>,
}

impl Policy {
    /// True when no rule is set: forgetting with it would remove everything,
    /// which callers refuse.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

/// Which snapshots form a group that the policy is applied to separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupBy {
    /// Snapshots of different hosts form different groups.
    pub host: bool,
    /// Snapshots of different path sets (compared sorted) form different groups.
    pub paths: bool,
    /// Snapshots with the same set of tags form a group.
    pub tags: bool,
}

impl Default for GroupBy {
    /// By host and paths, like restic.
    fn default() -> Self {
        GroupBy { host: true, paths: true, tags: false }
    }
}

/// A snapshot kept, and the rules that kept it (e.g. `daily`, `last`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Kept {
    /// The snapshot kept.
    pub id: SnapshotId,
    /// Every rule that wants it, never empty: `last`, `hourly`, `daily`,
    /// `weekly`, `monthly`, `yearly`, `within`, `tag`.
    pub reasons: Vec<&'static str>,
}

/// The decision for one group of snapshots (same host and paths).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GroupDecision {
    /// The group's host (empty when not grouped by host).
    pub hostname: String,
    /// The group's paths, sorted (empty when not grouped by paths).
    pub paths: Vec<String>,
    /// The group's tags (sorted; empty when not grouped by tags).
    pub tags: Vec<String>,
    /// Newest first.
    pub keep: Vec<Kept>,
    /// Newest first.
    pub remove: Vec<SnapshotId>,
}

/// One calendar rule: how many periods to keep and how to name a period.
struct Bucket {
    name: &'static str,
    left: u32,
    last: Option<i64>,
    period: fn(&DateTime<FixedOffset>) -> i64,
}

fn hour(t: &DateTime<FixedOffset>) -> i64 {
    day(t) * 24 + i64::from(t.hour())
}
fn day(t: &DateTime<FixedOffset>) -> i64 {
    i64::from(t.date_naive().num_days_from_ce())
}
fn week(t: &DateTime<FixedOffset>) -> i64 {
    let w = t.iso_week();
    i64::from(w.year()) * 100 + i64::from(w.week())
}
fn month(t: &DateTime<FixedOffset>) -> i64 {
    i64::from(t.year()) * 12 + i64::from(t.month0())
}
fn year(t: &DateTime<FixedOffset>) -> i64 {
    i64::from(t.year())
}

/// Applies `policy` to each group of `snapshots`; groups come out ordered
/// by host and paths (empty when not grouped by them).
pub fn apply(policy: &Policy, group_by: GroupBy, snapshots: &[(SnapshotId, Snapshot)]) -> Vec<GroupDecision> {
    type Key = (String, Vec<String>, Vec<String>);
    let mut groups: BTreeMap<Key, Vec<&(SnapshotId, Snapshot)>> = BTreeMap::new();
    for s in snapshots {
        let mut paths = if group_by.paths { s.1.paths.clone() } else { Vec::new() };
        paths.sort();
        let host = if group_by.host { s.1.hostname.clone() } else { String::new() };
        let mut tags = if group_by.tags { s.1.tags.clone() } else { Vec::new() };
        tags.sort();
        tags.dedup();
        groups.entry((host, paths, tags)).or_default().push(s);
    }
    groups
        .into_iter()
        .map(|((hostname, paths, tags), mut group)| {
            // Newest first; equal times by id so the result is deterministic.
            group.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(b.0.cmp(&a.0)));
            let (keep, remove) = decide(policy, &group);
            GroupDecision { hostname, paths, tags, keep, remove }
        })
        .collect()
}

fn decide(policy: &Policy, group: &[&(SnapshotId, Snapshot)]) -> (Vec<Kept>, Vec<SnapshotId>) {
    let mut buckets = [
        Bucket { name: "hourly", left: policy.hourly, last: None, period: hour },
        Bucket { name: "daily", left: policy.daily, last: None, period: day },
        Bucket { name: "weekly", left: policy.weekly, last: None, period: week },
        Bucket { name: "monthly", left: policy.monthly, last: None, period: month },
        Bucket { name: "yearly", left: policy.yearly, last: None, period: year },
    ];
    let newest = group.first().map(|s| s.1.time);
    let (mut keep, mut remove) = (Vec::new(), Vec::new());
    for (i, (id, snap)) in group.iter().map(|s| (&s.0, &s.1)).enumerate() {
        let mut reasons = Vec::new();
        if (i as u64) < u64::from(policy.last) {
            reasons.push("last");
        }
        for b in &mut buckets {
            let p = (b.period)(&snap.time);
            if b.left > 0 && b.last != Some(p) {
                b.left -= 1;
                b.last = Some(p);
                reasons.push(b.name);
            }
        }
        if let (Some(within), Some(newest)) = (policy.within, newest) {
            if newest.signed_duration_since(snap.time) <= within {
                reasons.push("within");
            }
        }
        if snap.tags.iter().any(|t| policy.tags.contains(t)) {
            reasons.push("tag");
        }
        if reasons.is_empty() {
            remove.push(*id);
        } else {
            keep.push(Kept { id: *id, reasons });
        }
    }
    (keep, remove)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(time: &str, host: &str, tags: &[&str]) -> Snapshot {
        crate::test_support::snapshot(time, host, tags, &["/data"])
    }

    /// Snapshots named by their index in `times`.
    fn set(times: &[&str]) -> Vec<(SnapshotId, Snapshot)> {
        times.iter().enumerate().map(|(i, t)| (SnapshotId([i as u8; 32]), snap(t, "h", &[]))).collect()
    }

    /// The indices (in `times`) of the kept snapshots, ascending.
    fn kept(policy: &Policy, times: &[&str]) -> Vec<u8> {
        let d = apply(policy, GroupBy::default(), &set(times));
        assert_eq!(d.len(), 1);
        let mut k: Vec<u8> = d[0].keep.iter().map(|k| k.id.0[0]).collect();
        k.sort();
        assert_eq!(k.len() + d[0].remove.len(), times.len());
        k
    }

    /// Two weeks of three snapshots a day (08:00, 12:00, 20:00, +01:00),
    /// from Monday 2026-03-02 to Sunday 2026-03-15: index = day * 3 + slot.
    fn two_weeks() -> Vec<String> {
        let mut v = Vec::new();
        for d in 2..=15 {
            for h in [8, 12, 20] {
                v.push(format!("2026-03-{d:02}T{h:02}:00:00+01:00"));
            }
        }
        v
    }

    #[test]
    fn policies_against_hand_computed_expectations() {
        let owned = two_weeks();
        let t: Vec<&str> = owned.iter().map(String::as_str).collect();
        let p = |f: fn(&mut Policy)| {
            let mut p = Policy::default();
            f(&mut p);
            p
        };
        let table: Vec<(&str, Policy, Vec<u8>)> = vec![
            ("last 4: the four newest", p(|p| p.last = 4), vec![38, 39, 40, 41]),
            // The newest of each day: the 20:00 ones of Mar 13, 14, 15.
            ("daily 3: one per day, the day's newest", p(|p| p.daily = 3), vec![35, 38, 41]),
            ("hourly 2: distinct hours", p(|p| p.hourly = 2), vec![40, 41]),
            // ISO weeks: Mar 2-8 (indices 0..=20) and Mar 9-15 (21..=41).
            ("weekly 5: only two weeks exist", p(|p| p.weekly = 5), vec![20, 41]),
            ("monthly 1", p(|p| p.monthly = 1), vec![41]),
            ("yearly 2", p(|p| p.yearly = 2), vec![41]),
            (
                "last 2 + daily 2 overlap",
                p(|p| {
                    p.last = 2;
                    p.daily = 2
                }),
                vec![38, 40, 41],
            ),
            (
                "within 1 day of the newest (inclusive)",
                p(|p| p.within = Some(chrono::Duration::days(1))),
                vec![38, 39, 40, 41],
            ),
        ];
        for (name, policy, expected) in table {
            assert_eq!(kept(&policy, &t), expected, "{name}");
        }
    }

    #[test]
    fn the_calendar_day_is_the_snapshots_own_local_day() {
        // Both are 2026-03-02 in UTC (04:30Z and 05:30Z), but the first was
        // taken at 23:30 on Mar 1 in New York: two local days, two keeps.
        let t = ["2026-03-01T23:30:00-05:00", "2026-03-02T06:30:00+01:00"];
        assert_eq!(kept(&Policy { daily: 5, ..Policy::default() }, &t), vec![0, 1]);
        // Same local day at different offsets (Mar 2, 01:00+09:00 is Mar 1 in
        // UTC): one day, the newer instant is kept.
        let t = ["2026-03-02T01:00:00+09:00", "2026-03-02T09:00:00+00:00"];
        assert_eq!(kept(&Policy { daily: 5, ..Policy::default() }, &t), vec![1]);
        // New Year in a +14:00 zone is still Dec 31 in UTC: yearly sees two years.
        let t = ["2026-12-31T20:00:00+00:00", "2027-01-01T08:00:00+14:00"];
        assert_eq!(kept(&Policy { yearly: 5, ..Policy::default() }, &t), vec![0, 1]);
    }

    #[test]
    fn iso_weeks_span_years() {
        // Mon 2026-12-28 .. Sun 2027-01-03 are ISO week 53 of 2026; Jan 4 2027 starts week 1.
        let t = ["2026-12-28T10:00:00Z", "2027-01-03T10:00:00Z", "2027-01-04T10:00:00Z"];
        assert_eq!(kept(&Policy { weekly: 5, ..Policy::default() }, &t), vec![1, 2]);
    }

    #[test]
    fn grouping_by_tags_applies_the_policy_per_tag_set() {
        let snaps = vec![
            (SnapshotId([0; 32]), snap("2026-03-01T10:00:00Z", "a", &["db"])),
            (SnapshotId([1; 32]), snap("2026-03-02T10:00:00Z", "a", &["db"])),
            (SnapshotId([2; 32]), snap("2026-03-03T10:00:00Z", "a", &["web"])),
        ];
        let policy = Policy { last: 1, ..Policy::default() };
        let by_tags = apply(&policy, GroupBy { host: true, paths: true, tags: true }, &snaps);
        assert_eq!(by_tags.len(), 2);
        assert_eq!(by_tags[0].tags, vec!["db".to_string()]);
        assert_eq!(by_tags[0].remove, vec![SnapshotId([0; 32])]);
        assert!(by_tags[1].remove.is_empty(), "the newest web snapshot is its group's last");
        let together = apply(&policy, GroupBy::default(), &snaps);
        assert_eq!(together.len(), 1);
        assert_eq!(together[0].remove.len(), 2);
    }

    #[test]
    fn tags_keep_regardless_and_groups_are_separate() {
        let snaps = vec![
            (SnapshotId([0; 32]), snap("2026-03-01T10:00:00Z", "a", &["keep"])),
            (SnapshotId([1; 32]), snap("2026-03-02T10:00:00Z", "a", &[])),
            (SnapshotId([2; 32]), snap("2026-03-03T10:00:00Z", "a", &[])),
            (SnapshotId([3; 32]), snap("2026-03-01T10:00:00Z", "b", &[])),
        ];
        let policy = Policy { last: 1, tags: vec!["keep".into()], ..Policy::default() };
        let d = apply(&policy, GroupBy::default(), &snaps);
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].hostname.as_str(), d[1].hostname.as_str()), ("a", "b"));
        assert_eq!(
            d[0].keep,
            vec![
                Kept { id: SnapshotId([2; 32]), reasons: vec!["last"] },
                Kept { id: SnapshotId([0; 32]), reasons: vec!["tag"] }
            ]
        );
        assert_eq!(d[0].remove, vec![SnapshotId([1; 32])]);
        assert_eq!(d[1].keep.len(), 1, "host b's only snapshot is its last");
        // Not grouped by host: one group, one "last".
        let d = apply(&policy, GroupBy { host: false, paths: true, tags: false }, &snaps);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].keep.len(), 2);
        assert_eq!(d[0].remove, vec![SnapshotId([1; 32]), SnapshotId([3; 32])]);
    }

    #[test]
    fn equal_times_are_ordered_by_id_and_empty_policy_is_detected() {
        let t = ["2026-03-01T10:00:00Z", "2026-03-01T10:00:00Z"];
        assert_eq!(kept(&Policy { last: 1, ..Policy::default() }, &t), vec![1]);
        assert!(Policy::default().is_empty());
        assert_eq!(kept(&Policy::default(), &t), Vec::<u8>::new());
    }
}
