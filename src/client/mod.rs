//! HTTP clients of the server: the device client ([`device`]) and the admin
//! client ([`admin`]), over one small blocking JSON transport ([`Http`]).

pub mod admin;
pub mod device;
pub mod journal;
mod remote;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::ErrorBody;

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error body.
    #[error("server refused ({status} {code}): {message}")]
    Api {
        /// The HTTP status, 400 or above.
        status: u16,
        /// The machine-readable error code of the body (`http_error` when
        /// the body was not the server's JSON).
        code: String,
        /// The human-readable message (at most 200 characters of a body
        /// that was not the server's JSON).
        message: String,
    },
    /// No usable answer: connection, TLS (the text says how to trust a
    /// private CA), timeout, or an answer that is not the JSON expected.
    #[error("talking to the server: {0}")]
    Transport(String),
    /// Refused before any request: bad local input (managed config, CA
    /// PEM, device id, tenant, e-mail) or local state.
    #[error("{0}")]
    Local(String),
    /// A local file (state, journal, restore target) could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
        move |source| ClientError::Io { path: path.to_owned(), source }
    }
}

/// Largest JSON answer read. ureq's default (10 MiB) is less than the
/// restore plan of a snapshot of some 40,000 files; a hostile server still
/// cannot make the client buffer more than this.
const MAX_JSON_RESPONSE: u64 = 512 << 20;

/// One request a client made, as told to a [`RequestObserver`].
#[derive(Clone, Copy, Debug)]
pub struct RequestTiming<'a> {
    /// Method and path, ids in the path shown as `{id}` and the query left
    /// out: `POST /v1/snapshots/{id}/chunks`.
    pub route: &'a str,
    /// From sending the request until its answer was read (for a
    /// streamed answer, until the stream was read to its end; with the
    /// retries of an upload refused as busy).
    pub elapsed: Duration,
    /// Whether the request succeeded.
    pub ok: bool,
}

/// Told of each request a transport makes (load tests, diagnostics).
pub type RequestObserver = Arc<dyn Fn(&RequestTiming<'_>) + Send + Sync>;

/// A JSON-over-HTTP transport with a base URL and an optional bearer token.
#[derive(Clone)]
pub struct Http {
    agent: ureq::Agent,
    base: String,
    observer: Option<RequestObserver>,
}

/// `METHOD /path` with the query dropped and hex ids (16 or more hex
/// digits) as `{id}`.
fn route_of(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path
        .split('/')
        .map(|s| if s.len() >= 16 && s.bytes().all(|b| b.is_ascii_hexdigit()) { "{id}" } else { s })
        .collect();
    format!("{method} {}", segments.join("/"))
}

pub(crate) type Response = ureq::http::Response<ureq::Body>;

/// A request body encoded as compact JSON. Encoded here rather than by
/// ureq's `send_json`, which pretty-prints: for a 42,000-file manifest that
/// is a third more bytes to write, send and parse. A body encoded ahead can
/// also be sent after other work (the device encodes its manifest while its
/// last bundles upload).
pub struct JsonBody(Vec<u8>);

impl JsonBody {
    /// `body` as JSON.
    pub fn encode<B: Serialize>(body: &B) -> Result<JsonBody, ClientError> {
        serde_json::to_vec(body).map(JsonBody).map_err(|e| ClientError::Local(format!("encoding a request: {e}")))
    }
}

/// What a transport error about an untrusted certificate tells the user to do.
const HOW_TO_TRUST: &str = "give its CA: `caCertificate` in the managed config (device), \
                            `--ca-cert FILE` or CHUNKVAULT_CA_CERT (admin)";

impl Http {
    /// A transport to `base` (`http://` or `https://`) trusting the
    /// platform's CA roots.
    pub fn new(base: &str) -> Http {
        Http::with_ca(base, &[])
    }

    /// A transport trusting the platform's roots plus `ca` (parsed by
    /// [`crate::tls::parse_ca_pem`]).
    pub fn with_ca(base: &str, ca: &[ureq::tls::Certificate<'static>]) -> Http {
        let agent = crate::tls::agent(ca, Duration::from_secs(600));
        Http { agent, base: base.trim_end_matches('/').to_owned(), observer: None }
    }

    /// Tells `observer` of every request made through this transport and
    /// its clones made after this.
    pub fn set_observer(&mut self, observer: Option<RequestObserver>) {
        self.observer = observer;
    }

    /// Tells the observer, if any, of a request to `path` begun at `started`.
    pub(crate) fn observe(&self, method: &str, path: &str, started: Instant, ok: bool) {
        if let Some(o) = &self.observer {
            let route = route_of(method, path);
            o(&RequestTiming { route: &route, elapsed: started.elapsed(), ok });
        }
    }

    /// Runs one request and tells the observer about it.
    fn timed<T>(&self, method: &str, path: &str, f: impl FnOnce() -> Result<T, ClientError>) -> Result<T, ClientError> {
        let started = Instant::now();
        let r = f();
        self.observe(method, path, started, r.is_ok());
        r
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Turns an error status into [`ClientError::Api`].
    fn check(mut resp: Response) -> Result<Response, ClientError> {
        let status = resp.status().as_u16();
        if status < 400 {
            return Ok(resp);
        }
        let body = resp.body_mut().with_config().limit(64 * 1024).read_to_vec().unwrap_or_default();
        let err: ErrorBody = serde_json::from_slice(&body).unwrap_or_else(|_| ErrorBody {
            error: "http_error".into(),
            message: String::from_utf8_lossy(&body).chars().take(200).collect(),
        });
        Err(ClientError::Api { status, code: err.error, message: err.message })
    }

    fn json<T: DeserializeOwned>(mut resp: Response) -> Result<T, ClientError> {
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_JSON_RESPONSE)
            .read_to_vec()
            .map_err(|e| ClientError::Transport(format!("response: {e}")))?;
        serde_json::from_slice(&body).map_err(|e| ClientError::Transport(format!("response: {e}")))
    }

    fn transport(e: ureq::Error) -> ClientError {
        ClientError::Transport(crate::tls::explain(&e, HOW_TO_TRUST))
    }

    /// `POST path` with a JSON body, JSON answer.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> Result<T, ClientError> {
        self.post_json(path, token, &JsonBody::encode(body)?)
    }

    /// `POST path` with a body encoded before, JSON answer.
    pub fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &JsonBody,
    ) -> Result<T, ClientError> {
        self.timed("POST", path, || Self::json(Self::send_json(self.agent.post(self.url(path)), token, body)?))
    }

    /// `PUT path` with a JSON body, JSON answer.
    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        token: Option<&str>,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = JsonBody::encode(body)?;
        self.timed("PUT", path, || Self::json(Self::send_json(self.agent.put(self.url(path)), token, &body)?))
    }

    fn send_json(
        mut req: ureq::RequestBuilder<ureq::typestate::WithBody>,
        token: Option<&str>,
        body: &JsonBody,
    ) -> Result<Response, ClientError> {
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let req = req.header("Content-Type", "application/json");
        Self::check(req.send(&body.0[..]).map_err(Self::transport)?)
    }

    /// `POST path` with a JSON body; the raw response (for streamed answers:
    /// the caller tells the observer when it has read it, through `Http::observe`).
    pub fn post_raw<B: Serialize>(&self, path: &str, token: &str, body: &B) -> Result<Response, ClientError> {
        Self::send_json(self.agent.post(self.url(path)), Some(token), &JsonBody::encode(body)?)
    }

    /// `DELETE path`, JSON answer.
    pub fn delete<T: DeserializeOwned>(&self, path: &str, token: Option<&str>) -> Result<T, ClientError> {
        self.timed("DELETE", path, || {
            let mut req = self.agent.delete(self.url(path));
            if let Some(t) = token {
                req = req.header("Authorization", &format!("Bearer {t}"));
            }
            Self::json(Self::check(req.call().map_err(Self::transport)?)?)
        })
    }

    /// `GET path`, JSON answer.
    pub fn get<T: DeserializeOwned>(&self, path: &str, token: Option<&str>) -> Result<T, ClientError> {
        self.timed("GET", path, || Self::json(self.get_raw_untimed(path, token, None)?))
    }

    /// `GET path` with an optional `Range` header; the raw response (the
    /// observer is told when its head has arrived).
    pub fn get_raw(&self, path: &str, token: Option<&str>, range: Option<&str>) -> Result<Response, ClientError> {
        self.timed("GET", path, || self.get_raw_untimed(path, token, range))
    }

    fn get_raw_untimed(&self, path: &str, token: Option<&str>, range: Option<&str>) -> Result<Response, ClientError> {
        let mut req = self.agent.get(self.url(path));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        if let Some(r) = range {
            req = req.header("Range", r);
        }
        Self::check(req.call().map_err(Self::transport)?)
    }

    /// `PUT path` with raw bytes; the status. When the server is at its
    /// upload limit (429 `too_many_uploads`, 503 `server_busy`) it waits as
    /// long as `Retry-After` says (at most 10 s at a time) and tries again,
    /// for up to about five minutes.
    pub fn put_bytes(&self, path: &str, token: &str, data: &[u8]) -> Result<u16, ClientError> {
        self.timed("PUT", path, || {
            Ok(self.send_body("PUT", path, token, data.len() as u64, || data)?.status().as_u16())
        })
    }

    /// `POST path` with raw bytes, JSON answer; retried as
    /// [`Http::put_bytes`] is when the server is at its upload limit.
    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, token: &str, data: &[u8]) -> Result<T, ClientError> {
        self.post_body(path, token, data.len() as u64, || data)
    }

    /// `POST path` with a body of `len` bytes read from `body()` (called
    /// again for each attempt), JSON answer; retried as [`Http::put_bytes`]
    /// is. A body read from where its bytes are saves gathering them first.
    pub fn post_body<T: DeserializeOwned, R: Read>(
        &self,
        path: &str,
        token: &str,
        len: u64,
        body: impl Fn() -> R,
    ) -> Result<T, ClientError> {
        self.timed("POST", path, || Self::json(self.send_body("POST", path, token, len, body)?))
    }

    fn send_body<R: Read>(
        &self,
        method: &str,
        path: &str,
        token: &str,
        len: u64,
        body: impl Fn() -> R,
    ) -> Result<Response, ClientError> {
        const RETRIES: u32 = 60;
        let mut attempt = 0;
        loop {
            let url = self.url(path);
            let req = if method == "PUT" { self.agent.put(url) } else { self.agent.post(url) };
            let req = req.header("Authorization", &format!("Bearer {token}")).header("Content-Length", len);
            let mut reader = body();
            let resp = req.send(ureq::SendBody::from_reader(&mut reader)).map_err(Self::transport)?;
            let wait = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            match Self::check(resp) {
                Err(ClientError::Api { status: 429 | 503, ref code, .. })
                    if attempt < RETRIES && (code == "too_many_uploads" || code == "server_busy") =>
                {
                    // Jitter, so that refused devices do not all come back at once.
                    let ms = wait.unwrap_or(1).min(10) * 1000 + u64::from(rand::random::<u16>() % 500);
                    std::thread::sleep(Duration::from_millis(ms));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}

/// Percent-encodes one path segment (an email in an admin route).
pub fn segment_escape(s: &str) -> String {
    query_escape(s).replace('/', "%2F")
}

/// Percent-encodes a query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
