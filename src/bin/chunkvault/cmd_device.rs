//! `device`: the device-side client (activation, backup, restore).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chunkvault::client::device::{default_state_dir, Device, ManagedConfig};
use chunkvault::client::ClientError;

use crate::cmd_restore::OverwriteArg;
use crate::ctx::{human_bytes, CliError, Ctx};
use crate::CmdResult;

/// `device`: its subcommands and the output flags they share.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    #[command(subcommand)]
    pub command: DeviceCommand,
    #[command(flatten)]
    pub out: crate::ctx::OutputArgs,
}

#[derive(clap::Subcommand, Debug)]
pub enum DeviceCommand {
    /// Activate silently from a managed app configuration (JSON).
    Activate {
        /// The managed app configuration the MDM pushed (serverURL, userEmail, deploymentToken, ...).
        #[arg(long)]
        managed_config: PathBuf,
    },
    /// Back up files and directories; prints the snapshot id.
    Backup {
        /// Files and directories to back up.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the user's snapshots.
    Snapshots,
    /// Restore a snapshot (`latest`, an id or a prefix) into a directory.
    Restore {
        /// Snapshot id, unique id prefix, or `latest`.
        snapshot: String,
        /// Directory to restore into (created if missing).
        #[arg(long)]
        target: PathBuf,
        /// Restore only this path of the snapshot and what lies below it (repeatable).
        #[arg(long)]
        include: Vec<String>,
        /// What to do with files already in the target (see `restore --help`).
        #[arg(long, value_enum, default_value_t = OverwriteArg::Always)]
        overwrite: OverwriteArg,
    },
    /// This device's activation and its state on the server.
    Status,
}

fn failed(e: ClientError) -> CliError {
    match e {
        // Said plainly: the backup is refused as a whole, nothing is lost.
        ClientError::Api { code, message, .. } if code == "quota_exceeded" => CliError::Other(format!(
            "the server refused this backup: your organisation's storage quota is full ({message}). \
             This backup was not saved; earlier backups are intact and can still be restored."
        )),
        e => CliError::Other(e.to_string()),
    }
}

pub fn run(ctx: &Ctx, cmd: DeviceCommand) -> CmdResult {
    let dir = default_state_dir();
    let mut device = match &cmd {
        DeviceCommand::Activate { managed_config } => return activate(ctx, &dir, managed_config),
        _ => Device::load(&dir).map_err(failed)?,
    };
    let is_status = matches!(cmd, DeviceCommand::Status);
    let result = run_on(ctx, &mut device, cmd);
    // Whatever the command, an answer that logged the device out is told,
    // with what a wipe removed and left (`status --json` has it in its
    // document; other commands' JSON goes to stderr beside the error).
    if let Some(out) = device.logged_out() {
        if ctx.json() {
            if !is_status {
                eprintln!("{}", serde_json::json!({ "logged_out": out }));
            }
        } else {
            let what = if out.reason == "device_wiped" { "wiped" } else { "retired" };
            eprintln!("this device was {what} by the administrator: logged out and its state cleared");
            if let Some(w) = &out.wipe {
                for p in &w.removed {
                    eprintln!("removed {}", p.display());
                }
                for l in &w.left {
                    eprintln!("left {}: {}", l.path.display(), l.reason);
                }
                eprintln!("wipe: removed {} entries, left {}", w.removed.len(), w.left.len());
            }
        }
    }
    result
}

fn run_on(ctx: &Ctx, device: &mut Device, cmd: DeviceCommand) -> CmdResult {
    match cmd {
        DeviceCommand::Activate { .. } => {} // returned above
        DeviceCommand::Backup { paths } => {
            let done = device.backup(&paths).map_err(failed)?;
            for s in &done.skipped {
                ctx.info(format!("skipped {s}: not a regular file or directory"));
            }
            if ctx.json() {
                ctx.print_json(&done);
            } else {
                println!("{}", done.id);
                ctx.info(format!(
                    "{} files, {}; uploaded {} of {} chunks ({})",
                    done.files,
                    human_bytes(done.bytes),
                    done.chunks_uploaded,
                    done.chunks,
                    human_bytes(done.bytes_uploaded)
                ));
            }
        }
        DeviceCommand::Snapshots => {
            let list = device.snapshots().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&list);
            } else {
                for s in &list {
                    println!(
                        "{}  {}  {:<16}  {:>10}  {}",
                        s.id.short(),
                        s.time.format("%Y-%m-%d %H:%M:%S"),
                        s.device.as_deref().unwrap_or("-"),
                        human_bytes(s.bytes),
                        s.paths.join(" ")
                    );
                }
            }
        }
        DeviceCommand::Restore { snapshot, target, include, overwrite } => {
            let done = device.restore(&snapshot, &target, &include, overwrite.into()).map_err(failed)?;
            let r = &done.report;
            for w in &r.warnings {
                ctx.info(format!("warning: {w}"));
            }
            for d in r.damaged.iter().chain(&r.failed) {
                eprintln!("not restored: {}: {}", d.path, d.error);
            }
            if ctx.json() {
                ctx.print_json(&done);
            } else {
                ctx.info(format!(
                    "restored {} files, {} dirs, {} symlinks ({}) from {}",
                    r.files,
                    r.dirs,
                    r.symlinks,
                    human_bytes(r.bytes),
                    done.snapshot
                ));
            }
            if !r.damaged.is_empty() {
                return Ok(ExitCode::from(crate::exit::DAMAGE));
            }
            if !r.failed.is_empty() {
                return Ok(ExitCode::from(crate::exit::ERROR));
            }
        }
        DeviceCommand::Status => {
            let status = device.status().map_err(failed)?;
            if ctx.json() {
                ctx.print_json(&status);
            } else {
                println!("device {} of {} at {}: {}", status.device_id, status.email, status.server_url, status.state);
            }
            // A device the server no longer serves is not a success.
            if status.state != "active" {
                return Ok(ExitCode::from(crate::exit::ERROR));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn activate(ctx: &Ctx, dir: &Path, managed_config: &Path) -> CmdResult {
    let bytes =
        std::fs::read(managed_config).map_err(|e| CliError::Other(format!("{}: {e}", managed_config.display())))?;
    let managed = ManagedConfig::parse(&bytes).map_err(failed)?;
    let device = Device::activate(dir, &managed).map_err(failed)?;
    if ctx.json() {
        ctx.print_json(&serde_json::json!({"device_id": device.device_id(), "state_dir": dir}));
    } else {
        println!("activated device {}", device.device_id());
    }
    Ok(ExitCode::SUCCESS)
}
