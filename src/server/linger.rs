//! Lingering request bodies: a request refused before its body was read
//! (429 or 503 at the upload limits, 401, an early 413) still has its body
//! coming. If the server closed the connection with it unread, the kernel
//! would answer the client's next bytes with a reset, and a client that
//! sends its whole body before reading the answer (ureq, curl) would see a
//! broken pipe instead of our JSON error and `Retry-After`. So such a body
//! is read on and thrown away in the background, up to a bound — what
//! nginx calls a lingering close. Frames are dropped as they arrive, so a
//! drained upload costs no buffer, and its upload slot is already free.

use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use hyper::body::{Frame, SizeHint};
use tokio_stream::StreamExt;

/// Bytes of an unread body drained at most: a whole refused chunk upload
/// (4 MiB) and then some. Past it the connection is closed instead.
const MAX_DRAIN: usize = 8 << 20;
/// Longest time spent draining one body.
const DRAIN_TIME: Duration = Duration::from_secs(60);

/// Wraps every request body so that it lingers (see the module docs).
pub async fn linger(req: Request) -> Request {
    req.map(|body| Body::new(Lingering { inner: Some(body), ended: false }))
}

/// A request body that is drained in the background if dropped unfinished.
struct Lingering {
    inner: Option<Body>,
    /// The handler read it to its end or met an error: nothing to drain.
    ended: bool,
}

impl hyper::body::Body for Lingering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            self.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().map_or(true, hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

impl Drop for Lingering {
    fn drop(&mut self) {
        let Some(body) = self.inner.take() else { return };
        if self.ended || hyper::body::Body::is_end_stream(&body) {
            return;
        }
        // Dropped inside a handler or a layer, so on the runtime; if not,
        // there is nothing to drain on and the connection just closes.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut frames = body.into_data_stream();
                let mut drained = 0usize;
                let _ = tokio::time::timeout(DRAIN_TIME, async {
                    while let Some(Ok(frame)) = frames.next().await {
                        drained += frame.len();
                        if drained > MAX_DRAIN {
                            break;
                        }
                    }
                })
                .await;
            });
        }
    }
}
