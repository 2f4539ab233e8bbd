//! What every command shares: global flags, opening the repository, output,
//! progress and the mapping of errors to exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chunkvault::backup::BackupError;
use chunkvault::lock::{LockError, LockOptions};
use chunkvault::mount::MountError;
use chunkvault::prune::PruneError;
use chunkvault::repo::{self, RepoError, Repository};
use chunkvault::restore::RestoreError;
use chunkvault::select::{SelectError, SnapshotFilter};
use indicatif::{ProgressBar, ProgressStyle};

use crate::exit;

// Each command takes only the flags it uses: the groups below are
// flattened into the commands they apply to (main.rs). `global = true`
// carries a group from a command to its subcommands (`key add`, `repair
// index`, `admin devices`), never to other commands.

/// Where the repository is and its password: commands that open one.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Repository")]
pub struct RepoArgs {
    /// Repository location: a directory, or s3://bucket/prefix (see the README).
    #[arg(short = 'r', long, env = "CHUNKVAULT_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the password from this file (first line). Default: $CHUNKVAULT_PASSWORD, else a prompt.
    #[arg(long, env = "CHUNKVAULT_PASSWORD_FILE", value_name = "FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Run CMD with `sh -c` and use the first line it prints as the password
    /// (e.g. `pass show backup`); a failing command is an error.
    #[arg(
        long,
        env = "CHUNKVAULT_PASSWORD_COMMAND",
        value_name = "CMD",
        global = true,
        conflicts_with = "password_file"
    )]
    pub password_command: Option<String>,
}

/// The local cache of a remote repository and the worker threads:
/// commands that read a repository.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Repository")]
pub struct CacheArgs {
    /// Keep the local cache of remote repositories' objects in DIR
    /// (default: $XDG_CACHE_HOME/chunkvault or ~/.cache/chunkvault).
    #[arg(long, env = "CHUNKVAULT_CACHE_DIR", value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Use no local cache (every object is read from the repository).
    #[arg(long, global = true, conflicts_with = "cache_dir")]
    pub no_cache: bool,
    /// Worker threads (default: one per core).
    #[arg(long, value_name = "N", global = true)]
    pub threads: Option<usize>,
}

/// Waiting for a lock: commands that take one.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Repository")]
pub struct LockArgs {
    /// When the repository is locked (a prune running), retry for up to this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0, global = true)]
    pub retry_lock: u64,
}

/// The level of the log on stderr.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Output")]
pub struct VerboseArgs {
    /// More detail on stderr: -v informational log lines, -vv debug, -vvv trace.
    #[arg(short = 'v', long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// Progress and messages on stderr: commands that write data to stdout.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Output")]
pub struct LogArgs {
    /// No progress and no informational output on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(flatten)]
    pub verbose: VerboseArgs,
}

/// Text or JSON results, and stderr: commands that print a result.
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "Output")]
pub struct OutputArgs {
    /// Print one JSON document on stdout instead of text (and errors as JSON on stderr).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub log: LogArgs,
}

impl From<LogArgs> for OutputArgs {
    fn from(log: LogArgs) -> Self {
        OutputArgs { json: false, log }
    }
}

impl From<VerboseArgs> for OutputArgs {
    fn from(verbose: VerboseArgs) -> Self {
        OutputArgs { json: false, log: LogArgs { quiet: false, verbose } }
    }
}

/// `--host`, `--tag` and `--path`: which snapshots a command considers,
/// and which one `latest` is.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct FilterArgs {
    /// Only snapshots of this host (repeatable: any of them).
    #[arg(long = "host", value_name = "HOST")]
    pub hosts: Vec<String>,
    /// Only snapshots carrying these tags (comma-separated: all of them;
    /// repeatable: any one of the sets).
    #[arg(long = "tag", value_name = "TAG[,TAG...]")]
    pub tags: Vec<String>,
    /// Only snapshots whose paths include this absolute path (repeatable: all of them).
    #[arg(long = "path", value_name = "PATH")]
    pub paths: Vec<String>,
}

impl FilterArgs {
    /// The library's filter of these flags.
    pub fn filter(&self) -> SnapshotFilter {
        SnapshotFilter {
            hosts: self.hosts.clone(),
            tags: self
                .tags
                .iter()
                .map(|set| set.split(',').filter(|t| !t.is_empty()).map(str::to_owned).collect())
                .collect(),
            paths: self.paths.clone(),
        }
    }
}

/// A command's failure, classified for the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error(transparent)]
    Prune(#[from] PruneError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Mount(#[from] MountError),
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The one place errors become exit codes (see [`exit`]).
    pub fn exit_code(&self) -> u8 {
        let (repo_err, lock_err) = match self {
            CliError::Usage(_) => return exit::USAGE,
            CliError::Backup(BackupError::Exclude(_)) => return exit::USAGE,
            CliError::Prune(PruneError::Damaged(_)) => return exit::DAMAGE,
            CliError::Repo(e)
            | CliError::Backup(BackupError::Repo(e))
            | CliError::Restore(RestoreError::Repo(e))
            | CliError::Prune(PruneError::Repo(e))
            | CliError::Select(SelectError::Repo(e))
            | CliError::Mount(MountError::Repo(e)) => (Some(e), None),
            CliError::Lock(e)
            | CliError::Backup(BackupError::Lock(e))
            | CliError::Prune(PruneError::Lock(e))
            | CliError::Select(SelectError::Lock(e)) => (None, Some(e)),
            _ => (None, None),
        };
        match (repo_err, lock_err) {
            (Some(RepoError::NotARepository(_)), _) => exit::NO_REPOSITORY,
            (Some(RepoError::WrongPassword), _) => exit::WRONG_PASSWORD,
            (Some(e), _) if e.is_damage() => exit::DAMAGE,
            (_, Some(LockError::Locked(_))) => exit::LOCKED,
            _ => exit::ERROR,
        }
    }

    /// The exit code's name in `--json` error documents.
    pub fn kind(&self) -> &'static str {
        match self.exit_code() {
            exit::USAGE => "usage",
            exit::DAMAGE => "damage",
            exit::NO_REPOSITORY => "no_repository",
            exit::LOCKED => "locked",
            exit::WRONG_PASSWORD => "wrong_password",
            _ => "error",
        }
    }
}

pub struct Ctx {
    repo: Option<RepoArgs>,
    lock: LockArgs,
    out: OutputArgs,
    show_progress: bool,
}

impl Ctx {
    /// The context of a command from the flag groups it takes. Flags that
    /// reach the library through its environment variables are set here,
    /// before any thread starts.
    pub fn new(repo: Option<RepoArgs>, cache: Option<CacheArgs>, lock: Option<LockArgs>, out: OutputArgs) -> Ctx {
        let cache = cache.unwrap_or_default();
        if let Some(dir) = &cache.cache_dir {
            std::env::set_var("CHUNKVAULT_CACHE_DIR", dir);
        }
        if cache.no_cache {
            std::env::set_var(chunkvault::cache::NO_CACHE_ENV, "1");
        }
        let verbose = out.log.verbose.verbose;
        if verbose > 0 && std::env::var_os("CHUNKVAULT_LOG").is_none() {
            let level = ["info", "debug", "trace"][usize::from(verbose.min(3)) - 1];
            std::env::set_var("CHUNKVAULT_LOG", format!("chunkvault={level}"));
        }
        if let Some(n) = cache.threads {
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
        }
        let show_progress = !out.log.quiet && std::io::stderr().is_terminal();
        Ctx { repo, lock: lock.unwrap_or_default(), out, show_progress }
    }

    /// `--json`: results as one JSON document.
    pub fn json(&self) -> bool {
        self.out.json
    }

    /// `--quiet`: no progress or informational output.
    pub fn quiet(&self) -> bool {
        self.out.log.quiet
    }

    fn repo_args(&self) -> &RepoArgs {
        self.repo.as_ref().expect("a command that opens a repository takes the repository flags")
    }

    pub fn repo_location(&self) -> Result<&str, CliError> {
        self.repo_args()
            .repo
            .as_deref()
            .ok_or_else(|| CliError::Usage("no repository given: use --repo or set CHUNKVAULT_REPO".into()))
    }

    /// The password from --password-file, --password-command,
    /// $CHUNKVAULT_PASSWORD, or a prompt.
    pub fn password(&self, prompt: &str) -> Result<Vec<u8>, CliError> {
        let a = self.repo_args();
        password_of(a.password_file.as_ref(), a.password_command.as_deref(), "CHUNKVAULT_PASSWORD", prompt)
    }

    pub fn open(&self) -> Result<Repository, CliError> {
        let location = self.repo_location()?;
        let backend = repo::open_backend(location, false)?;
        let password = self.password("repository password: ")?;
        Ok(Repository::open(backend, &password)?)
    }

    /// Lock timing with the wait that --retry-lock asks for.
    pub fn lock_options(&self) -> LockOptions {
        LockOptions { wait: Duration::from_secs(self.lock.retry_lock), ..LockOptions::default() }
    }

    /// Informational text on stderr, unless --quiet or --json.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.quiet() && !self.json() {
            eprintln!("{}", msg.as_ref());
        }
    }

    pub fn print_json(&self, value: &impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
    }

    pub fn print_error(&self, e: &CliError) {
        if self.json() {
            eprintln!("{}", serde_json::json!({"error": e.kind(), "message": e.to_string()}));
        } else {
            eprintln!("chunkvault: error: {e}");
        }
    }

    /// A progress display on stderr that redraws from `render` until the
    /// returned guard is dropped; nothing when stderr is not a terminal.
    pub fn progress(&self, total: Option<u64>, render: impl Fn(&ProgressBar) + Send + 'static) -> Progress {
        if !self.show_progress {
            return Progress { bar: None, stop: Arc::new(AtomicBool::new(false)), thread: None };
        }
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {percent}% ETA {eta} {bytes_per_sec} {msg}",
                )
                .expect("template"),
            ),
            None => ProgressBar::new_spinner()
                .with_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}").expect("template")),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (b, s) = (bar.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                render(&b);
                b.tick();
                std::thread::sleep(Duration::from_millis(150));
            }
        });
        Progress { bar: Some(bar), stop, thread: Some(thread) }
    }
}

impl Ctx {
    /// With `enabled` (`--json --status-lines`): a `{"message_type":
    /// "status", ...}` line on stdout from `status` every second until the
    /// guard drops, for front ends that read stdout line by line.
    pub fn status_lines(&self, enabled: bool, status: impl Fn() -> serde_json::Value + Send + 'static) -> Progress {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled || !self.json() {
            return Progress { bar: None, stop, thread: None };
        }
        let s = stop.clone();
        let thread = std::thread::spawn(move || loop {
            let mut line = status();
            line["message_type"] = "status".into();
            println!("{line}");
            // A second in small steps, so dropping the guard returns at once.
            for _ in 0..10 {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Progress { bar: None, stop, thread: Some(thread) }
    }

    /// The result document: pretty, or with status lines one compact
    /// `"message_type": "summary"` line after them.
    pub fn print_result(&self, mut value: serde_json::Value, status_lines: bool) {
        if status_lines {
            value["message_type"] = "summary".into();
            println!("{value}");
        } else {
            self.print_json(&value);
        }
    }
}

/// Stops and clears a progress display when dropped.
pub struct Progress {
    bar: Option<ProgressBar>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A password from a file, else a command, else the environment variable
/// `env`, else a prompt.
pub fn password_of(
    file: Option<&PathBuf>,
    command: Option<&str>,
    env: &str,
    prompt: &str,
) -> Result<Vec<u8>, CliError> {
    match (file, command) {
        (None, Some(cmd)) => password_from_command(cmd),
        _ => password_from(file, env, prompt),
    }
}

/// The first line a command prints (its stderr goes to ours, so it may prompt).
fn password_from_command(cmd: &str) -> Result<Vec<u8>, CliError> {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| CliError::Other(format!("running --password-command: {e}")))?;
    if !out.status.success() {
        return Err(CliError::Other(format!("--password-command failed ({})", out.status)));
    }
    Ok(first_line(&out.stdout).to_vec())
}

/// The bytes before the first newline, without a trailing carriage return.
fn first_line(text: &[u8]) -> &[u8] {
    let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads a password from a file, an environment variable, or the terminal.
pub fn password_from(file: Option<&PathBuf>, env: &str, prompt: &str) -> Result<Vec<u8>, CliError> {
    if let Some(f) = file {
        let text =
            std::fs::read(f).map_err(|e| CliError::Other(format!("reading password file {}: {e}", f.display())))?;
        return Ok(first_line(&text).to_vec());
    }
    if let Some(p) = std::env::var_os(env) {
        return Ok(std::os::unix::ffi::OsStringExt::into_vec(p));
    }
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(prompt)
            .map(String::into_bytes)
            .map_err(|e| CliError::Other(format!("reading password: {e}")));
    }
    Err(CliError::Usage(format!("no password: set {env} or use --password-file")))
}

/// Human-readable byte counts.
pub fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
