//! `admin`: the administrator's client of a running server.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkvault::api::{CreateAdminToken, CreateDeploymentToken, Policies, UsersChanged};
use chunkvault::client::admin::AdminClient;

use crate::ctx::{human_bytes, password_from, CliError, Ctx};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct AdminArgs {
    /// The server's URL.
    #[arg(long)]
    pub server: String,
    /// File holding the admin token (else $CHUNKVAULT_ADMIN_TOKEN).
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// A CA certificate (PEM) to trust besides the platform's roots, for a
    /// server whose certificate a private CA signed.
    #[arg(long, global = true, env = "CHUNKVAULT_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
    #[command(flatten)]
    pub out: crate::ctx::OutputArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminCommand {
    /// Mass deployment tokens.
    #[command(name = "deployment-token", subcommand)]
    DeploymentToken(TokenCommand),
    /// Scoped admin tokens (admin, tenant-admin, read-only).
    #[command(subcommand)]
    Token(AdminTokenCommand),
    /// Who the server takes this admin token for: id, role, tenant.
    Whoami,
    /// List devices, their state and when they were last seen.
    Devices,
    /// Change a device's state; `reset` voids its tokens and lets the device
    /// id activate again; `delete` removes a retired or wiped device from
    /// the registry (its snapshots stay).
    Device {
        /// What to do: retire, block, allow, wipe, reset or delete.
        #[arg(value_parser = ["retire", "block", "allow", "wipe", "reset", "delete"])]
        action: String,
        /// The device's id (as `admin devices` lists it).
        device_id: String,
    },
    /// Tenants with their devices, snapshots, stored bytes and quota.
    Tenants,
    /// A tenant's settings.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// The audit log of admin actions and device state changes, newest first.
    Audit {
        /// Only entries of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only entries at or after this time (RFC 3339).
        #[arg(long, value_parser = parse_time)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// The users a tenant's `--provisioned-only` deployment tokens activate.
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum AdminTokenCommand {
    /// Create an admin token; it is printed once.
    Create {
        /// What the token may do: admin (everything), tenant-admin (one
        /// tenant's devices and tokens) or read-only.
        #[arg(long, value_parser = ["admin", "tenant-admin", "read-only"])]
        role: String,
        /// The one tenant the token covers (required for tenant-admin).
        #[arg(long)]
        tenant: Option<String>,
        /// What the token is for, shown by `token list`.
        #[arg(long)]
        label: Option<String>,
    },
    /// List admin tokens (never their secrets).
    List,
    /// Revoke an admin token by id; it stops working at once.
    Revoke {
        /// The token's id (as `token list` shows it).
        id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TenantCommand {
    /// Cap what the tenant may store, in bytes of packs (0: no quota).
    SetQuota {
        /// The tenant.
        tenant: String,
        /// The most bytes of packs it may store (0: no quota).
        bytes: u64,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum UserCommand {
    /// Provision users (emails exactly as the managed config will give them).
    Add {
        /// The tenant the users belong to.
        #[arg(long)]
        tenant: String,
        /// The users' emails.
        #[arg(required = true)]
        emails: Vec<String>,
    },
    /// List a tenant's provisioned users.
    List {
        /// The tenant whose users to list.
        #[arg(long)]
        tenant: String,
    },
    /// Remove provisioned users (their devices keep working: retire them).
    Remove {
        /// The tenant the users belong to.
        #[arg(long)]
        tenant: String,
        /// The users' emails.
        #[arg(required = true)]
        emails: Vec<String>,
    },
}

#[derive(clap::Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token (printed once).
    Create {
        /// The tenant whose devices it activates (its repository is created if new).
        #[arg(long)]
        tenant: String,
        /// Lifetime in seconds (default 30 days).
        #[arg(long)]
        expires_in: Option<u64>,
        /// How many devices it may activate (default: no limit).
        #[arg(long)]
        max_activations: Option<u32>,
        /// A policy for the devices it activates, NAME=true|false
        /// (allowRestoreToOtherDevice, allowOpenIn); unset ones are allowed.
        #[arg(long = "policy", value_name = "NAME=BOOL", value_parser = parse_policy)]
        policies: Vec<(String, bool)>,
        /// Activate only users provisioned with `admin user add`.
        #[arg(long)]
        provisioned_only: bool,
    },
    /// List deployment tokens (never their secrets).
    List {
        /// Only this tenant's tokens.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a deployment token by id: it activates no more devices (those
    /// it activated keep working).
    Revoke {
        /// The token's id (as `deployment-token list` shows it).
        id: String,
    },
}

/// Reads `--ca-cert`, refusing a file larger than a CA PEM can be.
pub(crate) fn read_ca_cert(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    use std::io::Read;
    let failed = |e: std::io::Error| CliError::Other(format!("reading the CA certificate {}: {e}", path.display()));
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(chunkvault::tls::MAX_CA_PEM as u64 + 1).read_to_end(&mut pem))
        .map_err(failed)?;
    if pem.len() > chunkvault::tls::MAX_CA_PEM {
        return Err(CliError::Other(format!(
            "the CA certificate {} is larger than {} bytes",
            path.display(),
            chunkvault::tls::MAX_CA_PEM
        )));
    }
    Ok(pem)
}

/// An RFC 3339 time.
fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.to_utc())
        .map_err(|e| format!("{s:?}: not an RFC 3339 time ({e})"))
}

/// `NAME=true|false`, with a known policy name.
fn parse_policy(s: &str) -> Result<(String, bool), String> {
    let (name, value) = s.split_once('=').ok_or("expected NAME=true or NAME=false")?;
    let value = value.parse::<bool>().map_err(|_| format!("{value:?}: expected true or false"))?;
    Policies::default().set(name, value)?;
    Ok((name.to_owned(), value))
}

pub fn run(ctx: &Ctx, a: AdminArgs) -> CmdResult {
    let token = password_from(a.admin_token_file.as_ref(), "CHUNKVAULT_ADMIN_TOKEN", "admin token: ")?;
    let token = String::from_utf8(token).map_err(|_| CliError::Usage("the admin token is not UTF-8".into()))?;
    let failed = |e: chunkvault::client::ClientError| CliError::Other(e.to_string());
    let ca = a.ca_cert.as_deref().map(read_ca_cert).transpose()?;
    let client = AdminClient::with_ca(&a.server, token, ca.as_deref()).map_err(failed)?;
    match a.command {
        AdminCommand::DeploymentToken(TokenCommand::Create {
            tenant,
            expires_in,
            max_activations,
            policies,
            provisioned_only,
        }) => {
            let mut set = Policies::default();
            for (name, value) in &policies {
                set.set(name, *value).map_err(CliError::Usage)?;
            }
            let req = CreateDeploymentToken {
                tenant,
                expires_in_secs: expires_in,
                max_activations,
                policies: (!policies.is_empty()).then_some(set),
                provisioned_only,
            };
            let created = client.create_deployment_token(&req).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&created);
            } else {
                println!("{}", created.token);
                let p = created.policies;
                ctx.info(format!(
                    "token id {}, tenant {}, expires {}, allowRestoreToOtherDevice={}, allowOpenIn={}{}",
                    created.token_id,
                    created.tenant,
                    created.expires_at.to_rfc3339(),
                    p.allow_restore_to_other_device,
                    p.allow_open_in,
                    if created.provisioned_only { ", provisioned users only" } else { "" }
                ));
            }
        }
        AdminCommand::Devices => {
            let devices = client.devices().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&devices);
            } else {
                println!(
                    "{:<24}  {:<12}  {:<28}  {:<8}  {:<16}  last seen",
                    "device", "tenant", "email", "state", "deployment token"
                );
                for d in &devices {
                    let seen = d.last_seen.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into());
                    let token = d.deployment_token_id.as_deref().unwrap_or("-");
                    println!(
                        "{:<24}  {:<12}  {:<28}  {:<8}  {token:<16}  {seen}",
                        d.device_id, d.tenant, d.email, d.state
                    );
                }
            }
        }
        AdminCommand::Device { action, device_id } if action == "delete" => {
            let change = client.delete_device(&device_id).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&change);
            } else {
                println!("device {} deleted", change.device_id);
            }
        }
        AdminCommand::Device { action, device_id } => {
            let change = client.device_action(&device_id, &action).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&change);
            } else {
                println!("device {} is now {}", change.device_id, change.state);
            }
        }
        AdminCommand::DeploymentToken(TokenCommand::List { tenant }) => {
            let tokens = client.deployment_tokens(tenant.as_deref()).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&tokens);
            } else {
                println!(
                    "{:<16}  {:<12}  {:<25}  {:<25}  {:<11}  {:<8}  flags",
                    "id", "tenant", "created", "expires", "activations", "revoked"
                );
                for t in &tokens {
                    let max = t.max_activations.map_or("-".into(), |m| m.to_string());
                    let p = t.policies;
                    let mut flags = Vec::new();
                    if !p.allow_restore_to_other_device {
                        flags.push("allowRestoreToOtherDevice=false");
                    }
                    if !p.allow_open_in {
                        flags.push("allowOpenIn=false");
                    }
                    if t.provisioned_only {
                        flags.push("provisioned-only");
                    }
                    println!(
                        "{:<16}  {:<12}  {:<25}  {:<25}  {:<11}  {:<8}  {}",
                        t.token_id,
                        t.tenant,
                        t.created_at.to_rfc3339(),
                        t.expires_at.to_rfc3339(),
                        format!("{}/{max}", t.activations),
                        if t.revoked { "yes" } else { "no" },
                        flags.join(",")
                    );
                }
            }
        }
        AdminCommand::DeploymentToken(TokenCommand::Revoke { id }) => {
            let t = client.revoke_deployment_token(&id).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&t);
            } else {
                println!("deployment token {} of tenant {} revoked", t.token_id, t.tenant);
            }
        }
        AdminCommand::Token(AdminTokenCommand::Create { role, tenant, label }) => {
            let role = role.parse().map_err(CliError::Usage)?;
            chunkvault::auth::admin::check_scope(role, tenant.as_deref()).map_err(CliError::Usage)?;
            let created = client.create_admin_token(&CreateAdminToken { role, tenant, label }).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&created);
            } else {
                println!("{}", created.token);
                let scope = created.info.tenant.as_deref().unwrap_or("every tenant");
                ctx.info(format!(
                    "admin token id {}, role {}, {scope}; shown this once",
                    created.info.id, created.info.role
                ));
            }
        }
        AdminCommand::Token(AdminTokenCommand::List) => {
            let tokens = client.admin_tokens().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&tokens);
            } else {
                println!("{:<16}  {:<12}  {:<12}  {:<25}  {:<25}  label", "id", "role", "tenant", "created", "revoked");
                for t in &tokens {
                    let revoked = t.revoked_at.map_or("-".into(), |r| r.to_rfc3339());
                    println!(
                        "{:<16}  {:<12}  {:<12}  {:<25}  {revoked:<25}  {}",
                        t.id,
                        t.role.as_str(),
                        t.tenant.as_deref().unwrap_or("*"),
                        t.created_at.to_rfc3339(),
                        t.label.as_deref().unwrap_or("")
                    );
                }
            }
        }
        AdminCommand::Token(AdminTokenCommand::Revoke { id }) => {
            let t = client.revoke_admin_token(&id).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&t);
            } else {
                println!("admin token {} revoked", t.id);
            }
        }
        AdminCommand::Whoami => {
            let who = client.whoami().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&who);
            } else {
                println!("{} {} {}", who.id, who.role, who.tenant.as_deref().unwrap_or("*"));
            }
        }
        AdminCommand::Tenants => {
            let tenants = client.tenants().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&tenants);
            } else {
                println!("{:<16}  {:>7}  {:>9}  {:>12}  {:>12}", "tenant", "devices", "snapshots", "stored", "quota");
                for t in &tenants {
                    let snapshots = t.snapshots.map_or("-".into(), |n| n.to_string());
                    let stored = t.stored_bytes.map_or("-".into(), human_bytes);
                    let quota = if t.quota_bytes == 0 { "none".into() } else { human_bytes(t.quota_bytes) };
                    println!("{:<16}  {:>7}  {snapshots:>9}  {stored:>12}  {quota:>12}", t.tenant, t.devices);
                }
            }
        }
        AdminCommand::Tenant(TenantCommand::SetQuota { tenant, bytes }) => {
            chunkvault::api::check_tenant(&tenant).map_err(CliError::Usage)?;
            let q = client.set_quota(&tenant, bytes).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&q);
            } else if q.quota_bytes == 0 {
                println!("tenant {} has no quota", q.tenant);
            } else {
                println!("tenant {} quota: {} bytes ({})", q.tenant, q.quota_bytes, human_bytes(q.quota_bytes));
            }
        }
        AdminCommand::Audit { tenant, since } => {
            let entries = client.audit(tenant.as_deref(), since).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&entries);
            } else {
                for e in &entries {
                    println!(
                        "{}  {:<16}  {:<24}  {:<24}  {:<12}  {}",
                        e.at.to_rfc3339(),
                        e.actor,
                        e.action,
                        e.target,
                        e.tenant.as_deref().unwrap_or("-"),
                        e.detail
                    );
                }
            }
        }
        AdminCommand::User(UserCommand::Add { tenant, emails }) => {
            for e in &emails {
                chunkvault::api::check_email(e).map_err(|m| CliError::Usage(format!("{e}: {m}")))?;
            }
            let changed = client.add_users(&tenant, &emails).map_err(failed)?;
            report_users(ctx, &changed, "added", emails.len());
        }
        AdminCommand::User(UserCommand::List { tenant }) => {
            let users = client.users(&tenant).map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&users);
            } else {
                for u in &users {
                    println!("{}  added {}", u.email, u.added_at.to_rfc3339());
                }
            }
        }
        AdminCommand::User(UserCommand::Remove { tenant, emails }) => {
            for e in &emails {
                chunkvault::api::check_email(e).map_err(|m| CliError::Usage(format!("{e}: {m}")))?;
            }
            let mut all = UsersChanged { tenant: tenant.clone(), changed: Vec::new() };
            for e in &emails {
                all.changed.extend(client.remove_user(&tenant, e).map_err(failed)?.changed);
            }
            report_users(ctx, &all, "removed", emails.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints what a `user add` or `user remove` changed.
fn report_users(ctx: &Ctx, changed: &UsersChanged, verb: &str, asked: usize) {
    if ctx.json() {
        ctx.print_json(changed);
    } else {
        for e in &changed.changed {
            println!("{verb} {e}");
        }
        let unchanged = asked.saturating_sub(changed.changed.len());
        if unchanged > 0 {
            ctx.info(format!("{unchanged} already {}", if verb == "added" { "listed" } else { "absent" }));
        }
    }
}
