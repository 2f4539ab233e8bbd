//! The chunkvault command-line tool: a thin layer over the library.

mod cmd_admin;
mod cmd_backup;
mod cmd_check;
mod cmd_copy;
mod cmd_device;
mod cmd_find;
mod cmd_inspect;
mod cmd_maint;
mod cmd_mount;
mod cmd_repo;
mod cmd_restore;
mod cmd_serve;
mod ctx;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

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
    Snapshots(cmd_repo::SnapshotsArgs),
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
    Stats(cmd_inspect::StatsArgs),
    /// Add, remove or set tags of snapshots (rewrites their manifests).
    Tag(cmd_maint::TagArgs),
    /// What changed between two snapshots.
    Diff(cmd_inspect::DiffArgs),
    /// Which snapshots hold paths matching patterns, with size and mtime.
    Find(cmd_find::FindArgs),
    /// Write a file of a snapshot to stdout, or a directory as a tar or zip stream.
    Dump(cmd_find::DumpArgs),
    /// Serve snapshots as a read-only filesystem (FUSE) until unmounted:
    /// snapshots/ID, hosts/HOST/ID, tags/TAG/ID, each with a `latest`.
    Mount(cmd_mount::MountArgs),
    /// Copy snapshots from another repository into this one (re-encrypted;
    /// re-chunked when the chunker parameters differ); already copied ones are skipped.
    Copy(cmd_copy::CopyArgs),
    /// Run the HTTP server (device registry, tokens, storage). Boxed: its
    /// many flags would make every other command carry their size.
    Serve(Box<cmd_serve::ServeArgs>),
    /// Talk to a running server as its administrator.
    Admin(cmd_admin::AdminArgs),
    /// The device-side client of a server.
    #[command(subcommand)]
    Device(cmd_device::DeviceCommand),
    /// Print a shell completion script (e.g. `chunkvault completion bash > /etc/bash_completion.d/chunkvault`).
    Completion {
        /// The shell to complete in.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (chunkvault.1 and one per command) into DIR.
    #[command(hide = true)]
    GenerateMan {
        /// Directory to write the pages into (created if missing), e.g. target/man.
        dir: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Flags that reach the library through its environment variables:
    // set before any thread starts.
    if let Some(dir) = &cli.global.cache_dir {
        std::env::set_var("CHUNKVAULT_CACHE_DIR", dir);
    }
    if cli.global.no_cache {
        std::env::set_var(chunkvault::cache::NO_CACHE_ENV, "1");
    }
    if cli.global.verbose > 0 && std::env::var_os("CHUNKVAULT_LOG").is_none() {
        let level = ["info", "debug", "trace"][usize::from(cli.global.verbose.min(3)) - 1];
        std::env::set_var("CHUNKVAULT_LOG", format!("chunkvault={level}"));
    }
    init_logging(&cli);
    let ctx = Ctx::new(cli.global);
    let result = match cli.command {
        Command::Init(a) => cmd_repo::init(&ctx, a),
        Command::Backup(a) => cmd_backup::run(&ctx, a),
        Command::Snapshots(a) => cmd_repo::snapshots(&ctx, a),
        Command::Ls(a) => cmd_restore::ls(&ctx, a),
        Command::Restore(a) => cmd_restore::restore(&ctx, a),
        Command::Cat(a) => cmd_restore::cat(&ctx, a),
        Command::Check(a) => cmd_check::run(&ctx, a),
        Command::Key(k) => cmd_repo::key(&ctx, k),
        Command::Forget(a) => cmd_maint::forget_cmd(&ctx, a),
        Command::Prune(a) => cmd_maint::prune_cmd(&ctx, a),
        Command::Unlock(a) => cmd_maint::unlock_cmd(&ctx, a),
        Command::Repair(c) => cmd_maint::repair_cmd(&ctx, c),
        Command::Stats(a) => cmd_inspect::stats_cmd(&ctx, a),
        Command::Tag(a) => cmd_maint::tag_cmd(&ctx, a),
        Command::Diff(a) => cmd_inspect::diff_cmd(&ctx, a),
        Command::Find(a) => cmd_find::find_cmd(&ctx, a),
        Command::Dump(a) => cmd_find::dump_cmd(&ctx, a),
        Command::Mount(a) => cmd_mount::mount_cmd(&ctx, a),
        Command::Copy(a) => cmd_copy::copy_cmd(&ctx, a),
        Command::Serve(a) => cmd_serve::run(&ctx, *a),
        Command::Admin(a) => cmd_admin::run(&ctx, a),
        Command::Device(d) => cmd_device::run(&ctx, d),
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "chunkvault", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateMan { dir } => generate_man(&dir),
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

/// Writes `chunkvault.1` and `chunkvault-COMMAND.1` for every visible
/// command (and nested ones, e.g. `chunkvault-key-add.1`) into `dir`.
fn generate_man(dir: &std::path::Path) -> CmdResult {
    std::fs::create_dir_all(dir)
        .and_then(|()| clap_mangen::generate_to(Cli::command(), dir))
        .map_err(|e| CliError::Other(format!("{}: {e}", dir.display())))?;
    Ok(ExitCode::SUCCESS)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every argument of every command says what it is for (`--help` and
    /// the man pages show it).
    #[test]
    fn every_argument_has_help_text() {
        fn visit(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                if arg.get_help().is_none() && !matches!(id, "help" | "version") {
                    missing.push(format!("{path} {id}"));
                }
            }
            // Left out: `serve` and `admin` (cmd_serve.rs, cmd_admin.rs),
            // some of whose flags have no help text yet.
            for sub in cmd.get_subcommands().filter(|s| !matches!(s.get_name(), "serve" | "admin")) {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (the command)", sub.get_name()));
                }
                visit(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        visit(&cmd, "chunkvault", &mut missing);
        assert!(missing.is_empty(), "arguments without help text:\n{}", missing.join("\n"));
    }
}
