//! `backup`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chunkvault::backup::{backup, BackupOptions, BackupProgress, ParentChoice};

use crate::ctx::{human_bytes, CliError, Ctx};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Tag the snapshot (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Host name to record instead of this machine's.
    #[arg(long)]
    pub host: Option<String>,
    /// Compare against this snapshot instead of the latest of the same host and paths.
    #[arg(long, conflicts_with = "force")]
    pub parent: Option<String>,
    /// Read every file, ignoring the parent snapshot.
    #[arg(long)]
    pub force: bool,
}

pub fn run(ctx: &Ctx, a: BackupArgs) -> CmdResult {
    let repo = ctx.open()?;
    let parent = if a.force {
        ParentChoice::None
    } else if let Some(p) = &a.parent {
        ParentChoice::Snapshot(repo.find_snapshot(p)?.0)
    } else {
        ParentChoice::Auto
    };
    let opts = BackupOptions {
        tags: a.tags,
        hostname: a.host,
        parent,
        uploaders: 2,
        lock: ctx.lock_options(),
        ..BackupOptions::default()
    };
    let progress = Arc::new(BackupProgress::default());
    let shown = progress.clone();
    let bar = ctx.progress(None, move |bar| {
        let stored =
            shown.packer.lock().expect("progress lock").as_ref().map_or(0, |s| s.bytes_stored.load(Ordering::Relaxed));
        bar.set_message(format!(
            "{} files, {} processed, {} stored, {} errors",
            shown.files.load(Ordering::Relaxed),
            human_bytes(shown.bytes.load(Ordering::Relaxed)),
            human_bytes(stored),
            shown.errors.load(Ordering::Relaxed)
        ));
    });
    let result = backup(&repo, &a.paths, &opts, &progress);
    drop(bar);
    let done = result.map_err(CliError::from)?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let s = &done.snapshot.summary;
    if ctx.args.json {
        ctx.print_json(&serde_json::json!({
            "snapshot": done.id,
            "short_id": done.id.short(),
            "parent": done.snapshot.parent,
            "time": done.snapshot.time,
            "paths": done.snapshot.paths,
            "summary": s,
            "warnings": done.warnings,
        }));
    } else {
        ctx.info(format!(
            "files: {} new, {} changed, {} unmodified; {} dirs\nadded {} ({} stored) in {} new blobs; {} total in {:.1}s",
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.dirs,
            human_bytes(s.bytes_new),
            human_bytes(s.bytes_stored),
            s.blobs_new,
            human_bytes(s.total_bytes),
            s.duration_secs
        ));
        if !done.warnings.is_empty() {
            ctx.info(format!("{} entries could not be read and are not in the snapshot", done.warnings.len()));
        }
        println!("{}", done.id);
    }
    Ok(ExitCode::SUCCESS)
}
