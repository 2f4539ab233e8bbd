//! Who an administrator is and what it may touch, sans I/O. The server's
//! admin extractor builds an [`AdminIdentity`] for every admin request (the
//! bootstrap token from `CHUNKVAULT_ADMIN_TOKEN`, or a token of the
//! registry's `admin_tokens` table) and the handlers ask it before acting.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The id the bootstrap administrator (`CHUNKVAULT_ADMIN_TOKEN`) has in the
/// audit log and in `whoami`.
pub const BOOTSTRAP_ID: &str = "bootstrap";

/// What an admin token may do.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdminRole {
    /// Everything, in every tenant (with no tenant) or in one.
    Admin,
    /// Everything within one tenant, except its quota.
    TenantAdmin,
    /// Reads (GET) only, in every tenant or in one.
    ReadOnly,
}

impl AdminRole {
    /// The kebab-case name the API and the registry use (`admin`,
    /// `tenant-admin`, `read-only`); [`FromStr`] parses it back.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminRole::Admin => "admin",
            AdminRole::TenantAdmin => "tenant-admin",
            AdminRole::ReadOnly => "read-only",
        }
    }

    /// How much a role may do, for "may this caller grant that role".
    fn rank(self) -> u8 {
        match self {
            AdminRole::Admin => 2,
            AdminRole::TenantAdmin => 1,
            AdminRole::ReadOnly => 0,
        }
    }
}

impl fmt::Display for AdminRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AdminRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "admin" => AdminRole::Admin,
            "tenant-admin" => AdminRole::TenantAdmin,
            "read-only" => AdminRole::ReadOnly,
            other => return Err(format!("unknown role {other:?}; known: admin, tenant-admin, read-only")),
        })
    }
}

/// Checks a role and tenant pair for a new token: a tenant admin needs a
/// tenant, an admin has none (an admin of one tenant is a tenant admin), a
/// read-only token may have one.
pub fn check_scope(role: AdminRole, tenant: Option<&str>) -> Result<(), String> {
    match (role, tenant) {
        (AdminRole::TenantAdmin, None) => Err("a tenant-admin token needs --tenant".into()),
        (AdminRole::Admin, Some(_)) => Err("an admin token covers every tenant: use tenant-admin for one".into()),
        (_, Some(t)) => crate::api::check_tenant(t),
        _ => Ok(()),
    }
}

/// Why an administrator may not do something.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    /// The target is outside the caller's tenant, or needs a wider role.
    #[error("{0}")]
    Forbidden(String),
    /// A read-only token asked for a change.
    #[error("this admin token is read-only")]
    ReadOnly,
}

/// The caller of an admin route.
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminIdentity {
    /// The token's id, or [`BOOTSTRAP_ID`].
    pub id: String,
    /// What the token may do; with `tenant`, where.
    pub role: AdminRole,
    /// The one tenant the token covers; `None`: every tenant.
    pub tenant: Option<String>,
}

impl AdminIdentity {
    /// The administrator of `CHUNKVAULT_ADMIN_TOKEN`.
    pub fn bootstrap() -> AdminIdentity {
        AdminIdentity { id: BOOTSTRAP_ID.into(), role: AdminRole::Admin, tenant: None }
    }

    /// Whether the caller may see `tenant`'s devices, tokens, users and audit.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant.as_deref().map_or(true, |own| own == tenant)
    }

    /// Refuses a tenant the caller does not cover.
    pub fn require_tenant(&self, tenant: &str) -> Result<(), ScopeError> {
        if self.sees(tenant) {
            Ok(())
        } else {
            Err(ScopeError::Forbidden(format!("this admin token covers tenant {:?} only", self.tenant)))
        }
    }

    /// Refuses a read-only caller (the extractor already refuses its
    /// non-GET requests; handlers that change something say so again).
    pub fn require_write(&self) -> Result<(), ScopeError> {
        if self.role == AdminRole::ReadOnly {
            Err(ScopeError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Refuses a change in `tenant` by a caller that does not cover it or
    /// cannot change anything.
    pub fn require_write_in(&self, tenant: &str) -> Result<(), ScopeError> {
        self.require_write()?;
        self.require_tenant(tenant)
    }

    /// Refuses anything but an administrator of every tenant (quotas, the
    /// storage nodes' check-in).
    pub fn require_global_admin(&self) -> Result<(), ScopeError> {
        if self.role == AdminRole::Admin && self.tenant.is_none() {
            Ok(())
        } else {
            Err(ScopeError::Forbidden("only an admin of every tenant may do this".into()))
        }
    }

    /// Refuses to make (or revoke) a token wider than the caller: a role
    /// above its own, or a scope beyond its tenant.
    pub fn require_grant(&self, role: AdminRole, tenant: Option<&str>) -> Result<(), ScopeError> {
        self.require_write()?;
        if role.rank() > self.role.rank() {
            return Err(ScopeError::Forbidden(format!("a {} cannot grant {role}", self.role)));
        }
        match (&self.tenant, tenant) {
            (None, _) => Ok(()),
            (Some(own), Some(t)) if own == t => Ok(()),
            (Some(own), _) => Err(ScopeError::Forbidden(format!("this admin token covers tenant {own:?} only"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(role: AdminRole, tenant: Option<&str>) -> AdminIdentity {
        AdminIdentity { id: "x".into(), role, tenant: tenant.map(Into::into) }
    }

    #[test]
    fn roles_parse_and_scopes_are_checked() {
        for r in [AdminRole::Admin, AdminRole::TenantAdmin, AdminRole::ReadOnly] {
            assert_eq!(r.as_str().parse::<AdminRole>().unwrap(), r);
        }
        assert!("root".parse::<AdminRole>().is_err());
        assert!(check_scope(AdminRole::TenantAdmin, None).is_err());
        assert!(check_scope(AdminRole::Admin, Some("acme")).is_err());
        assert!(check_scope(AdminRole::TenantAdmin, Some("../x")).is_err());
        check_scope(AdminRole::TenantAdmin, Some("acme")).unwrap();
        check_scope(AdminRole::ReadOnly, None).unwrap();
        check_scope(AdminRole::ReadOnly, Some("acme")).unwrap();
    }

    #[test]
    fn a_tenant_admin_stays_in_its_tenant_and_below_its_role() {
        let ta = id(AdminRole::TenantAdmin, Some("acme"));
        assert!(ta.sees("acme") && !ta.sees("globex"));
        ta.require_write_in("acme").unwrap();
        assert!(matches!(ta.require_write_in("globex"), Err(ScopeError::Forbidden(_))));
        assert!(ta.require_global_admin().is_err());
        ta.require_grant(AdminRole::ReadOnly, Some("acme")).unwrap();
        ta.require_grant(AdminRole::TenantAdmin, Some("acme")).unwrap();
        assert!(ta.require_grant(AdminRole::ReadOnly, None).is_err());
        assert!(ta.require_grant(AdminRole::TenantAdmin, Some("globex")).is_err());
        assert!(ta.require_grant(AdminRole::Admin, None).is_err());
    }

    #[test]
    fn read_only_changes_nothing_and_the_bootstrap_admin_everything() {
        let ro = id(AdminRole::ReadOnly, None);
        assert!(ro.sees("acme"));
        assert_eq!(ro.require_write_in("acme"), Err(ScopeError::ReadOnly));
        assert_eq!(ro.require_grant(AdminRole::ReadOnly, None), Err(ScopeError::ReadOnly));
        let boot = AdminIdentity::bootstrap();
        boot.require_global_admin().unwrap();
        boot.require_grant(AdminRole::Admin, None).unwrap();
        assert_eq!(boot.id, BOOTSTRAP_ID);
    }
}
