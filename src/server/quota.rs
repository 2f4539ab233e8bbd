//! Tenant storage quotas on the storage side: what each tenant stores, and
//! refusing a chunk upload that would take it past its quota.
//!
//! The auth role keeps the quotas (`admin tenant set-quota`); a storage
//! node learns them at each check-in (the `all` role directly). A tenant's
//! stored bytes are counted from its repository (the sizes of its packs,
//! plus the chunks its writer holds uncommitted) when first needed and
//! again every `recount_after`; between counts, every admitted upload adds
//! its chunks' plaintext length, which is at least what they will take
//! once compressed. So the count errs high between counts, never low, and
//! a node never lets a tenant past its quota by more than the uploads in
//! flight at one moment on other nodes.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::api::{TenantQuota, TenantUsage};
use crate::id::BlobId;
use crate::ingest::Tenant;
use crate::repo::RepoError;

/// Why an upload was refused, or the count failed.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The upload would take the tenant past its quota; nothing of it was
    /// stored.
    #[error(
        "tenant {tenant} has a storage quota of {quota} bytes and stores {stored}; these chunks need {incoming} more. \
         Nothing was committed; the administrator can raise the quota (admin tenant set-quota) or old snapshots can be forgotten"
    )]
    Exceeded {
        /// The tenant whose upload was refused.
        tenant: String,
        /// Its quota in bytes.
        quota: u64,
        /// Bytes it stores by this node's count (which errs high, never low).
        stored: u64,
        /// Plaintext bytes of the upload's chunks that the repository lacks.
        incoming: u64,
    },
    /// Listing the tenant's packs or snapshots to count what it stores failed.
    #[error("counting the tenant's stored bytes: {0}")]
    Count(#[from] RepoError),
}

/// One tenant's count.
struct Tracked {
    tenant: Arc<Tenant>,
    /// Bytes found by the last count, and when it started.
    counted: Option<(Instant, u64)>,
    /// Bytes admitted since the last count started.
    added: u64,
    /// Uploads since the last usage report.
    dirty: bool,
    /// When it was last touched (an upload or a commit).
    touched: Instant,
}

/// Quotas and stored bytes of the tenants this node serves.
pub struct Quotas {
    limits: RwLock<HashMap<String, u64>>,
    tenants: Mutex<HashMap<String, Tracked>>,
    recount_after: Duration,
}

impl Quotas {
    /// No quotas yet; stored bytes are counted again after `recount_after`.
    pub fn new(recount_after: Duration) -> Quotas {
        Quotas { limits: RwLock::default(), tenants: Mutex::default(), recount_after }
    }

    /// Replaces every quota (the check-in's whole list; absent: none).
    pub fn set_all(&self, quotas: &[TenantQuota]) {
        let limits = quotas.iter().filter(|q| q.quota_bytes > 0).map(|q| (q.tenant.clone(), q.quota_bytes));
        *self.limits.write().expect("quota lock") = limits.collect();
    }

    /// Sets one tenant's quota (0: none).
    pub fn set(&self, tenant: &str, quota_bytes: u64) {
        let mut limits = self.limits.write().expect("quota lock");
        if quota_bytes == 0 {
            limits.remove(tenant);
        } else {
            limits.insert(tenant.to_owned(), quota_bytes);
        }
    }

    /// Notes a tenant with new data or snapshots: the next usage report counts it.
    pub fn touch(&self, name: &str, tenant: &Arc<Tenant>) {
        let mut tenants = self.tenants.lock().expect("quota lock");
        let t = tenants.entry(name.to_owned()).or_insert_with(|| Tracked {
            tenant: tenant.clone(),
            counted: None,
            added: 0,
            dirty: true,
            touched: Instant::now(),
        });
        t.dirty = true;
        t.touched = Instant::now();
        // A tenant is opened once per process; keep the one in use.
        t.tenant = tenant.clone();
    }

    /// Admits an upload of `chunks` (id and plaintext length) to tenant
    /// `name`, or refuses it when the chunks the tenant lacks would take it
    /// past its quota. The admitted bytes count at once (so concurrent
    /// uploads see them); dropping the [`Admission`] without
    /// [`settle`](Admission::settle) gives them back.
    pub fn admit<'a>(
        &'a self,
        name: &str,
        tenant: &Arc<Tenant>,
        chunks: &[(BlobId, usize)],
    ) -> Result<Admission<'a>, QuotaError> {
        self.touch(name, tenant);
        let Some(quota) = self.limits.read().expect("quota lock").get(name).copied() else {
            return Ok(Admission { quotas: self, tenant: name.to_owned(), bytes: 0 });
        };
        let ids: Vec<BlobId> = chunks.iter().map(|(id, _)| *id).collect();
        let missing: HashSet<BlobId> = tenant.missing(&ids).into_iter().collect();
        let mut seen = HashSet::new();
        let incoming: u64 =
            chunks.iter().filter(|(id, _)| missing.contains(id) && seen.insert(*id)).map(|(_, n)| *n as u64).sum();
        if incoming == 0 {
            return Ok(Admission { quotas: self, tenant: name.to_owned(), bytes: 0 });
        }
        self.count_if_stale(name)?;
        let mut tenants = self.tenants.lock().expect("quota lock");
        let t = tenants.get_mut(name).expect("touched above");
        let stored = t.counted.map_or(0, |(_, n)| n).saturating_add(t.added);
        if stored.saturating_add(incoming) > quota {
            return Err(QuotaError::Exceeded { tenant: name.to_owned(), quota, stored, incoming });
        }
        t.added += incoming;
        Ok(Admission { quotas: self, tenant: name.to_owned(), bytes: incoming })
    }

    /// Counts the tenant again if its count is older than `recount_after`.
    fn count_if_stale(&self, name: &str) -> Result<(), QuotaError> {
        let (tenant, stale) = {
            let tenants = self.tenants.lock().expect("quota lock");
            let t = tenants.get(name).expect("touched before");
            (t.tenant.clone(), t.counted.map_or(true, |(at, _)| at.elapsed() >= self.recount_after))
        };
        if stale {
            self.count(name, &tenant)?;
        }
        Ok(())
    }

    /// Counts a tenant's stored bytes and snapshots from its repository,
    /// without holding the lock over the listing: uploads admitted while it
    /// runs stay counted.
    fn count(&self, name: &str, tenant: &Tenant) -> Result<TenantUsage, QuotaError> {
        let started = Instant::now();
        let added_before = self.tenants.lock().expect("quota lock").get(name).map_or(0, |t| t.added);
        let packs: u64 = tenant.repo().pack_sizes()?.values().sum();
        let stored_bytes = packs + tenant.pending_bytes();
        let snapshots = tenant.repo().snapshot_ids()?.len() as u64;
        if let Some(t) = self.tenants.lock().expect("quota lock").get_mut(name) {
            t.counted = Some((started, stored_bytes));
            t.added = t.added.saturating_sub(added_before);
        }
        Ok(TenantUsage { tenant: name.to_owned(), stored_bytes, snapshots })
    }

    /// Counts every tenant touched since the last report, for the check-in
    /// (or, in the `all` role, the tenants listing). A tenant whose count
    /// fails is left out and stays due.
    pub fn report(&self) -> Vec<TenantUsage> {
        let due: Vec<(String, Arc<Tenant>)> = {
            let mut tenants = self.tenants.lock().expect("quota lock");
            tenants
                .iter_mut()
                .filter(|(_, t)| t.dirty)
                .map(|(name, t)| {
                    t.dirty = false;
                    (name.clone(), t.tenant.clone())
                })
                .collect()
        };
        let mut out = Vec::with_capacity(due.len());
        for (name, tenant) in due {
            match self.count(&name, &tenant) {
                Ok(usage) => out.push(usage),
                Err(e) => {
                    tracing::warn!("counting tenant {name}'s usage: {e}");
                    if let Some(t) = self.tenants.lock().expect("quota lock").get_mut(&name) {
                        t.dirty = true;
                    }
                }
            }
        }
        out
    }

    /// The tenants touched (an upload or a commit) within `within`: those
    /// whose snapshots may have changed, for the snapshot catalog the
    /// node reports at check-in.
    pub fn recently_touched(&self, within: Duration) -> Vec<(String, Arc<Tenant>)> {
        let tenants = self.tenants.lock().expect("quota lock");
        tenants
            .iter()
            .filter(|(_, t)| t.touched.elapsed() <= within)
            .map(|(n, t)| (n.clone(), t.tenant.clone()))
            .collect()
    }

    fn release(&self, name: &str, bytes: u64) {
        if let Some(t) = self.tenants.lock().expect("quota lock").get_mut(name) {
            t.added = t.added.saturating_sub(bytes);
        }
    }
}

/// Bytes an upload was admitted with; given back when dropped unsettled
/// (the upload failed).
pub struct Admission<'a> {
    quotas: &'a Quotas,
    tenant: String,
    bytes: u64,
}

impl Admission<'_> {
    /// The upload went through: keep the admitted bytes counted if it
    /// stored anything (a chunk another upload stored first is counted
    /// until the next count), give them back if it stored nothing.
    pub fn settle(mut self, stored_any: bool) {
        if stored_any {
            self.bytes = 0;
        }
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.quotas.release(&self.tenant, self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::TenantName;
    use crate::test_support::tenants;

    fn chunk(t: &Tenant, seed: u8, len: usize) -> (BlobId, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        (t.repo().blob_id(&data), data)
    }

    #[test]
    fn uploads_past_the_quota_are_refused_and_failed_ones_give_bytes_back() {
        let dir = tempfile::tempdir().unwrap();
        let all = tenants(dir.path());
        let t = all.get(&TenantName::new("acme").unwrap()).unwrap();
        let q = Quotas::new(Duration::from_secs(3600));
        let (a, data_a) = chunk(&t, 1, 600);
        // No quota: anything goes, nothing counted.
        q.admit("acme", &t, &[(a, 10_000_000)]).unwrap().settle(true);
        q.set("acme", 1000);
        let first = q.admit("acme", &t, &[(a, data_a.len())]).unwrap();
        assert_eq!(first.bytes, 600);
        // While the first is in flight, its bytes count.
        let (b, data_b) = chunk(&t, 2, 500);
        let refused = q.admit("acme", &t, &[(b, data_b.len())]).err().expect("over the quota");
        assert!(matches!(refused, QuotaError::Exceeded { quota: 1000, stored: 600, incoming: 500, .. }));
        // The first fails (dropped unsettled): its bytes come back.
        drop(first);
        let second = q.admit("acme", &t, &[(b, data_b.len()), (b, data_b.len())]).unwrap();
        assert_eq!(second.bytes, 500, "a chunk twice in a bundle counts once");
        assert!(t.put_chunk(b, data_b).unwrap());
        second.settle(true);
        // A chunk the tenant has costs nothing, even at the quota.
        q.set("acme", 500);
        assert_eq!(q.admit("acme", &t, &[(b, 500)]).unwrap().bytes, 0);
        assert!(q.admit("acme", &t, &[(a, 600)]).is_err());
        // Other tenants and a removed quota are not limited.
        let g = all.get(&TenantName::new("globex").unwrap()).unwrap();
        q.admit("globex", &g, &[(a, 600)]).unwrap();
        q.set("acme", 0);
        q.admit("acme", &t, &[(a, 600)]).unwrap();
    }

    #[test]
    fn the_report_counts_touched_tenants_from_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let all = tenants(dir.path());
        let t = all.get(&TenantName::new("acme").unwrap()).unwrap();
        let q = Quotas::new(Duration::ZERO);
        assert!(q.report().is_empty());
        let (a, data) = chunk(&t, 3, 4096);
        q.set_all(&[TenantQuota { tenant: "acme".into(), quota_bytes: 1 << 20 }]);
        q.admit("acme", &t, &[(a, data.len())]).unwrap().settle(true);
        t.put_chunk(a, data).unwrap();
        let report = q.report();
        assert_eq!(report.len(), 1);
        // The writer holds the chunk uncommitted: counted at its length.
        assert!(report[0].stored_bytes >= 4096, "{report:?}");
        assert_eq!(report[0].snapshots, 0);
        assert!(q.report().is_empty(), "reported once until touched again");
        // A quota list without the tenant removes its quota.
        q.set_all(&[]);
        q.admit("acme", &t, &[(BlobId([9; 32]), 1 << 30)]).unwrap();
    }
}
