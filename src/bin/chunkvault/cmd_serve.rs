//! `serve`: run the HTTP server.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkvault::server::{self, AuthUnreachable, Role, ServerConfig};

use crate::ctx::{password_from, CliError, Ctx};
use crate::CmdResult;

/// How the server writes its log (stderr).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormat {
    /// One human-readable line per event, with a timestamp.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, target and the fields).
    Json,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Log format on stderr: text or json. Every line has a timestamp; the
    /// level is set by $CHUNKVAULT_LOG (default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Address to listen on (port 0 picks one); printed as the first stdout line.
    #[arg(long)]
    pub listen: Option<String>,
    /// TOML config file; the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// all, auth, storage or edge.
    #[arg(long, value_parser = ["all", "auth", "storage", "edge"])]
    pub role: Option<String>,
    /// The tenants' repositories' root.
    #[arg(long)]
    pub root: Option<String>,
    /// The device registry: a SQLite file (default ROOT/registry.db) or a
    /// PostgreSQL URL, postgres://USER@HOST/DB, that several auth nodes
    /// share. A URL holding a password is better kept in the config file
    /// or $CHUNKVAULT_REGISTRY than on a command line.
    #[arg(long, env = "CHUNKVAULT_REGISTRY", hide_env_values = true, value_name = "PATH|URL")]
    pub registry: Option<String>,
    /// The auth role's URL (edge and storage roles).
    #[arg(long)]
    pub upstream: Option<String>,
    /// File holding the admin token (else $CHUNKVAULT_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Lifetime of session tokens in seconds (default 900).
    #[arg(long)]
    pub session_ttl_secs: Option<u64>,
    /// Seconds between a storage node's check-ins with the auth role (default 30).
    #[arg(long)]
    pub checkin_interval_secs: Option<u64>,
    /// fail_closed or fail_open.
    #[arg(long, value_parser = ["fail_closed", "fail_open"])]
    pub auth_unreachable: Option<String>,
    /// Argon2id memory (KiB) for keys of tenants created by this server.
    #[arg(long)]
    pub tenant_kdf_memory_kib: Option<u32>,
    /// Argon2id passes for keys of tenants created by this server.
    #[arg(long)]
    pub tenant_kdf_iterations: Option<u32>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    /// Re-read on SIGHUP.
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for calls to --upstream.
    #[arg(long, value_name = "PEM")]
    pub upstream_ca_cert: Option<PathBuf>,
    /// Seconds a client has to send a request's headers (default 10).
    #[arg(long)]
    pub header_read_timeout_secs: Option<u64>,
    /// Longest silence in seconds while a request body is read (default 30).
    #[arg(long)]
    pub body_read_timeout_secs: Option<u64>,
    /// Chunk uploads in flight at once, all tenants (default 32).
    #[arg(long)]
    pub max_concurrent_uploads: Option<usize>,
    /// Chunk uploads in flight at once per tenant (default 8).
    #[arg(long)]
    pub max_concurrent_uploads_per_tenant: Option<usize>,
    /// Milliseconds an upload waits for a tenant slot before a 429 (default 5000).
    #[arg(long)]
    pub upload_slot_wait_ms: Option<u64>,
    /// Restore streams reading packs at once, all tenants together (default 8).
    #[arg(long)]
    pub max_concurrent_reads: Option<usize>,
    /// MiB of upload bodies held at once, all tenants together (default 128).
    #[arg(long)]
    pub max_upload_buffer_mib: Option<u64>,
    /// File holding the bearer token that /metrics asks for (default: none, open).
    #[arg(long)]
    pub metrics_token_file: Option<PathBuf>,
    /// File holding the password of the tenants' repositories (first line;
    /// else $CHUNKVAULT_PASSWORD, else the systemd credential `password`).
    #[arg(long, env = "CHUNKVAULT_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    #[command(flatten)]
    pub verbose: crate::ctx::VerboseArgs,
}

/// A secret from its file (first line), else its environment variable;
/// none without either (the server never prompts).
fn secret(file: Option<&PathBuf>, env: &str) -> Result<Option<Vec<u8>>, CliError> {
    if file.is_none() && std::env::var_os(env).is_none() {
        return Ok(None);
    }
    password_from(file, env, "").map(Some)
}

/// A secret systemd handed the unit with `LoadCredential=NAME:...`: the
/// file `$CREDENTIALS_DIRECTORY/NAME`, if it is there.
fn credential(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    path.is_file().then_some(path)
}

pub fn run(_ctx: &Ctx, a: ServeArgs) -> CmdResult {
    let mut c = match &a.config {
        Some(path) => ServerConfig::load(path).map_err(|e| CliError::Usage(e.to_string()))?,
        None => ServerConfig::default(),
    };
    if let Some(v) = a.listen {
        c.listen = v;
    }
    if let Some(v) = a.role {
        c.role = match v.as_str() {
            "auth" => Role::Auth,
            "storage" => Role::Storage,
            "edge" => Role::Edge,
            _ => Role::All,
        };
    }
    if let Some(v) = a.auth_unreachable {
        c.auth_unreachable = if v == "fail_open" { AuthUnreachable::FailOpen } else { AuthUnreachable::FailClosed };
    }
    c.root = a.root.or(c.root);
    c.registry = a.registry.or(c.registry);
    c.upstream = a.upstream.or(c.upstream);
    c.admin_token_file = a.admin_token_file.or(c.admin_token_file);
    c.tls_cert = a.tls_cert.or(c.tls_cert);
    c.tls_key = a.tls_key.or(c.tls_key);
    c.upstream_ca_cert = a.upstream_ca_cert.or(c.upstream_ca_cert);
    c.session_ttl_secs = a.session_ttl_secs.unwrap_or(c.session_ttl_secs);
    c.checkin_interval_secs = a.checkin_interval_secs.unwrap_or(c.checkin_interval_secs);
    c.tenant_kdf_memory_kib = a.tenant_kdf_memory_kib.unwrap_or(c.tenant_kdf_memory_kib);
    c.tenant_kdf_iterations = a.tenant_kdf_iterations.unwrap_or(c.tenant_kdf_iterations);
    c.header_read_timeout_secs = a.header_read_timeout_secs.unwrap_or(c.header_read_timeout_secs);
    c.body_read_timeout_secs = a.body_read_timeout_secs.unwrap_or(c.body_read_timeout_secs);
    c.max_concurrent_uploads = a.max_concurrent_uploads.unwrap_or(c.max_concurrent_uploads);
    c.max_concurrent_uploads_per_tenant =
        a.max_concurrent_uploads_per_tenant.unwrap_or(c.max_concurrent_uploads_per_tenant);
    c.upload_slot_wait_ms = a.upload_slot_wait_ms.unwrap_or(c.upload_slot_wait_ms);
    c.max_upload_buffer_mib = a.max_upload_buffer_mib.unwrap_or(c.max_upload_buffer_mib);
    c.max_concurrent_reads = a.max_concurrent_reads.unwrap_or(c.max_concurrent_reads);
    c.metrics_token_file = a.metrics_token_file.or(c.metrics_token_file).or_else(|| credential("metrics_token"));
    // Each secret from, in order: the flag or config key naming its file,
    // its environment variable, the systemd credential of its name.
    c.password_file = a.password_file.or(c.password_file);
    if c.password_file.is_none() && std::env::var_os("CHUNKVAULT_PASSWORD").is_none() {
        c.password_file = credential("password");
    }
    if c.admin_token_file.is_none() && std::env::var_os("CHUNKVAULT_ADMIN_TOKEN").is_none() {
        c.admin_token_file = credential("admin_token");
    }
    let admin_token = secret(c.admin_token_file.as_ref(), "CHUNKVAULT_ADMIN_TOKEN")?;
    let password = secret(c.password_file.as_ref(), "CHUNKVAULT_PASSWORD")?;
    server::run(c, password, admin_token).map_err(|e| CliError::Other(e.to_string()))?;
    Ok(ExitCode::SUCCESS)
}
