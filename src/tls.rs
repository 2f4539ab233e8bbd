//! What the HTTPS clients trust: the device client, the admin client and
//! the server's own calls to its upstream (check-in, session key, relay)
//! all build their ureq agents here, over rustls with the ring provider (no
//! OpenSSL, no native-tls).
//!
//! Trusted are the platform's roots, read by `rustls-native-certs` from the
//! system store (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`),
//! plus, optionally, one private CA given as PEM. The system store is read
//! from disk, so it works offline and honours CAs an operator installed
//! there; only when the platform has no store at all (a scratch container)
//! with no CA given do we fall back to Mozilla's roots compiled into the
//! binary (`webpki-roots`, through ureq).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};

/// Largest CA PEM accepted (a managed config, `--ca-cert`,
/// `upstream_ca_cert`): a few certificates fit many times over, and a pushed
/// config cannot make the client parse megabytes.
pub const MAX_CA_PEM: usize = 32 * 1024;
/// Most certificates accepted in one CA PEM.
pub const MAX_CA_CERTS: usize = 16;

/// Parses a CA given as PEM: one or more `CERTIFICATE` blocks (other
/// blocks are ignored), at most [`MAX_CA_PEM`] bytes and [`MAX_CA_CERTS`]
/// certificates. The error says what is wrong, never echoes the input.
pub fn parse_ca_pem(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    if pem.len() > MAX_CA_PEM {
        return Err(format!("CA certificate: {} bytes, more than the {MAX_CA_PEM} allowed", pem.len()));
    }
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item {
            Ok(PemItem::Certificate(c)) => {
                if certs.len() == MAX_CA_CERTS {
                    return Err(format!("CA certificate: more than {MAX_CA_CERTS} certificates"));
                }
                certs.push(c);
            }
            Ok(_) => {}
            Err(e) => return Err(format!("CA certificate: not valid PEM ({e})")),
        }
    }
    if certs.is_empty() {
        return Err("CA certificate: no `BEGIN CERTIFICATE` block in the PEM".into());
    }
    // A certificate that rustls cannot parse would be dropped silently when
    // the roots are built; refuse it here instead.
    for c in &certs {
        let der = rustls::pki_types::CertificateDer::from(c.der().to_vec());
        let mut store = rustls::RootCertStore::empty();
        store.add(der).map_err(|e| format!("CA certificate: not a usable certificate ({e})"))?;
    }
    Ok(certs)
}

/// The platform's roots, read once per process.
fn platform_roots() -> &'static [Certificate<'static>] {
    static ROOTS: OnceLock<Vec<Certificate<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in found.errors.iter().take(3) {
            tracing::debug!("reading the platform's CA certificates: {e}");
        }
        found.certs.iter().map(|c| Certificate::from_der(c.as_ref()).to_owned()).collect()
    })
}

/// The TLS settings of an agent trusting the platform's roots plus `ca`.
pub fn tls_config(ca: &[Certificate<'static>]) -> TlsConfig {
    let platform = platform_roots();
    let roots = if platform.is_empty() && ca.is_empty() {
        RootCerts::WebPki
    } else {
        // ureq keeps Mozilla's roots as trust anchors, which cannot be
        // mixed with certificates: without a system store, a given CA is
        // all that is trusted.
        let all: Vec<_> = platform.iter().chain(ca).cloned().collect();
        RootCerts::Specific(Arc::new(all))
    };
    TlsConfig::builder().provider(TlsProvider::Rustls).root_certs(roots).build()
}

/// A blocking agent for JSON calls: error statuses are answers, not errors;
/// connecting is bounded by 10 s, a whole call by `global`.
pub fn agent(ca: &[Certificate<'static>], global: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_global(Some(global))
        .tls_config(tls_config(ca))
        .build()
        .into()
}

/// Rewords a transport error when it is about the server's certificate, so
/// that the fix (give the private CA) is in the message.
pub fn explain(e: &ureq::Error, how_to_trust: &str) -> String {
    // ureq reports handshake failures as I/O errors wrapping rustls's.
    let inner = match e {
        ureq::Error::Rustls(inner) => Some(inner),
        ureq::Error::Io(io) => io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        _ => None,
    };
    match inner {
        Some(rustls::Error::InvalidCertificate(why)) => {
            format!("TLS: the server's certificate is not trusted ({why:?}); if a private CA signed it, {how_to_trust}")
        }
        Some(other) => format!("TLS: {other}"),
        None => e.to_string(),
    }
}
