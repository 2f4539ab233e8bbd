//! The chunkvault command-line tool: a thin layer over the library.

mod cmd_admin;
mod cmd_backup;
mod cmd_check;
mod cmd_device;
mod cmd_inspect;
mod cmd_maint;
mod cmd_repo;
mod cmd_restore;
mod cmd_serve;
mod ctx;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use ctx::{CliError, Ctx, GlobalArgs};

/// Deduplicating, compressing, encrypting backups.
#[derive(Parser, Debug)]
#[command(name = "chunkvault", version, about, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository.
    Init(cmd_repo::InitArgs),
    /// Back up files and directories into a new snapshot; prints its id.
    Backup(cmd_backup::BackupArgs),
    /// List snapshots.
    Snapshots,
    /// List the entries of a snapshot below PATH.
    Ls(cmd_restore::LsArgs),
    /// Restore a snapshot (or parts of it) into a directory.
    Restore(cmd_restore::RestoreArgs),
    /// Write one file of a snapshot to stdout.
    Cat(cmd_restore::CatArgs),
    /// Verify the repository's structure, and with --read-data every byte.
    Check(cmd_check::CheckArgs),
    /// Manage the passwords (key files) that open the repository.
    #[command(subcommand)]
    Key(cmd_repo::KeyCommand),
    /// Remove snapshots by a retention policy (grouped by host and paths).
    Forget(cmd_maint::ForgetArgs),
    /// Delete data no snapshot uses, repacking mostly-unused packs.
    Prune(cmd_maint::PruneArgs),
    /// Remove stale locks (left by processes that died).
    Unlock(cmd_maint::UnlockArgs),
    /// Rebuild the index, or rewrite damaged snapshots.
    #[command(subcommand)]
    Repair(cmd_maint::RepairCommand),
    /// Sizes, counts, and deduplication and compression ratios.
    Stats,
    /// What changed between two snapshots.
    Diff(cmd_inspect::DiffArgs),
    /// Run the HTTP server (device registry, tokens, storage). Boxed: its
    /// many flags would make every other command carry their size.
    Serve(Box<cmd_serve::ServeArgs>),
    /// Talk to a running server as its administrator.
    Admin(cmd_admin::AdminArgs),
    /// The device-side client of a server.
    #[command(subcommand)]
    Device(cmd_device::DeviceCommand),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(&cli);
    let ctx = Ctx::new(cli.global);
    let result = match cli.command {
        Command::Init(a) => cmd_repo::init(&ctx, a),
        Command::Backup(a) => cmd_backup::run(&ctx, a),
        Command::Snapshots => cmd_repo::snapshots(&ctx),
        Command::Ls(a) => cmd_restore::ls(&ctx, a),
        Command::Restore(a) => cmd_restore::restore(&ctx, a),
        Command::Cat(a) => cmd_restore::cat(&ctx, a),
        Command::Check(a) => cmd_check::run(&ctx, a),
        Command::Key(k) => cmd_repo::key(&ctx, k),
        Command::Forget(a) => cmd_maint::forget_cmd(&ctx, a),
        Command::Prune(a) => cmd_maint::prune_cmd(&ctx, a),
        Command::Unlock(a) => cmd_maint::unlock_cmd(&ctx, a),
        Command::Repair(c) => cmd_maint::repair_cmd(&ctx, c),
        Command::Stats => cmd_inspect::stats_cmd(&ctx),
        Command::Diff(a) => cmd_inspect::diff_cmd(&ctx, a),
        Command::Serve(a) => cmd_serve::run(&ctx, *a),
        Command::Admin(a) => cmd_admin::run(&ctx, a),
        Command::Device(d) => cmd_device::run(&ctx, d),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let code = e.exit_code();
            ctx.print_error(&e);
            ExitCode::from(code)
        }
    }
}

/// Logs go to stderr, filtered by `CHUNKVAULT_LOG` (an `EnvFilter`), in
/// colour only on a terminal. A command's log is terse: warnings (errors
/// with --quiet), no timestamps. The server's is an operator's record:
/// `info` and up (one access line per request), always with timestamps,
/// as text or one JSON object a line (`serve --log-format`).
fn init_logging(cli: &Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let serve = match &cli.command {
        Command::Serve(a) => Some(a.log_format),
        _ => None,
    };
    let default = match serve {
        Some(_) => "info",
        None if cli.global.quiet => "error",
        None => "warn",
    };
    let filter = EnvFilter::try_from_env("CHUNKVAULT_LOG").unwrap_or_else(|_| default.into());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match serve {
        None => fmt.without_time().init(),
        Some(cmd_serve::LogFormat::Text) => fmt.init(),
        Some(cmd_serve::LogFormat::Json) => fmt.json().flatten_event(true).init(),
    }
}

/// Exit codes: restic's, plus the damage code SPEC.md fixes. Errors become
/// codes only in [`CliError::exit_code`]; commands that finish with a
/// partial result return [`DAMAGE`](exit::DAMAGE) or
/// [`INCOMPLETE`](exit::INCOMPLETE) themselves.
pub mod exit {
    /// Any other error.
    pub const ERROR: u8 = 1;
    /// Bad flags or arguments (also a bad exclude pattern or size).
    pub const USAGE: u8 = 2;
    /// Damaged data found by `check`, or met by `restore`/`cat`.
    pub const DAMAGE: u8 = 3;
    /// A backup left out entries it could not read; its snapshot is written.
    /// The same number as [`DAMAGE`], as in restic: both mean "done, but
    /// not everything is there".
    pub const INCOMPLETE: u8 = 3;
    /// No repository at the given location.
    pub const NO_REPOSITORY: u8 = 10;
    /// The repository is locked by another process.
    pub const LOCKED: u8 = 11;
    /// No key of the repository opens with the password.
    pub const WRONG_PASSWORD: u8 = 12;
}

pub(crate) type CmdResult = Result<ExitCode, CliError>;
