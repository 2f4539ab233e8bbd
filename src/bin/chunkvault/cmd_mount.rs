//! `mount`: snapshots as a read-only FUSE filesystem until unmounted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use chunkvault::mount::{mount, MountOptions, SnapshotFs, DEFAULT_CACHE_BYTES};

use crate::ctx::{CliError, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// An existing empty directory to mount the repository on.
    pub mountpoint: PathBuf,
    /// Let other users see the filesystem (FUSE's allow_other; the stored
    /// modes then decide who reads what; a non-root user needs
    /// `user_allow_other` in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Bytes of decrypted chunks kept in memory for reads (e.g. 256M).
    #[arg(long, value_name = "SIZE", default_value_t = format!("{}M", DEFAULT_CACHE_BYTES >> 20))]
    pub cache_size: String,
    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn mount_cmd(ctx: &Ctx, a: MountArgs) -> CmdResult {
    let cache_bytes = chunkvault::backup::parse_size(&a.cache_size)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| CliError::Usage(format!("--cache-size {:?}: expected a size such as 64M", a.cache_size)))?;
    if !a.mountpoint.is_dir() {
        return Err(CliError::Usage(format!("{}: not a directory", a.mountpoint.display())));
    }
    let opts =
        MountOptions { filter: a.filter.filter(), cache_bytes, allow_other: a.allow_other, ..Default::default() };
    let repo = Arc::new(ctx.open()?);
    let fs = SnapshotFs::new(repo, &opts)?;
    // The signal handlers are in place before the mount exists, so a
    // SIGINT or SIGTERM always unmounts.
    let mut signals = Signals::new()?;
    let mounted = mount(fs, &a.mountpoint, &opts)?;
    let unmounter = mounted.unmounter();
    let shown = a.mountpoint.display().to_string();
    ctx.info(format!(
        "mounted at {shown}: snapshots/, hosts/, tags/ (read-only); Ctrl-C or `fusermount3 -u {shown}` unmounts"
    ));
    std::thread::spawn(move || {
        while signals.next() {
            match unmounter.unmount() {
                Ok(()) => break,
                Err(e) => eprintln!("chunkvault: {e}"),
            }
        }
    });
    mounted.wait()?;
    ctx.info(format!("unmounted {shown}"));
    Ok(ExitCode::SUCCESS)
}

/// SIGINT and SIGTERM, through tokio's handlers on a runtime of their own.
struct Signals {
    rt: tokio::runtime::Runtime,
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, CliError> {
        use tokio::signal::unix::{signal, SignalKind};
        let err = |e: std::io::Error| CliError::Other(format!("installing signal handlers: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(err)?;
        let (int, term) = rt
            .block_on(async {
                Ok::<_, std::io::Error>((signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?))
            })
            .map_err(err)?;
        Ok(Signals { rt, int, term })
    }

    /// Waits for the next signal; `false` if none can come any more.
    fn next(&mut self) -> bool {
        let (int, term) = (&mut self.int, &mut self.term);
        self.rt.block_on(async {
            tokio::select! {
                s = int.recv() => s.is_some(),
                s = term.recv() => s.is_some(),
            }
        })
    }
}
