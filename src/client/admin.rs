//! The administrator's client: deployment tokens, device states and
//! provisioned users.

use super::{segment_escape, ClientError, Http};
use crate::api::{
    AddUsers, CreateDeploymentToken, DeploymentTokenCreated, DeviceChange, DeviceInfo, UserInfo, UsersChanged,
};

/// Talks to the admin routes with the admin token.
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

    pub fn create_deployment_token(&self, req: &CreateDeploymentToken) -> Result<DeploymentTokenCreated, ClientError> {
        self.http.post("/v1/admin/deployment-tokens", Some(&self.token), req)
    }

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

    /// Removes a provisioned user; `changed` is empty if it was not listed.
    pub fn remove_user(&self, tenant: &str, email: &str) -> Result<UsersChanged, ClientError> {
        crate::api::check_tenant(tenant).map_err(ClientError::Local)?;
        crate::api::check_email(email).map_err(ClientError::Local)?;
        self.http.delete(&format!("/v1/admin/tenants/{tenant}/users/{}", segment_escape(email)), Some(&self.token))
    }
}
