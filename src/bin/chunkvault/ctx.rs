//! What every command shares: global flags, opening the repository, output,
//! progress and the mapping of errors to exit codes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chunkvault::backup::BackupError;
use chunkvault::lock::{LockError, LockOptions};
use chunkvault::prune::PruneError;
use chunkvault::repo::{self, RepoError, Repository};
use chunkvault::restore::RestoreError;
use indicatif::{ProgressBar, ProgressStyle};

use crate::exit;

#[derive(clap::Args, Debug)]
pub struct GlobalArgs {
    /// Repository location: a directory, or s3://bucket/prefix (see the README).
    #[arg(short = 'r', long, env = "CHUNKVAULT_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the password from this file (first line). Default: $CHUNKVAULT_PASSWORD, else a prompt.
    #[arg(long, env = "CHUNKVAULT_PASSWORD_FILE", global = true)]
    pub password_file: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress and no informational output on stderr.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Worker threads (default: one per core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// When the repository is locked (a prune running), retry for up to this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 0, global = true)]
    pub retry_lock: u64,
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
            | CliError::Prune(PruneError::Repo(e)) => (Some(e), None),
            CliError::Lock(e) | CliError::Backup(BackupError::Lock(e)) | CliError::Prune(PruneError::Lock(e)) => {
                (None, Some(e))
            }
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
    pub args: GlobalArgs,
    show_progress: bool,
}

impl Ctx {
    pub fn new(args: GlobalArgs) -> Ctx {
        if let Some(n) = args.threads {
            let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
        }
        let show_progress = !args.quiet && std::io::stderr().is_terminal();
        Ctx { args, show_progress }
    }

    pub fn repo_location(&self) -> Result<&str, CliError> {
        self.args
            .repo
            .as_deref()
            .ok_or_else(|| CliError::Usage("no repository given: use --repo or set CHUNKVAULT_REPO".into()))
    }

    /// The password from --password-file, $CHUNKVAULT_PASSWORD, or a prompt.
    pub fn password(&self, prompt: &str) -> Result<Vec<u8>, CliError> {
        password_from(self.args.password_file.as_ref(), "CHUNKVAULT_PASSWORD", prompt)
    }

    pub fn open(&self) -> Result<Repository, CliError> {
        let location = self.repo_location()?;
        let backend = repo::open_backend(location, false)?;
        let password = self.password("repository password: ")?;
        Ok(Repository::open(backend, &password)?)
    }

    /// Lock timing with the wait that --retry-lock asks for.
    pub fn lock_options(&self) -> LockOptions {
        LockOptions { wait: Duration::from_secs(self.args.retry_lock), ..LockOptions::default() }
    }

    /// Informational text on stderr, unless --quiet or --json.
    pub fn info(&self, msg: impl AsRef<str>) {
        if !self.args.quiet && !self.args.json {
            eprintln!("{}", msg.as_ref());
        }
    }

    pub fn print_json(&self, value: &impl serde::Serialize) {
        println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
    }

    pub fn print_error(&self, e: &CliError) {
        if self.args.json {
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
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {msg}",
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

/// Reads a password from a file, an environment variable, or the terminal.
pub fn password_from(file: Option<&PathBuf>, env: &str, prompt: &str) -> Result<Vec<u8>, CliError> {
    if let Some(f) = file {
        let text =
            std::fs::read(f).map_err(|e| CliError::Other(format!("reading password file {}: {e}", f.display())))?;
        let line = text.split(|&b| b == b'\n').next().unwrap_or_default();
        return Ok(line.strip_suffix(b"\r").unwrap_or(line).to_vec());
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
