//! `device`: the device-side client (activation, backup, restore).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chunkvault::client::device::{default_state_dir, Device, ManagedConfig};
use chunkvault::client::ClientError;

use crate::ctx::{human_bytes, CliError, Ctx};
use crate::CmdResult;

#[derive(clap::Subcommand, Debug)]
pub enum DeviceCommand {
    /// Activate silently from a managed app configuration (JSON).
    Activate {
        #[arg(long)]
        managed_config: PathBuf,
    },
    /// Back up files and directories; prints the snapshot id.
    Backup {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// List the user's snapshots.
    Snapshots,
    /// Restore a snapshot (`latest`, an id or a prefix) into a directory.
    Restore {
        snapshot: String,
        #[arg(long)]
        target: PathBuf,
        #[arg(long)]
        include: Vec<String>,
    },
    /// This device's activation and its state on the server.
    Status,
}

fn failed(e: ClientError) -> CliError {
    CliError::Other(e.to_string())
}

pub fn run(ctx: &Ctx, cmd: DeviceCommand) -> CmdResult {
    let dir = default_state_dir();
    let mut device = match &cmd {
        DeviceCommand::Activate { managed_config } => return activate(ctx, &dir, managed_config),
        _ => Device::load(&dir).map_err(failed)?,
    };
    match cmd {
        DeviceCommand::Activate { .. } => {} // returned above
        DeviceCommand::Backup { paths } => {
            let done = device.backup(&paths).map_err(failed)?;
            for s in &done.skipped {
                ctx.info(format!("skipped {s}: not a regular file or directory"));
            }
            if ctx.args.json {
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
            if ctx.args.json {
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
        DeviceCommand::Restore { snapshot, target, include } => {
            let done = device.restore(&snapshot, &target, &include).map_err(failed)?;
            if ctx.args.json {
                ctx.print_json(&done);
            } else {
                ctx.info(format!("restored {} files ({}) from {}", done.files, human_bytes(done.bytes), done.snapshot));
            }
        }
        DeviceCommand::Status => {
            let status = device.status().map_err(failed)?;
            if ctx.args.json {
                ctx.print_json(&status);
            } else {
                println!("device {} of {} at {}: {}", status.device_id, status.email, status.server_url, status.state);
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
    if ctx.args.json {
        ctx.print_json(&serde_json::json!({"device_id": device.device_id(), "state_dir": dir}));
    } else {
        println!("activated device {}", device.device_id());
    }
    Ok(ExitCode::SUCCESS)
}
