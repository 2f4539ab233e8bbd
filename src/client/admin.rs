//! The administrator's client: deployment tokens and device states.

use super::{ClientError, Http};
use crate::api::{CreateDeploymentToken, DeploymentTokenCreated, DeviceChange, DeviceInfo};

pub struct AdminClient {
    http: Http,
    token: String,
}

impl AdminClient {
    pub fn new(server: &str, token: String) -> AdminClient {
        AdminClient { http: Http::new(server), token }
    }

    pub fn create_deployment_token(&self, req: &CreateDeploymentToken) -> Result<DeploymentTokenCreated, ClientError> {
        self.http.post("/v1/admin/deployment-tokens", Some(&self.token), req)
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ClientError> {
        self.http.get("/v1/admin/devices", Some(&self.token))
    }

    /// `action` is retire, block, allow or wipe.
    pub fn device_action(&self, device_id: &str, action: &str) -> Result<DeviceChange, ClientError> {
        crate::api::check_device_id(device_id).map_err(ClientError::Local)?;
        self.http.post(&format!("/v1/admin/devices/{device_id}/{action}"), Some(&self.token), &serde_json::json!({}))
    }
}
