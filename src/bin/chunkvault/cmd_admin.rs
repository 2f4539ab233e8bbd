//! `admin`: the administrator's client of a running server.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkvault::api::CreateDeploymentToken;
use chunkvault::client::admin::AdminClient;

use crate::ctx::{password_from, CliError, Ctx};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The server's URL.
    #[arg(long)]
    pub server: String,
    /// File holding the admin token (else $CHUNKVAULT_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Mass deployment tokens.
    #[command(name = "deployment-token", subcommand)]
    DeploymentToken(TokenCommand),
    /// List devices, their state and when they were last seen.
    Devices,
    /// Change a device's state.
    Device {
        #[arg(value_parser = ["retire", "block", "allow", "wipe"])]
        action: String,
        device_id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token (printed once).
    Create {
        #[arg(long)]
        tenant: String,
        /// Lifetime in seconds (default 30 days).
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long)]
        max_activations: Option<u32>,
    },
}

pub fn run(ctx: &Ctx, a: AdminArgs) -> CmdResult {
    let token = password_from(a.admin_token_file.as_ref(), "CHUNKVAULT_ADMIN_TOKEN", "admin token: ")?;
    let token = String::from_utf8(token).map_err(|_| CliError::Usage("the admin token is not UTF-8".into()))?;
    let client = AdminClient::new(&a.server, token);
    let failed = |e: chunkvault::client::ClientError| CliError::Other(e.to_string());
    match a.command {
        AdminCommand::DeploymentToken(TokenCommand::Create { tenant, expires_in, max_activations }) => {
            let req = CreateDeploymentToken { tenant, expires_in_secs: expires_in, max_activations };
            let created = client.create_deployment_token(&req).map_err(failed)?;
            if ctx.args.json {
                ctx.print_json(&created);
            } else {
                println!("{}", created.token);
                ctx.info(format!("tenant {}, expires {}", created.tenant, created.expires_at.to_rfc3339()));
            }
        }
        AdminCommand::Devices => {
            let devices = client.devices().map_err(failed)?;
            if ctx.args.json {
                ctx.print_json(&devices);
            } else {
                println!("{:<24}  {:<12}  {:<28}  {:<8}  last seen", "device", "tenant", "email", "state");
                for d in &devices {
                    let seen = d.last_seen.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into());
                    println!("{:<24}  {:<12}  {:<28}  {:<8}  {seen}", d.device_id, d.tenant, d.email, d.state);
                }
            }
        }
        AdminCommand::Device { action, device_id } => {
            let change = client.device_action(&device_id, &action).map_err(failed)?;
            if ctx.args.json {
                ctx.print_json(&change);
            } else {
                println!("device {} is now {}", change.device_id, change.state);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
