//! The server's TOML config; command-line flags override it.

use std::path::PathBuf;

use serde::Deserialize;

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
    pub role: Role,
    pub listen: String,
    /// The tenants' repositories' root (a path).
    pub root: Option<String>,
    /// The SQLite registry; default `ROOT/registry.db`.
    pub registry: Option<PathBuf>,
    pub admin_token_file: Option<PathBuf>,
    pub session_ttl_secs: u64,
    pub checkin_interval_secs: u64,
    pub auth_unreachable: AuthUnreachable,
    /// The auth role's URL (edge and storage roles).
    pub upstream: Option<String>,
    /// Argon2id memory (KiB) and passes for keys of tenants created here.
    pub tenant_kdf_memory_kib: u32,
    pub tenant_kdf_iterations: u32,
    /// Failed activations allowed per client address per minute.
    pub activation_failures_per_minute: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            role: Role::All,
            listen: "127.0.0.1:8080".into(),
            root: None,
            registry: None,
            admin_token_file: None,
            session_ttl_secs: 900,
            checkin_interval_secs: 30,
            auth_unreachable: AuthUnreachable::FailClosed,
            upstream: None,
            tenant_kdf_memory_kib: 64 * 1024,
            tenant_kdf_iterations: 3,
            activation_failures_per_minute: 20,
        }
    }
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("config: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("config: {0}")]
    Invalid(String),
}

impl ServerConfig {
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
        need(self.session_ttl_secs > 0 && self.checkin_interval_secs > 0, "intervals must be positive")
    }

    /// Where the registry lives.
    pub fn registry_path(&self) -> Option<PathBuf> {
        self.registry.clone().or_else(|| self.root.as_ref().map(|r| PathBuf::from(r).join("registry.db")))
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
    }
}
