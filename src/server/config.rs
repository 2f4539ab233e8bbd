//! The server's TOML config; command-line flags override it.

use std::path::PathBuf;

use serde::Deserialize;

use crate::auth::registry::RegistryLocation;

/// Which routes a process serves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Auth and storage in one process.
    #[default]
    All,
    /// The device registry and tokens.
    Auth,
    /// Chunks, snapshots and restores.
    Storage,
    /// An on-premises relay of activation and session requests.
    Edge,
}

/// What a storage node does when it cannot check in with the auth role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthUnreachable {
    /// Refuse sessions until a check-in succeeds again.
    #[default]
    FailClosed,
    /// Keep accepting valid sessions with the last known device states.
    FailOpen,
}

/// Config file keys (SPEC.md section 4) plus the tenant KDF cost.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Which routes this process serves (default `all`).
    pub role: Role,
    /// The address to bind, `HOST:PORT` (default `127.0.0.1:8080`; a host name
    /// is resolved).
    pub listen: String,
    /// The tenants' repositories' root (a path).
    pub root: Option<String>,
    /// The device registry: a SQLite file (default `ROOT/registry.db`), or
    /// a PostgreSQL URL (`postgres://...`) that several auth nodes share.
    pub registry: Option<String>,
    /// A file whose first line is the bootstrap admin token
    /// (`CHUNKVAULT_ADMIN_TOKEN` when unset). Without a bootstrap token only
    /// the registry's admin tokens are accepted; an empty one refuses to start.
    pub admin_token_file: Option<PathBuf>,
    /// A file whose first line is the password that wraps the tenant
    /// repositories' keys (else `CHUNKVAULT_PASSWORD`).
    pub password_file: Option<PathBuf>,
    /// A file whose first line is the bearer token `/metrics` asks for;
    /// without it `/metrics` is open (bind it to a private address).
    pub metrics_token_file: Option<PathBuf>,
    /// Seconds a session token stays valid (default 900, more than 0). A retire
    /// or block reaches storage nodes sooner, at their next check-in.
    pub session_ttl_secs: u64,
    /// Seconds between a storage node's check-ins with the auth role (default
    /// 30, more than 0); also how often an auth node sharing a PostgreSQL
    /// registry follows its feed. Storage nodes apply `auth_unreachable` after
    /// two missed intervals.
    pub checkin_interval_secs: u64,
    /// What a storage node does when its check-ins fail for two intervals
    /// (default `fail_closed`).
    pub auth_unreachable: AuthUnreachable,
    /// The auth role's URL (edge and storage roles).
    pub upstream: Option<String>,
    /// A CA certificate (PEM file) trusted besides the platform's roots for
    /// calls to `upstream`, whose certificate a private CA signed.
    pub upstream_ca_cert: Option<PathBuf>,
    /// The certificate chain (PEM file) to serve HTTPS with; needs
    /// `tls_key`. Re-read with the key on SIGHUP.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM file: PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Argon2id memory in KiB for keys of tenants created here (default
    /// 65536: 64 MiB); existing tenants keep the cost they were made with.
    pub tenant_kdf_memory_kib: u32,
    /// Argon2id passes for keys of tenants created here (default 3).
    pub tenant_kdf_iterations: u32,
    /// Failed activations allowed per client address per minute.
    pub activation_failures_per_minute: u32,
    /// Seconds a connection has to send a request's complete headers (the
    /// first request's, and each next one's on a kept-alive connection);
    /// then it is closed. Bounds what idle and half-open connections cost.
    pub header_read_timeout_secs: u64,
    /// Longest silence, in seconds, while a request body is being read
    /// (then the request fails with 408), and while a client does not take
    /// the next piece of a restore stream (then the stream is cut short).
    pub body_read_timeout_secs: u64,
    /// Chunk uploads in flight at once, all tenants together; beyond it
    /// `PUT /v1/chunks/{id}` answers 503 `server_busy` with `Retry-After`.
    pub max_concurrent_uploads: usize,
    /// Chunk uploads in flight at once for one tenant, so that one tenant
    /// cannot take all of `max_concurrent_uploads`. More wait, their bodies
    /// unread, up to `upload_slot_wait_ms`; then 429 `too_many_uploads`
    /// with `Retry-After`.
    pub max_concurrent_uploads_per_tenant: usize,
    /// How long an upload waits for one of its tenant's slots, and then for
    /// its share of `max_upload_buffer_mib`.
    pub upload_slot_wait_ms: u64,
    /// MiB of upload bodies (chunks, bundles) the node holds at once, all
    /// tenants together: an upload waits, its body unread, until its
    /// declared length fits (up to `upload_slot_wait_ms`, then 503
    /// `server_busy`). The bound of the node's memory under many devices;
    /// at least 32, so that the largest body fits.
    pub max_upload_buffer_mib: u64,
    /// Restore streams (`POST /v1/snapshots/{id}/chunks`, `GET
    /// /v1/snapshots/{id}/file`) reading packs at once, all tenants
    /// together; more wait their turn. Each holds a pack-sized read buffer
    /// (up to 18 MiB) while it reads: the bound of restores' memory.
    pub max_concurrent_reads: usize,
    /// Large JSON requests (snapshot commits, missing-chunk queries: up to
    /// 64 MiB each) handled at once; more wait their turn, unread.
    pub max_concurrent_manifests: usize,
    /// Seconds a tenant may go without requests before the storage node
    /// closes it (drops its index, stops its writer); the next request
    /// opens it again. 0 keeps tenants open.
    pub tenant_idle_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            role: Role::All,
            listen: "127.0.0.1:8080".into(),
            root: None,
            registry: None,
            admin_token_file: None,
            password_file: None,
            metrics_token_file: None,
            session_ttl_secs: 900,
            checkin_interval_secs: 30,
            auth_unreachable: AuthUnreachable::FailClosed,
            upstream: None,
            upstream_ca_cert: None,
            tls_cert: None,
            tls_key: None,
            tenant_kdf_memory_kib: 64 * 1024,
            tenant_kdf_iterations: 3,
            activation_failures_per_minute: 20,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            // A tenant's uploads all end at its one writer thread, so more
            // than a few in flight only add buffered chunks (4 MiB each),
            // not throughput.
            max_concurrent_uploads: 32,
            max_concurrent_uploads_per_tenant: 8,
            // Waiting costs a connection and hyper's small read buffer;
            // a refusal costs reading and dropping the whole body (so the
            // client hears the answer) and sending it again later.
            upload_slot_wait_ms: 5000,
            // 16 bundles of 8 MiB: more in memory only queue at the
            // tenants' writers (measured in BENCHMARKS.md, "Many devices").
            max_upload_buffer_mib: 128,
            // Two readers per core keep the disk and the cores busy; more
            // only hold more read buffers.
            max_concurrent_reads: 8,
            max_concurrent_manifests: 2,
            tenant_idle_secs: 300,
        }
    }
}

/// The smallest `max_upload_buffer_mib`: room for the largest upload body
/// (a chunk of FastCDC's largest maximum size, 16 MiB, in a bundle) twice.
pub const MIN_UPLOAD_BUFFER_MIB: u64 = 32;

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read (the path, and why).
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// The file is not TOML of this shape: a syntax error, a wrong type, or an
    /// unknown key.
    #[error("config: {0}")]
    Toml(#[from] toml::de::Error),
    /// The values do not fit together: the text says what the role lacks or
    /// which value must be positive.
    #[error("config: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Reads a TOML config file; unknown keys are an error.
    pub fn load(path: &std::path::Path) -> Result<ServerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Io(path.into(), e))?;
        Ok(toml::from_str(&text)?)
    }

    /// Checks that the role has what it needs.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(ConfigError::Invalid(what.into())) };
        match self.role {
            Role::All | Role::Auth => {
                need(self.root.is_some() || self.registry.is_some(), "needs `root` or `registry`")?
            }
            Role::Storage => need(self.upstream.is_some(), "the storage role needs `upstream`")?,
            Role::Edge => need(self.upstream.is_some(), "the edge role needs `upstream`")?,
        }
        if matches!(self.role, Role::All | Role::Storage) {
            need(self.root.is_some(), "needs `root`")?;
        }
        need(self.tls_cert.is_some() == self.tls_key.is_some(), "`tls_cert` and `tls_key` go together")?;
        need(self.session_ttl_secs > 0 && self.checkin_interval_secs > 0, "intervals must be positive")?;
        need(self.header_read_timeout_secs > 0 && self.body_read_timeout_secs > 0, "timeouts must be positive")?;
        need(
            self.max_concurrent_uploads > 0
                && self.max_concurrent_uploads_per_tenant > 0
                && self.max_concurrent_manifests > 0
                && self.max_concurrent_reads > 0,
            "concurrency limits must be positive",
        )?;
        need(self.max_upload_buffer_mib >= MIN_UPLOAD_BUFFER_MIB, "`max_upload_buffer_mib` must be at least 32")
    }

    /// Where the registry lives.
    pub fn registry_location(&self) -> Option<RegistryLocation> {
        match &self.registry {
            Some(r) => Some(RegistryLocation::parse(r)),
            None => self.root.as_ref().map(|r| RegistryLocation::Sqlite(PathBuf::from(r).join("registry.db"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_keys_and_refuses_unknown() {
        let c: ServerConfig = toml::from_str(
            "role = \"storage\"\nlisten = \"0.0.0.0:1\"\nroot = \"/r\"\nupstream = \"http://a\"\n\
             auth_unreachable = \"fail_open\"\ncheckin_interval_secs = 5\nsession_ttl_secs = 60\n",
        )
        .unwrap();
        assert_eq!(c.role, Role::Storage);
        assert_eq!(c.auth_unreachable, AuthUnreachable::FailOpen);
        c.validate().unwrap();
        assert!(toml::from_str::<ServerConfig>("nope = 1").is_err());
        let edge: ServerConfig = toml::from_str("role = \"edge\"").unwrap();
        assert!(edge.validate().is_err());
        let d = ServerConfig::default();
        assert_eq!((d.header_read_timeout_secs, d.body_read_timeout_secs), (10, 30));
        let limits: ServerConfig = toml::from_str(
            "root = \"/r\"\nheader_read_timeout_secs = 2\nmax_concurrent_uploads = 4\n\
             max_concurrent_uploads_per_tenant = 2\nmax_concurrent_manifests = 1\nbody_read_timeout_secs = 3\n",
        )
        .unwrap();
        limits.validate().unwrap();
        assert_eq!((limits.header_read_timeout_secs, limits.max_concurrent_uploads_per_tenant), (2, 2));
        let half: ServerConfig = toml::from_str("root = \"/r\"\ntls_cert = \"/c.pem\"").unwrap();
        assert!(half.validate().unwrap_err().to_string().contains("tls_key"));
        let tls: ServerConfig = toml::from_str(
            "root = \"/r\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\nupstream_ca_cert = \"/ca.pem\"",
        )
        .unwrap();
        tls.validate().unwrap();
        let secrets: ServerConfig =
            toml::from_str("root = \"/r\"\npassword_file = \"/p\"\nmetrics_token_file = \"/m\"").unwrap();
        assert_eq!(secrets.metrics_token_file.as_deref(), Some(std::path::Path::new("/m")));
        let zero: ServerConfig = toml::from_str("root = \"/r\"\nmax_concurrent_uploads = 0").unwrap();
        assert!(zero.validate().is_err());
        let small: ServerConfig = toml::from_str("root = \"/r\"\nmax_upload_buffer_mib = 16").unwrap();
        assert!(small.validate().unwrap_err().to_string().contains("max_upload_buffer_mib"));
    }

    #[test]
    fn the_registry_is_a_file_under_root_a_path_or_a_postgres_url() {
        let under_root: ServerConfig = toml::from_str("root = \"/r\"").unwrap();
        assert_eq!(under_root.registry_location(), Some(RegistryLocation::Sqlite("/r/registry.db".into())));
        let file: ServerConfig = toml::from_str("root = \"/r\"\nregistry = \"/var/lib/cv/reg.db\"").unwrap();
        assert_eq!(file.registry_location(), Some(RegistryLocation::Sqlite("/var/lib/cv/reg.db".into())));
        let pg: ServerConfig =
            toml::from_str("role = \"auth\"\nregistry = \"postgres://cv@db.internal/chunkvault\"").unwrap();
        pg.validate().unwrap();
        assert_eq!(
            pg.registry_location(),
            Some(RegistryLocation::Postgres("postgres://cv@db.internal/chunkvault".into()))
        );
    }
}
