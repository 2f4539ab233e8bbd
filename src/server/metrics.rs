//! Counters and a latency histogram, rendered in the Prometheus text format.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::ingest::IngestStats;

/// Upper bounds (seconds) of the latency histogram's buckets.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
pub struct Metrics {
    /// (route, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
    pub checkin_failures: AtomicU64,
    /// Session token id -> expiry (unix seconds) of sessions seen here.
    sessions: Mutex<HashMap<[u8; 16], i64>>,
}

impl Metrics {
    pub fn record(&self, route: &str, status: u16, bytes_in: u64, bytes_out: u64, secs: f64) {
        *self.requests.lock().expect("metrics lock").entry((route.to_owned(), status)).or_default() += 1;
        self.bytes_in.fetch_add(bytes_in, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes_out, Ordering::Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Notes a session in use, for the active-sessions gauge.
    pub fn session_seen(&self, token_id: [u8; 16], expires: i64, now: i64) {
        let mut s = self.sessions.lock().expect("metrics lock");
        if s.len() > 100_000 {
            s.retain(|_, e| *e > now);
        }
        s.insert(token_id, expires);
    }

    pub fn render(&self, ingest: Option<&IngestStats>, now: i64) -> String {
        let mut out = String::new();
        out.push_str("# TYPE chunkvault_requests_total counter\n");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "chunkvault_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, v: u64| {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {v}");
        };
        counter(&mut out, "chunkvault_bytes_in_total", self.bytes_in.load(Ordering::Relaxed));
        counter(&mut out, "chunkvault_bytes_out_total", self.bytes_out.load(Ordering::Relaxed));
        counter(&mut out, "chunkvault_checkin_failures_total", self.checkin_failures.load(Ordering::Relaxed));
        if let Some(s) = ingest {
            counter(&mut out, "chunkvault_chunks_stored_total", s.chunks_stored.load(Ordering::Relaxed));
            counter(&mut out, "chunkvault_chunks_deduplicated_total", s.chunks_deduplicated.load(Ordering::Relaxed));
            counter(&mut out, "chunkvault_snapshots_committed_total", s.snapshots_committed.load(Ordering::Relaxed));
        }
        let active = {
            let mut s = self.sessions.lock().expect("metrics lock");
            s.retain(|_, e| *e > now);
            s.len()
        };
        let _ = writeln!(out, "# TYPE chunkvault_active_sessions gauge\nchunkvault_active_sessions {active}");
        out.push_str("# TYPE chunkvault_request_duration_seconds histogram\n");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.latency_buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "chunkvault_request_duration_seconds_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(out, "chunkvault_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "chunkvault_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "chunkvault_request_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_histogram_and_sessions() {
        let m = Metrics::default();
        m.record("/v1/session", 200, 10, 20, 0.003);
        m.record("/v1/session", 200, 1, 2, 20.0);
        m.session_seen([1; 16], 100, 50);
        m.session_seen([2; 16], 40, 50);
        let text = m.render(None, 50);
        assert!(text.contains("chunkvault_requests_total{route=\"/v1/session\",status=\"200\"} 2"));
        assert!(text.contains("chunkvault_bytes_in_total 11"));
        assert!(text.contains("chunkvault_request_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("chunkvault_request_duration_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("chunkvault_active_sessions 1"));
    }
}
