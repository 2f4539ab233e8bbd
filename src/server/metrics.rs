//! The server's metrics, kept and rendered by the `prometheus-client`
//! crate in the Prometheus text format: every series has HELP and TYPE, and
//! units are in the names (`_seconds`, `_bytes_total`).
//!
//! Request metrics are labelled by route template (never the raw path, so
//! a snapshot path or a chunk id never becomes a label), method and status
//! class, which keeps the number of series bounded. Per-tenant gauges are
//! computed at scrape time from the tenants' indexes.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::id::BlobKind;
use crate::ingest::IngestStats;
use crate::repo::Repository;

/// The `Content-Type` of `/metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the request duration buckets: from a cached
/// `missing` query (about a millisecond) to a large restore stream.
const BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 120.0];

/// Labels of a request's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    /// The route template (`/v1/snapshots/{id}/file`), or `unmatched`.
    route: String,
    method: String,
    /// `2xx`, `4xx`, ...
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type HistogramFamily = Family<RequestLabels, Histogram, fn() -> Histogram>;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    request_duration: HistogramFamily,
    request_bytes: Counter,
    response_bytes: Counter,
    /// Check-ins with the auth role that failed (storage role).
    pub checkin_failures: Counter,
    chunks_offered: Family<TenantLabel, Counter>,
    dedup_hits: Family<TenantLabel, Counter>,
    uploads_in_flight: Gauge,
    active_sessions: Gauge,
    tenant_stored_bytes: Family<TenantLabel, Gauge>,
    tenant_chunks: Family<TenantLabel, Gauge>,
    /// Session token id -> expiry (unix seconds) of sessions seen here.
    sessions: Mutex<HashMap<[u8; 16], i64>>,
    /// Tenants this process has served (verified sessions only), whose
    /// usage the per-tenant gauges report.
    tenants: Mutex<BTreeSet<String>>,
}

/// The storage side's counters (kept by [`crate::ingest`]), read at scrape.
#[derive(Debug)]
struct IngestCollector(Arc<IngestStats>);

impl Collector for IngestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        for (name, help, value) in [
            ("chunks_stored", "Chunks stored that the tenant's repository lacked.", &s.chunks_stored),
            ("chunks_deduplicated", "Chunks uploaded that the repository already held.", &s.chunks_deduplicated),
            ("snapshots_committed", "Snapshots committed by devices.", &s.snapshots_committed),
            ("tenants_closed", "Tenants closed after being idle (tenant_idle_secs).", &s.tenants_closed),
        ] {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let open = ConstGauge::new(s.tenants_open.load(Ordering::Relaxed) as i64);
        let help = "Tenants open: index in memory, writer thread running.";
        open.encode(encoder.encode_descriptor("tenants_open", help, None, open.metric_type())?)?;
        Ok(())
    }
}

impl Metrics {
    /// The metrics of a server; `ingest` is the storage role's counters.
    pub fn new(ingest: Option<Arc<IngestStats>>) -> Metrics {
        let mut registry = Registry::with_prefix("chunkvault");
        let m = Metrics {
            request_duration: HistogramFamily::new_with_constructor(|| Histogram::new(BUCKETS)),
            request_bytes: Counter::default(),
            response_bytes: Counter::default(),
            checkin_failures: Counter::default(),
            chunks_offered: Family::default(),
            dedup_hits: Family::default(),
            uploads_in_flight: Gauge::default(),
            active_sessions: Gauge::default(),
            tenant_stored_bytes: Family::default(),
            tenant_chunks: Family::default(),
            sessions: Mutex::default(),
            tenants: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "build",
            "The running chunkvault's version.",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION").into() }),
        );
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's arrival to the end of its response body, by route template, method and \
             status class.",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        registry.register_with_unit(
            "http_request_body",
            "Bytes of request bodies read.",
            Unit::Bytes,
            m.request_bytes.clone(),
        );
        registry.register_with_unit(
            "http_response_body",
            "Bytes of response bodies sent.",
            Unit::Bytes,
            m.response_bytes.clone(),
        );
        registry.register("checkin_failures", "Check-ins with the auth role that failed.", m.checkin_failures.clone());
        registry.register(
            "chunks_offered",
            "Chunk ids devices asked about before uploading (chunks/missing), by tenant.",
            m.chunks_offered.clone(),
        );
        registry.register(
            "dedup_hits",
            "Chunks offered that the tenant's repository already held, so were not uploaded, by tenant.",
            m.dedup_hits.clone(),
        );
        registry.register("uploads_in_flight", "Chunk uploads being handled now.", m.uploads_in_flight.clone());
        registry.register("active_sessions", "Unexpired session tokens seen here.", m.active_sessions.clone());
        registry.register_with_unit(
            "tenant_stored",
            "Bytes of data chunks stored (compressed and encrypted) in the tenant's repository.",
            Unit::Bytes,
            m.tenant_stored_bytes.clone(),
        );
        registry.register("tenant_chunks", "Data chunks in the tenant's repository.", m.tenant_chunks.clone());
        if let Some(stats) = ingest {
            registry.register_collector(Box::new(IngestCollector(stats)));
        }
        Metrics { registry, ..m }
    }

    /// Records one finished request.
    pub fn record(&self, route: &str, method: &str, status: u16, bytes_in: u64, bytes_out: u64, secs: f64) {
        let labels =
            RequestLabels { route: route.to_owned(), method: method.to_owned(), status: format!("{}xx", status / 100) };
        self.request_duration.get_or_create(&labels).observe(secs);
        self.request_bytes.inc_by(bytes_in);
        self.response_bytes.inc_by(bytes_out);
    }

    /// Notes a verified session in use, for the active-sessions gauge and
    /// the per-tenant gauges.
    pub fn session_seen(&self, tenant: &str, token_id: [u8; 16], expires: i64, now: i64) {
        let mut s = self.sessions.lock().expect("metrics lock");
        if s.len() > 100_000 {
            s.retain(|_, e| *e > now);
        }
        s.insert(token_id, expires);
        drop(s);
        let mut t = self.tenants.lock().expect("metrics lock");
        if !t.contains(tenant) {
            t.insert(tenant.to_owned());
        }
    }

    /// Counts a `chunks/missing` query: `offered` ids, of which `missing`
    /// the tenant lacked.
    pub fn chunks_offered(&self, tenant: &str, offered: usize, missing: usize) {
        let label = TenantLabel { tenant: tenant.to_owned() };
        self.chunks_offered.get_or_create(&label).inc_by(offered as u64);
        self.dedup_hits.get_or_create(&label).inc_by(offered.saturating_sub(missing) as u64);
    }

    /// Counts an upload in flight until the guard is dropped.
    pub fn upload_started(&self) -> InFlight {
        self.uploads_in_flight.inc();
        InFlight(self.uploads_in_flight.clone())
    }

    /// Tenants whose usage the per-tenant gauges report.
    pub fn tenants(&self) -> Vec<String> {
        self.tenants.lock().expect("metrics lock").iter().cloned().collect()
    }

    /// Sets a tenant's usage gauges (from [`usage`]).
    pub fn set_tenant_usage(&self, tenant: &str, usage: Usage) {
        let label = TenantLabel { tenant: tenant.to_owned() };
        self.tenant_chunks.get_or_create(&label).set(usage.chunks as i64);
        self.tenant_stored_bytes.get_or_create(&label).set(usage.stored_bytes as i64);
    }

    /// The text of a scrape at `now` (unix seconds).
    pub fn render(&self, now: i64) -> String {
        let active = {
            let mut s = self.sessions.lock().expect("metrics lock");
            s.retain(|_, e| *e > now);
            s.len()
        };
        self.active_sessions.set(active as i64);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// An upload in flight, counted until dropped.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A tenant repository's data chunks and their stored bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Data chunks in the index (tree blobs are left out).
    pub chunks: u64,
    /// Bytes those chunks take in packs (compressed and sealed).
    pub stored_bytes: u64,
}

/// Sums a repository's data chunks from its in-memory index: a walk of
/// 46-byte entries under the index's read lock, a few milliseconds per
/// million chunks.
pub fn usage(repo: &Repository) -> Usage {
    let index = repo.index();
    let mut u = Usage::default();
    for (_, loc) in index.iter().filter(|(_, loc)| loc.kind == BlobKind::Data) {
        u.chunks += 1;
        u.stored_bytes += u64::from(loc.stored_len);
    }
    u
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample line's metric family has HELP and TYPE lines before it.
    fn assert_described(text: &str) {
        let mut described = BTreeSet::new();
        let mut typed = BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                described.insert(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap().to_owned());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(described.contains(family) && typed.contains(family), "{line}: no HELP/TYPE");
            }
        }
    }

    #[test]
    fn renders_described_series_with_units_and_route_labels() {
        let stats = Arc::new(IngestStats::default());
        stats.chunks_stored.fetch_add(3, Ordering::Relaxed);
        let m = Metrics::new(Some(stats));
        m.record("/v1/session", "POST", 200, 10, 20, 0.003);
        m.record("/v1/session", "POST", 201, 1, 2, 200.0);
        m.session_seen("acme", [1; 16], 100, 50);
        m.session_seen("acme", [2; 16], 40, 50);
        m.chunks_offered("acme", 10, 4);
        m.set_tenant_usage("acme", Usage { chunks: 5, stored_bytes: 500 });
        let guard = m.upload_started();
        let text = m.render(50);
        assert_described(&text);
        for want in [
            "chunkvault_build_info{version=\"",
            "chunkvault_http_request_duration_seconds_bucket{route=\"/v1/session\",method=\"POST\",status=\"2xx\",le=\"0.005\"} 1",
            "chunkvault_http_request_duration_seconds_count{route=\"/v1/session\",method=\"POST\",status=\"2xx\"} 2",
            "chunkvault_http_request_body_bytes_total 11",
            "chunkvault_http_response_body_bytes_total 22",
            "chunkvault_active_sessions 1",
            "chunkvault_chunks_offered_total{tenant=\"acme\"} 10",
            "chunkvault_dedup_hits_total{tenant=\"acme\"} 6",
            "chunkvault_tenant_stored_bytes{tenant=\"acme\"} 500",
            "chunkvault_tenant_chunks{tenant=\"acme\"} 5",
            "chunkvault_uploads_in_flight 1",
            "chunkvault_chunks_stored_total 3",
        ] {
            assert!(text.contains(want), "{want} not in\n{text}");
        }
        drop(guard);
        assert!(m.render(50).contains("chunkvault_uploads_in_flight 0"));
        assert_eq!(m.tenants(), ["acme"]);
    }
}
