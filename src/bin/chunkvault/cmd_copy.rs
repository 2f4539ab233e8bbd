//! `copy`: snapshots from another repository into this one.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkvault::copy::{copy, CopyError, CopyOptions};
use chunkvault::repo::{self, Repository};
use chunkvault::select;

use crate::ctx::{human_bytes, password_of, CliError, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// Snapshots to copy (ids, prefixes or `latest` of the source; default:
    /// every snapshot of the source that passes the filters).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    /// The repository to copy from: a directory, or s3://bucket/prefix.
    #[arg(long, env = "CHUNKVAULT_FROM_REPO", value_name = "REPO")]
    pub from_repo: String,
    /// Read the source's password from this file (first line). Default:
    /// $CHUNKVAULT_FROM_PASSWORD, else a prompt.
    #[arg(long, env = "CHUNKVAULT_FROM_PASSWORD_FILE", value_name = "FILE")]
    pub from_password_file: Option<PathBuf>,
    /// Run CMD with `sh -c` and use the first line it prints as the source's password.
    #[arg(long, env = "CHUNKVAULT_FROM_PASSWORD_COMMAND", value_name = "CMD", conflicts_with = "from_password_file")]
    pub from_password_command: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn copy_cmd(ctx: &Ctx, a: CopyArgs) -> CmdResult {
    let password = password_of(
        a.from_password_file.as_ref(),
        a.from_password_command.as_deref(),
        "CHUNKVAULT_FROM_PASSWORD",
        "source repository password: ",
    )?;
    let source = Repository::open(repo::open_backend(&a.from_repo, false)?, &password)?;
    let target = ctx.open()?;
    let snapshots = select::find_all(&source, &a.snapshots, &a.filter.filter())?;
    let opts = CopyOptions { lock: ctx.lock_options(), ..CopyOptions::default() };
    let report = copy(&source, &target, &snapshots, &opts).map_err(|e| match e {
        CopyError::Repo(e) => CliError::Repo(e),
        CopyError::Lock(e) => CliError::Lock(e),
        other => CliError::Other(other.to_string()),
    })?;
    if ctx.json() {
        ctx.print_json(&report);
        return Ok(ExitCode::SUCCESS);
    }
    for s in &report.skipped {
        ctx.info(format!("snapshot {} is in this repository already (as {})", s.source.short(), s.copy.short()));
    }
    for c in &report.copied {
        println!(
            "copied snapshot {} of {} at {} as {}",
            c.source.short(),
            c.hostname,
            c.time.format("%Y-%m-%d %H:%M:%S"),
            c.snapshot.short()
        );
    }
    ctx.info(format!(
        "{} copied, {} there already{}; {} new blobs, {} stored",
        report.copied.len(),
        report.skipped.len(),
        if report.rechunked { " (re-chunked: the chunker parameters differ)" } else { "" },
        report.blobs_new,
        human_bytes(report.bytes_stored)
    ));
    Ok(ExitCode::SUCCESS)
}
