//! The accept loop: our own instead of `axum::serve`, which exposes neither
//! hyper's header read timeout nor the accepted sockets.
//!
//! Each accepted TCP connection gets `TCP_NODELAY`, goes through an
//! [`Accept`] step (plain TCP, or the TLS handshake of
//! [`super::tls::TlsTcp`]) bounded by the header timeout, and is served by
//! hyper's HTTP/1
//! connection with `header_read_timeout`, so a client that has not sent a
//! request's complete headers in time is disconnected, whether it never
//! finished its first request or idles on a kept-alive connection. Handlers
//! see the peer address as axum's `ConnectInfo<SocketAddr>`, as with
//! `into_make_service_with_connect_info`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::Service;

/// How long shutdown waits for in-flight requests before it gives up on
/// them (a commit can wait 30 s for a prune's lock, then take a while).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

/// Turns an accepted TCP connection into the byte stream HTTP is spoken
/// on. Plain TCP passes the socket through; [`super::tls::TlsTcp`] does the
/// TLS handshake (tokio-rustls).
pub trait Accept: Send + Sync + 'static {
    /// The stream hyper reads requests from and writes responses to.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Completes whatever the connection needs before HTTP (a handshake).
    /// The loop bounds it with the header read timeout.
    fn accept(&self, tcp: TcpStream) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

/// Plain HTTP over TCP.
pub struct PlainTcp;

impl Accept for PlainTcp {
    type Io = TcpStream;

    async fn accept(&self, tcp: TcpStream) -> io::Result<TcpStream> {
        Ok(tcp)
    }
}

/// Connection-level limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    /// Time to send a request's complete headers (and to finish the
    /// [`Accept`] step); then the connection is closed.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, lets in-flight requests finish (closing idle connections at
/// once) and returns.
pub async fn serve<A: Accept>(
    listener: TcpListener,
    acceptor: Arc<A>,
    router: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    // HTTP/1 only: hyper's HTTP/2 (and the auto builder's sniffing of the
    // HTTP/2 preface) has no header read timeout, so a client could hold a
    // connection by sending half a preface. Our clients speak HTTP/1.1, and
    // with TLS only `http/1.1` is offered through ALPN (server/tls.rs).
    let mut builder = auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: wait
                // for connections to close instead of spinning on accept.
                tracing::error!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Responses are small JSON documents written at once; Nagle's
        // algorithm would only hold them back for the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on a connection from {peer}: {e}");
        }
        let (acceptor, builder, router, watcher) =
            (acceptor.clone(), builder.clone(), router.clone(), graceful.watcher());
        tokio::spawn(async move {
            let io = match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(io)) => io,
                Ok(Err(e)) => return tracing::debug!("connection from {peer}: {e}"),
                Err(_) => return tracing::debug!("connection from {peer}: handshake timed out"),
            };
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                // Router is always ready; its error type is Infallible.
                let fut = router.clone().call(req);
                async move { Ok::<_, Infallible>(fut.await.unwrap_or_else(|never| match never {})) }
            });
            let conn = builder.serve_connection(TokioIo::new(io), service);
            if let Err(e) = watcher.watch(conn).await {
                // Header timeouts, resets and malformed requests end here.
                tracing::debug!("connection from {peer}: {e}");
            }
        });
    }
    drop(listener);
    tracing::info!("shutting down: finishing in-flight requests");
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("in-flight requests did not finish within {SHUTDOWN_GRACE:?}; stopping anyway");
        }
    }
    Ok(())
}

/// Errors of one connection that is gone before we got it, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Raises the soft open-files limit to the hard one: every connection,
/// idle or not, is a descriptor, and the default soft limit (often 1024)
/// would turn a burst of clients into accept errors long before memory or
/// CPU run short.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::debug!("raising the open-files limit: {}", io::Error::last_os_error());
            }
        }
    }
}
