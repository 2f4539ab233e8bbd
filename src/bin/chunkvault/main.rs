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

use ctx::{CacheArgs, CliError, Ctx, LockArgs, LogArgs, OutputArgs, RepoArgs};

/// Deduplicating, compressing, encrypting backups.
#[derive(Parser, Debug)]
#[command(name = "chunkvault", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Each command takes only the flag groups it uses (ctx.rs): `repo` where it
// opens a repository, `cache` where it reads one, `lock` where it waits for
// a lock, `out` (--json, -q, -v) where it prints a result, `log` (-q, -v)
// where it writes data to stdout.
#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new repository.
    Init {
        #[command(flatten)]
        args: cmd_repo::InitArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Back up files and directories into a new snapshot; prints its id.
    Backup {
        #[command(flatten)]
        args: cmd_backup::BackupArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List snapshots.
    Snapshots {
        #[command(flatten)]
        args: cmd_repo::SnapshotsArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// List the entries of a snapshot below PATH.
    Ls {
        #[command(flatten)]
        args: cmd_restore::LsArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Restore a snapshot (or parts of it) into a directory.
    Restore {
        #[command(flatten)]
        args: cmd_restore::RestoreArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Write one file of a snapshot to stdout.
    Cat {
        #[command(flatten)]
        args: cmd_restore::CatArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Verify the repository's structure, and with --read-data every byte.
    Check {
        #[command(flatten)]
        args: cmd_check::CheckArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Manage the passwords (key files) that open the repository.
    Key {
        #[command(subcommand)]
        command: cmd_repo::KeyCommand,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove snapshots by a retention policy (grouped by host and paths).
    Forget {
        #[command(flatten)]
        args: cmd_maint::ForgetArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Delete data no snapshot uses, repacking mostly-unused packs.
    Prune {
        #[command(flatten)]
        args: cmd_maint::PruneArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Remove stale locks (left by processes that died).
    Unlock {
        #[command(flatten)]
        args: cmd_maint::UnlockArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Rebuild the index, or rewrite damaged snapshots.
    Repair {
        #[command(subcommand)]
        command: cmd_maint::RepairCommand,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Sizes, counts, and deduplication and compression ratios.
    Stats {
        #[command(flatten)]
        args: cmd_inspect::StatsArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Add, remove or set tags of snapshots (rewrites their manifests).
    Tag {
        #[command(flatten)]
        args: cmd_maint::TagArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// What changed between two snapshots.
    Diff {
        #[command(flatten)]
        args: cmd_inspect::DiffArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Which snapshots hold paths matching patterns, with size and mtime.
    Find {
        #[command(flatten)]
        args: cmd_find::FindArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Write a file of a snapshot to stdout, or a directory as a tar or zip stream.
    Dump {
        #[command(flatten)]
        args: cmd_find::DumpArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Serve snapshots as a read-only filesystem (FUSE) until unmounted:
    /// snapshots/ID, hosts/HOST/ID, tags/TAG/ID, each with a `latest`.
    Mount {
        #[command(flatten)]
        args: cmd_mount::MountArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        log: LogArgs,
    },
    /// Copy snapshots from another repository into this one (re-encrypted;
    /// re-chunked when the chunker parameters differ); already copied ones are skipped.
    Copy {
        #[command(flatten)]
        args: cmd_copy::CopyArgs,
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        lock: LockArgs,
        #[command(flatten)]
        out: OutputArgs,
    },
    /// Run the HTTP server (device registry, tokens, storage). Boxed: its
    /// many flags would make every other command carry their size.
    Serve(Box<cmd_serve::ServeArgs>),
    /// Talk to a running server as its administrator.
    Admin(cmd_admin::AdminArgs),
    /// The device-side client of a server.
    Device(cmd_device::DeviceArgs),
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
    use Command as C;
    let (r, c, l) = (Some, Some, Some);
    match cli.command {
        C::Init { args, repo, out } => go(Ctx::new(r(repo), None, None, out), None, |x| cmd_repo::init(x, args)),
        C::Backup { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_backup::run(x, args))
        }
        C::Snapshots { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_repo::snapshots(x, args))
        }
        C::Ls { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_restore::ls(x, args))
        }
        C::Restore { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_restore::restore(x, args))
        }
        C::Cat { args, repo, cache, log } => {
            go(Ctx::new(r(repo), c(cache), None, log.into()), None, |x| cmd_restore::cat(x, args))
        }
        C::Check { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_check::run(x, args))
        }
        C::Key { command, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_repo::key(x, command))
        }
        C::Forget { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_maint::forget_cmd(x, args))
        }
        C::Prune { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_maint::prune_cmd(x, args))
        }
        C::Unlock { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_maint::unlock_cmd(x, args))
        }
        C::Repair { command, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_maint::repair_cmd(x, command))
        }
        C::Stats { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_inspect::stats_cmd(x, args))
        }
        C::Tag { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_maint::tag_cmd(x, args))
        }
        C::Diff { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_inspect::diff_cmd(x, args))
        }
        C::Find { args, repo, cache, out } => {
            go(Ctx::new(r(repo), c(cache), None, out), None, |x| cmd_find::find_cmd(x, args))
        }
        C::Dump { args, repo, cache, log } => {
            go(Ctx::new(r(repo), c(cache), None, log.into()), None, |x| cmd_find::dump_cmd(x, args))
        }
        C::Mount { args, repo, cache, log } => {
            go(Ctx::new(r(repo), c(cache), None, log.into()), None, |x| cmd_mount::mount_cmd(x, args))
        }
        C::Copy { args, repo, cache, lock, out } => {
            go(Ctx::new(r(repo), c(cache), l(lock), out), None, |x| cmd_copy::copy_cmd(x, args))
        }
        C::Serve(a) => {
            let format = Some(a.log_format);
            go(Ctx::new(None, None, None, a.verbose.clone().into()), format, |x| cmd_serve::run(x, *a))
        }
        C::Admin(a) => go(Ctx::new(None, None, None, a.out.clone()), None, |x| cmd_admin::run(x, a)),
        C::Device(a) => go(Ctx::new(None, None, None, a.out.clone()), None, |x| cmd_device::run(x, a.command)),
        C::Completion { shell } => go(Ctx::new(None, None, None, OutputArgs::default()), None, |_| {
            clap_complete::generate(shell, &mut Cli::command(), "chunkvault", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }),
        C::GenerateMan { dir } => go(Ctx::new(None, None, None, OutputArgs::default()), None, |_| generate_man(&dir)),
    }
}

/// Sets up the log, runs a command, and turns its error into an exit code.
fn go(ctx: Ctx, serve: Option<cmd_serve::LogFormat>, run: impl FnOnce(&Ctx) -> CmdResult) -> ExitCode {
    init_logging(ctx.quiet(), serve);
    match run(&ctx) {
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
fn init_logging(quiet: bool, serve: Option<cmd_serve::LogFormat>) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let default = match serve {
        Some(_) => "info",
        None if quiet => "error",
        // fuser warns when it finds its mount already gone (`fusermount3 -u`).
        None => "warn,fuser::session=error",
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
            for sub in cmd.get_subcommands() {
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
