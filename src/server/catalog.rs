//! The storage side's account of its tenants' snapshots, for the console's
//! device and tenant pages: which snapshots each tenant holds, who took
//! each, when, and how big (never paths or contents). A storage node sends
//! it up with its check-in; in the `all` role it goes to the registry
//! directly ([`super::fleet::sync_local`]).
//!
//! A tenant is looked at while it is in use (an upload or a commit within
//! [`RECHECK`]: a commit touches its tenant before it writes the snapshot,
//! so one look right after a touch may come too early). The first look in
//! a process reports every snapshot the tenant holds (a rescan, over as
//! many reports as the check-in's bounds take), later ones only what
//! changed. A report that does not arrive starts every rescan again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::{self, SnapshotRecord, TenantSnapshots, MAX_CHECKIN_REMOVED, MAX_CHECKIN_SNAPSHOTS};
use crate::backend::{FileType, ObjectKey};
use crate::id::SnapshotId;
use crate::ingest::Tenant;
use crate::snapshot::Snapshot;

/// How long after its last upload or commit a tenant's snapshots are
/// listed again at each report.
pub const RECHECK: Duration = Duration::from_secs(600);

/// What one tenant's reports have said so far.
struct Known {
    tenant: Arc<Tenant>,
    /// Snapshots reported (and not reported removed since).
    sent: HashSet<SnapshotId>,
    /// The rescan's first report is still to be made.
    fresh: bool,
    /// A rescan has snapshots left to report.
    scanning: bool,
}

/// Snapshots reported per tenant; one report at a time.
#[derive(Default)]
pub struct Catalog {
    tenants: Mutex<HashMap<String, Known>>,
}

impl Catalog {
    /// Reports what changed in the snapshots of the `due` tenants, and of
    /// any tenant whose rescan is unfinished, within the check-in's bounds:
    /// `deliver` gets the report (possibly empty) and says whether it
    /// arrived. Reports are made one at a time, in order. Returns what
    /// `deliver` returned, and whether a rescan has more to report.
    pub fn report<T, E>(
        &self,
        due: Vec<(String, Arc<Tenant>)>,
        deliver: impl FnOnce(Vec<TenantSnapshots>) -> Result<T, E>,
    ) -> (Result<T, E>, bool) {
        let mut tenants = self.tenants.lock().expect("catalog lock");
        let mut names: Vec<String> = Vec::new();
        for (name, tenant) in due {
            let known = tenants.entry(name.clone()).or_insert_with(|| Known {
                tenant: tenant.clone(),
                sent: HashSet::new(),
                fresh: true,
                scanning: true,
            });
            known.tenant = tenant;
            names.push(name);
        }
        let scanning: Vec<String> =
            tenants.iter().filter(|(n, k)| k.scanning && !names.contains(n)).map(|(n, _)| n.clone()).collect();
        names.extend(scanning);
        names.sort();
        let (mut added_left, mut removed_left) = (MAX_CHECKIN_SNAPSHOTS, MAX_CHECKIN_REMOVED);
        let mut out = Vec::new();
        for name in names {
            if added_left == 0 || removed_left == 0 {
                break;
            }
            let known = tenants.get_mut(&name).expect("listed above");
            if let Some(entry) = changes(&name, known, &mut added_left, &mut removed_left) {
                out.push(entry);
            }
        }
        let result = deliver(out);
        if result.is_err() {
            // What was sent may not have arrived: start over.
            for known in tenants.values_mut() {
                known.sent.clear();
                known.fresh = true;
                known.scanning = true;
            }
        }
        let more = tenants.values().any(|k| k.scanning);
        (result, more)
    }
}

/// One tenant's changes since its last report, if there is anything to say.
fn changes(name: &str, known: &mut Known, added_left: &mut usize, removed_left: &mut usize) -> Option<TenantSnapshots> {
    let present: HashSet<SnapshotId> = match known.tenant.repo().backend().list(FileType::Snapshot) {
        Ok(list) => list
            .into_iter()
            .filter_map(|(key, _)| match key {
                ObjectKey::Snapshot(id) => Some(id),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::warn!("listing tenant {name}'s snapshots for the console: {e}");
            return None;
        }
    };
    let mut entry = TenantSnapshots {
        tenant: name.to_owned(),
        rescan: known.fresh,
        complete: false,
        added: vec![],
        removed: vec![],
    };
    known.fresh = false;
    let gone: Vec<SnapshotId> = known.sent.difference(&present).copied().take(*removed_left).collect();
    for id in &gone {
        known.sent.remove(id);
    }
    *removed_left -= gone.len();
    entry.removed = gone;
    let mut new: Vec<SnapshotId> = present.difference(&known.sent).copied().collect();
    new.sort();
    let take = new.len().min(*added_left);
    for id in &new[..take] {
        // An unreadable snapshot is left out (and not tried again this
        // process): the console lists what the repository can show.
        match known.tenant.repo().load_snapshot(id) {
            Ok(s) => entry.added.push(record(*id, &s)),
            Err(e) => tracing::warn!("tenant {name}: snapshot {id} for the console: {e}"),
        }
        known.sent.insert(*id);
    }
    *added_left -= take;
    if known.scanning && take == new.len() {
        known.scanning = false;
        entry.complete = true;
    }
    let something = entry.rescan || entry.complete || !entry.added.is_empty() || !entry.removed.is_empty();
    something.then_some(entry)
}

/// A snapshot's record; a device or user the API would refuse is left out
/// rather than holding up the whole report.
fn record(id: SnapshotId, s: &Snapshot) -> SnapshotRecord {
    let sum = &s.summary;
    SnapshotRecord {
        id,
        time: s.time.to_utc(),
        device: s.device.clone().filter(|d| api::check_device_id(d).is_ok()),
        user: s.user.clone().filter(|u| api::check_email(u).is_ok()),
        files: sum.files_new + sum.files_changed + sum.files_unmodified,
        bytes: sum.total_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::{Owner, TenantName};
    use crate::test_support::tenants;

    fn commit(t: &Tenant, device: &str) -> SnapshotId {
        let owner = Owner {
            tenant: TenantName::new("acme").unwrap(),
            user: "a@acme.com".into(),
            device: device.into(),
            policies: Default::default(),
        };
        let req = api::CommitRequest { hostname: "h".into(), paths: vec!["/d".into()], tags: vec![], files: vec![] };
        t.commit(owner, req).unwrap().id
    }

    /// One report, delivered (or not).
    fn report(c: &Catalog, due: &[(String, Arc<Tenant>)], arrives: bool) -> (Vec<TenantSnapshots>, bool) {
        let mut got = Vec::new();
        let (r, more) = c.report(due.to_vec(), |batch| {
            got = batch;
            if arrives {
                Ok(())
            } else {
                Err("unreachable")
            }
        });
        assert_eq!(r.is_ok(), arrives);
        (got, more)
    }

    #[test]
    fn a_first_report_rescans_later_ones_send_changes_and_a_lost_one_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let all = tenants(dir.path());
        let t = all.get(&TenantName::new("acme").unwrap()).unwrap();
        let a = commit(&t, "phone");
        let due = vec![("acme".to_owned(), t.clone())];
        let c = Catalog::default();
        let (first, more) = report(&c, &due, true);
        assert!(!more);
        assert_eq!(first.len(), 1);
        let e = &first[0];
        assert!(e.rescan && e.complete);
        assert_eq!(e.added.iter().map(|s| (s.id, s.device.as_deref())).collect::<Vec<_>>(), [(a, Some("phone"))]);
        // Nothing new: nothing to say.
        assert!(report(&c, &due, true).0.is_empty());
        let b = commit(&t, "tablet");
        t.repo().backend().remove(&ObjectKey::Snapshot(a)).unwrap();
        let (delta, _) = report(&c, &due, true);
        assert_eq!((delta[0].rescan, delta[0].complete), (false, false));
        assert_eq!(delta[0].added.iter().map(|s| s.id).collect::<Vec<_>>(), [b]);
        assert_eq!(delta[0].removed, [a]);
        // A report that did not arrive: the next one rescans, even of a
        // tenant no longer due.
        let c2 = commit(&t, "tablet");
        assert_eq!(report(&c, &due, false).0[0].added.len(), 1);
        let (again, _) = report(&c, &[], true);
        assert!(again[0].rescan && again[0].complete);
        let mut ids: Vec<_> = again[0].added.iter().map(|s| s.id).collect();
        ids.sort();
        let mut want = vec![b, c2];
        want.sort();
        assert_eq!(ids, want);
    }
}
