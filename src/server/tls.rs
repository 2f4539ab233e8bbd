//! HTTPS for the server: rustls (ring provider) behind the accept loop's
//! [`Accept`] step, with the certificate and key re-read on SIGHUP.
//!
//! The certificate is not baked into the rustls config: a resolver hands
//! out the current [`CertifiedKey`], which a reload swaps under a lock, so
//! new handshakes get the new certificate while established connections
//! (and their in-flight requests) carry on untouched. A reload that fails
//! (a missing file, a key that does not match) keeps the old pair and says
//! why in the log.
//!
//! Only HTTP/1.1 is offered through ALPN: hyper's HTTP/2 has no header
//! read timeout, which is what bounds idle and half-open connections here.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpStream;

use super::listen::Accept;
use super::ServerError;

/// Largest certificate chain or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Reads a PEM file of at most `max` bytes; `what` names it in errors
/// (the config key), which never include the file's contents.
pub fn read_pem_file(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, ServerError> {
    use std::io::Read;
    let failed = |e: std::io::Error| ServerError::Setup(format!("reading {what} {}: {e}", path.display()));
    let mut bytes = Vec::new();
    std::fs::File::open(path).and_then(|f| f.take(max + 1).read_to_end(&mut bytes)).map_err(failed)?;
    if bytes.len() as u64 > max {
        return Err(ServerError::Setup(format!("{what} {}: larger than {max} bytes", path.display())));
    }
    Ok(bytes)
}

/// The ring provider, named explicitly so that no process-wide default
/// has to be installed.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, ServerError> {
    let setup = |m: String| ServerError::Setup(m);
    let chain_pem = read_pem_file(cert, MAX_PEM_FILE, "tls_cert")?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setup(format!("tls_cert {}: not a PEM certificate chain ({e})", cert.display())))?;
    if chain.is_empty() {
        return Err(setup(format!("tls_cert {}: no `BEGIN CERTIFICATE` block", cert.display())));
    }
    let key_pem = zeroize::Zeroizing::new(read_pem_file(key, MAX_PEM_FILE, "tls_key")?);
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        setup(format!("tls_key {}: no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}", key.display()))
    })?;
    let certified = CertifiedKey::from_der(chain, key_der, &provider())
        .map_err(|e| setup(format!("tls_key {} does not go with tls_cert {}: {e}", key.display(), cert.display())))?;
    Ok(Arc::new(certified))
}

/// Hands out the current certificate; [`CertResolver::reload`] swaps it.
#[derive(Debug)]
pub struct CertResolver {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    /// Loads the pair once; an error here stops the server from starting.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<CertResolver, ServerError> {
        let current = RwLock::new(load_certified_key(&cert, &key)?);
        Ok(CertResolver { cert, key, current })
    }

    /// Re-reads the certificate and key; on error the old pair stays.
    pub fn reload(&self) -> Result<(), ServerError> {
        let fresh = load_certified_key(&self.cert, &self.key)?;
        *self.current.write().expect("certificate lock") = fresh;
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

/// The rustls server settings: TLS 1.2 and 1.3, no client certificates,
/// the resolver's certificate, HTTP/1.1 through ALPN.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<Arc<rustls::ServerConfig>, ServerError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Setup(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// HTTPS: the TLS handshake as the accept loop's [`Accept`] step (which
/// the loop bounds with the header read timeout).
pub struct TlsTcp {
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsTcp {
    /// An acceptor over `config`.
    pub fn new(config: Arc<rustls::ServerConfig>) -> TlsTcp {
        TlsTcp { acceptor: tokio_rustls::TlsAcceptor::from(config) }
    }
}

impl Accept for TlsTcp {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    async fn accept(&self, tcp: TcpStream) -> std::io::Result<Self::Io> {
        self.acceptor.accept(tcp).await
    }
}
