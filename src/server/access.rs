//! What each request did, for the metrics and the access log: one line per
//! request with its method, route template, status, body bytes both ways,
//! duration, and the tenant and device it acted for.
//!
//! The line is written when the response body ends (or the client goes
//! away), so a streamed restore is timed and counted in full. It names the
//! route template, never the raw path or query (which can carry a snapshot
//! path), and never a header: no token reaches the log.
//!
//! Who a request acts for is known only once a handler has verified its
//! token, deep inside the route; [`note`] records it in a task-local slot
//! that [`observe`] set up around the request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use hyper::body::{Frame, SizeHint};

use super::App;

/// Who a request acted for, as far as it got.
#[derive(Default)]
struct Who {
    tenant: Option<String>,
    device: Option<String>,
}

tokio::task_local! {
    static WHO: Arc<Mutex<Who>>;
}

/// Records the tenant and device a request acts for (each only if known),
/// for its access log line. Outside a request, does nothing.
pub fn note(tenant: Option<&str>, device: Option<&str>) {
    let _ = WHO.try_with(|who| {
        let mut who = who.lock().expect("access lock");
        if let Some(t) = tenant {
            who.tenant = Some(t.to_owned());
        }
        if let Some(d) = device {
            who.device = Some(d.to_owned());
        }
    });
}

/// The HTTP methods that become a label as they are; any other is `other`,
/// so a client cannot mint metric series.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Middleware around every route: counts body bytes both ways and, when
/// the response body ends, records the request's metrics and writes its
/// access log line.
pub async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_owned();
    let method = method_label(req.method());
    let bytes_in = Arc::new(AtomicU64::new(0));
    let counter = bytes_in.clone();
    let req = req.map(|body| Body::new(Counted { inner: body, count: counter, done: None }));
    let who = Arc::new(Mutex::new(Who::default()));
    let resp = WHO.scope(who.clone(), next.run(req)).await;
    let done = Done { app, route, method, status: resp.status().as_u16(), started, bytes_in, who };
    resp.map(|body| Body::new(Counted { inner: body, count: Arc::default(), done: Some(done) }))
}

/// What is recorded when a response body ends.
struct Done {
    app: Arc<App>,
    route: String,
    method: &'static str,
    status: u16,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    who: Arc<Mutex<Who>>,
}

impl Done {
    fn finish(self, bytes_out: u64) {
        let secs = self.started.elapsed().as_secs_f64();
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        self.app.metrics.record(&self.route, self.method, self.status, bytes_in, bytes_out, secs);
        let who = self.who.lock().expect("access lock");
        tracing::info!(
            target: "chunkvault::access",
            method = %self.method,
            route = %self.route,
            status = self.status,
            bytes_in,
            bytes_out,
            duration_ms = secs * 1e3,
            tenant = %who.tenant.as_deref().unwrap_or("-"),
            device = %who.device.as_deref().unwrap_or("-"),
            "request"
        );
    }
}

/// A body that counts the bytes passing through it; a response body also
/// records its request ([`Done`]) when dropped, which hyper does once it
/// has sent the last byte or the client has gone.
struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
    done: Option<Done>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done.finish(self.count.load(Ordering::Relaxed));
        }
    }
}
