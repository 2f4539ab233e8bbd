//! The administrator's client: admin and deployment tokens, device states,
//! provisioned users, tenants and their quotas, the audit log.

use chrono::{DateTime, Utc};

use super::{query_escape, segment_escape, ClientError, Http};
use crate::api::{
    AddUsers, AdminTokenCreated, AdminTokenInfo, AuditEntry, CreateAdminToken, CreateDeploymentToken,
    DeploymentTokenCreated, DeploymentTokenInfo, DeviceChange, DeviceInfo, SetQuota, TenantInfo, TenantQuota, UserInfo,
    UsersChanged,
};
use crate::auth::admin::AdminIdentity;

/// Talks to the admin routes with the admin token.
///
/// Every call is one blocking HTTP request (10 minute timeout); an error
/// answer is [`ClientError::Api`] with the server's code (`forbidden` when
/// the token's role or scope does not cover the call).
pub struct AdminClient {
    http: Http,
    token: String,
}

impl AdminClient {
    /// A client of `server` trusting the platform's CA roots.
    pub fn new(server: &str, token: String) -> AdminClient {
        AdminClient { http: Http::new(server), token }
    }

    /// A client of `server` trusting the platform's roots plus the CA in
    /// `ca_pem` (PEM, at most [`crate::tls::MAX_CA_PEM`] bytes).
    pub fn with_ca(server: &str, token: String, ca_pem: Option<&[u8]>) -> Result<AdminClient, ClientError> {
        let ca = match ca_pem {
            Some(pem) => crate::tls::parse_ca_pem(pem).map_err(ClientError::Local)?,
            None => Vec::new(),
        };
        Ok(AdminClient { http: Http::with_ca(server, &ca), token })
    }

    /// Creates a deployment token (its secret is in the answer, once).
    pub fn create_deployment_token(&self, req: &CreateDeploymentToken) -> Result<DeploymentTokenCreated, ClientError> {
        self.http.post("/v1/admin/deployment-tokens", Some(&self.token), req)
    }

    /// The devices of every tenant the token covers.
    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        self.http.get("/v1/admin/devices", Some(&self.token))
    }

    /// `action` is retire, block, allow, wipe or reset.
    pub fn device_action(&self, device_id: &str, action: &str) -> Result<DeviceChange, ClientError> {
        crate::api::check_device_id(device_id).map_err(ClientError::Local)?;
        self.http.post(&format!("/v1/admin/devices/{device_id}/{action}"), Some(&self.token), &serde_json::json!({}))
    }

    /// Provisions users of a tenant; returns those newly listed.
    pub fn add_users(&self, tenant: &str, emails: &[String]) -> Result<UsersChanged, ClientError> {
        crate::api::check_tenant(tenant).map_err(ClientError::Local)?;
        let req = AddUsers { emails: emails.to_vec() };
        self.http.post(&format!("/v1/admin/tenants/{tenant}/users"), Some(&self.token), &req)
    }

    /// A tenant's provisioned users.
    pub fn users(&self, tenant: &str) -> Result<Vec<UserInfo>, ClientError> {
        crate::api::check_tenant(tenant).map_err(ClientError::Local)?;
        self.http.get(&format!("/v1/admin/tenants/{tenant}/users"), Some(&self.token))
    }

    /// Who the server takes this client's token for.
    pub fn whoami(&self) -> Result<AdminIdentity, ClientError> {
        self.http.get("/v1/admin/whoami", Some(&self.token))
    }

    /// A scoped admin token (its secret is in the answer, once).
    pub fn create_admin_token(&self, req: &CreateAdminToken) -> Result<AdminTokenCreated, ClientError> {
        self.http.post("/v1/admin/tokens", Some(&self.token), req)
    }

    /// The admin tokens the caller may see (never their secrets).
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenInfo>, ClientError> {
        self.http.get("/v1/admin/tokens", Some(&self.token))
    }

    /// Revokes an admin token by id; answers it as it is now.
    pub fn revoke_admin_token(&self, id: &str) -> Result<AdminTokenInfo, ClientError> {
        self.http.post(
            &format!("/v1/admin/tokens/{}/revoke", segment_escape(id)),
            Some(&self.token),
            &serde_json::json!({}),
        )
    }

    /// Deployment tokens, of one tenant or of every tenant the token covers.
    pub fn deployment_tokens(&self, tenant: Option<&str>) -> Result<Vec<DeploymentTokenInfo>, ClientError> {
        self.http.get(&format!("/v1/admin/deployment-tokens{}", query(&[("tenant", tenant)])), Some(&self.token))
    }

    /// Revokes a deployment token by id; devices enrolled with it keep working.
    pub fn revoke_deployment_token(&self, id: &str) -> Result<DeploymentTokenInfo, ClientError> {
        let path = format!("/v1/admin/deployment-tokens/{}/revoke", segment_escape(id));
        self.http.post(&path, Some(&self.token), &serde_json::json!({}))
    }

    /// Deletes a retired or wiped device from the registry.
    pub fn delete_device(&self, device_id: &str) -> Result<DeviceChange, ClientError> {
        crate::api::check_device_id(device_id).map_err(ClientError::Local)?;
        self.http.delete(&format!("/v1/admin/devices/{device_id}"), Some(&self.token))
    }

    /// The tenants the token covers, with their usage and quotas.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, ClientError> {
        self.http.get("/v1/admin/tenants", Some(&self.token))
    }

    /// Sets a tenant's quota in bytes (0: none).
    pub fn set_quota(&self, tenant: &str, quota_bytes: u64) -> Result<TenantQuota, ClientError> {
        crate::api::check_tenant(tenant).map_err(ClientError::Local)?;
        self.http.put(&format!("/v1/admin/tenants/{tenant}/quota"), Some(&self.token), &SetQuota { quota_bytes })
    }

    /// The audit log, newest first.
    pub fn audit(&self, tenant: Option<&str>, since: Option<DateTime<Utc>>) -> Result<Vec<AuditEntry>, ClientError> {
        let since = since.map(|t| t.to_rfc3339());
        let q = query(&[("tenant", tenant), ("since", since.as_deref())]);
        self.http.get(&format!("/v1/admin/audit{q}"), Some(&self.token))
    }

    /// Removes a provisioned user; `changed` is empty if it was not listed.
    pub fn remove_user(&self, tenant: &str, email: &str) -> Result<UsersChanged, ClientError> {
        crate::api::check_tenant(tenant).map_err(ClientError::Local)?;
        crate::api::check_email(email).map_err(ClientError::Local)?;
        self.http.delete(&format!("/v1/admin/tenants/{tenant}/users/{}", segment_escape(email)), Some(&self.token))
    }
}

/// A query string of the pairs that have a value (`""` when none do).
fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let set: Vec<String> = pairs.iter().filter_map(|(k, v)| v.map(|v| format!("{k}={}", query_escape(v)))).collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}
