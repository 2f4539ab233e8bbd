//! `backup`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chunkvault::backup::{
    backup, dry_run, parse_size, patterns_from_file, scan, BackupOptions, BackupProgress, ExcludeOptions, ParentChoice,
    ScanProgress,
};

use crate::ctx::{human_bytes, CliError, Ctx};
use crate::{exit, CmdResult};

#[derive(clap::Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up.
    #[arg(required_unless_present_any = ["files_from", "files_from_verbatim"])]
    pub paths: Vec<PathBuf>,
    /// Also back up the paths listed in FILE, one a line; empty lines and
    /// lines starting with `#` are skipped, surrounding spaces trimmed (repeatable).
    #[arg(long, value_name = "FILE")]
    pub files_from: Vec<PathBuf>,
    /// Also back up the paths in FILE taken verbatim: separated by NUL
    /// bytes (`find -print0`), or by newlines when FILE has no NUL (repeatable).
    #[arg(long, value_name = "FILE", alias = "files-from-raw")]
    pub files_from_verbatim: Vec<PathBuf>,
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
    /// Leave out paths matching PATTERN (repeatable): `*` within a path
    /// component, `**` across them, a leading `/` anchors at the root, a
    /// leading `!` re-includes; the last matching pattern decides.
    #[arg(short = 'e', long = "exclude", value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Like --exclude, ignoring case (repeatable).
    #[arg(long = "iexclude", value_name = "PATTERN")]
    pub iexclude: Vec<String>,
    /// Read --exclude patterns from FILE, one a line; `#` starts a comment (repeatable).
    #[arg(long = "exclude-file", value_name = "FILE")]
    pub exclude_file: Vec<PathBuf>,
    /// Read --iexclude patterns from FILE (repeatable).
    #[arg(long = "iexclude-file", value_name = "FILE")]
    pub iexclude_file: Vec<PathBuf>,
    /// Leave out the contents of cache directories (marked by a CACHEDIR.TAG with the standard signature).
    #[arg(long)]
    pub exclude_caches: bool,
    /// Leave out the contents of directories holding a file NAME (`NAME:HEADER`: only if it starts with HEADER).
    #[arg(long = "exclude-if-present", value_name = "NAME[:HEADER]")]
    pub exclude_if_present: Vec<String>,
    /// Leave out files larger than SIZE (bytes, or with a k, m, g or t suffix).
    #[arg(long, value_name = "SIZE", value_parser = size_arg)]
    pub exclude_larger_than: Option<u64>,
    /// Do not cross into other filesystems (their mountpoints are kept, empty).
    #[arg(short = 'x', long)]
    pub one_file_system: bool,
    /// Show what would be stored (files and bytes new or changed); write nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// With --json: print a `{"message_type":"status",...}` line on stdout
    /// every second (total, done, percentage, ETA), then the result as one
    /// `"message_type":"summary"` line.
    #[arg(long, requires = "json")]
    pub status_lines: bool,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).ok_or_else(|| format!("{s:?}: expected a size such as 500, 100k, 2M or 1G"))
}

/// The exclude options of the flags, with the patterns of the exclude files.
fn exclude_options(a: &BackupArgs) -> Result<ExcludeOptions, CliError> {
    let read = |files: &[PathBuf], into: &mut Vec<String>| -> Result<(), CliError> {
        for f in files {
            into.extend(
                patterns_from_file(f).map_err(|e| CliError::Usage(format!("exclude file {}: {e}", f.display())))?,
            );
        }
        Ok(())
    };
    let mut opts = ExcludeOptions {
        patterns: a.exclude.clone(),
        ipatterns: a.iexclude.clone(),
        caches: a.exclude_caches,
        if_present: a.exclude_if_present.clone(),
        larger_than: a.exclude_larger_than,
        one_file_system: a.one_file_system,
    };
    read(&a.exclude_file, &mut opts.patterns)?;
    read(&a.iexclude_file, &mut opts.ipatterns)?;
    Ok(opts)
}

/// The paths of `--files-from` (text: comments, blank lines and surrounding
/// spaces dropped) or `--files-from-verbatim` (NUL- or newline-separated bytes).
fn paths_from_file(file: &Path, verbatim: bool) -> Result<Vec<PathBuf>, CliError> {
    let data = std::fs::read(file).map_err(|e| CliError::Usage(format!("--files-from {}: {e}", file.display())))?;
    let sep = if verbatim && data.contains(&0) { 0 } else { b'\n' };
    Ok(data
        .split(|&b| b == sep)
        .filter_map(|line| {
            if verbatim {
                return (!line.is_empty()).then_some(line);
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line).trim_ascii();
            (!line.is_empty() && !line.starts_with(b"#")).then_some(line)
        })
        .map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p)))
        .collect())
}

pub fn run(ctx: &Ctx, mut a: BackupArgs) -> CmdResult {
    let exclude = exclude_options(&a)?;
    for f in &a.files_from {
        a.paths.extend(paths_from_file(f, false)?);
    }
    for f in &a.files_from_verbatim {
        a.paths.extend(paths_from_file(f, true)?);
    }
    if a.paths.is_empty() {
        return Err(CliError::Usage("no paths to back up: the --files-from files list none".into()));
    }
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
        exclude,
        ..BackupOptions::default()
    };
    let progress = Arc::new(BackupProgress::default());
    // The total for the bar and the ETA: counted beside the backup, as restic does.
    let scanned = Arc::new(ScanProgress::default());
    {
        let (paths, exclude, scanned) = (a.paths.clone(), opts.exclude.clone(), scanned.clone());
        std::thread::spawn(move || scan(&paths, &exclude, &scanned));
    }
    let (shown, total) = (progress.clone(), scanned.clone());
    let bar = ctx.progress(Some(0), move |bar| {
        let stored =
            shown.packer.lock().expect("progress lock").as_ref().map_or(0, |s| s.bytes_stored.load(Ordering::Relaxed));
        bar.set_length(total.bytes.load(Ordering::Relaxed));
        bar.set_position(shown.bytes.load(Ordering::Relaxed));
        let files_total = total.files.load(Ordering::Relaxed);
        let counting = if total.done.load(Ordering::Relaxed) { "" } else { "+ (counting)" };
        bar.set_message(format!(
            "{}/{files_total}{counting} files, {} stored, {} errors",
            shown.files.load(Ordering::Relaxed),
            human_bytes(stored),
            shown.errors.load(Ordering::Relaxed)
        ));
    });
    let (shown, total, started) = (progress.clone(), scanned.clone(), std::time::Instant::now());
    let status = ctx.status_lines(a.status_lines, move || {
        let (done, all) = (shown.bytes.load(Ordering::Relaxed), total.bytes.load(Ordering::Relaxed));
        let counted = total.done.load(Ordering::Relaxed);
        let fraction = if all == 0 { 0.0 } else { (done as f64 / all as f64).min(1.0) };
        let elapsed = started.elapsed().as_secs_f64();
        let remaining = (counted && fraction > 0.0).then(|| elapsed / fraction - elapsed);
        serde_json::json!({
            "percent_done": fraction,
            "total_files": total.files.load(Ordering::Relaxed),
            "files_done": shown.files.load(Ordering::Relaxed),
            "total_bytes": all,
            "bytes_done": done,
            "scan_finished": counted,
            "error_count": shown.errors.load(Ordering::Relaxed),
            "seconds_elapsed": elapsed.round() as u64,
            "seconds_remaining": remaining.map(|r| r.round() as u64),
        })
    });
    if a.dry_run {
        let result = dry_run(&repo, &a.paths, &opts, &progress);
        drop((bar, status));
        return print_dry_run(ctx, result.map_err(CliError::from)?);
    }
    let result = backup(&repo, &a.paths, &opts, &progress);
    drop((bar, status));
    let done = result.map_err(CliError::from)?;
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let s = &done.snapshot.summary;
    if ctx.json() {
        ctx.print_result(
            serde_json::json!({
                "snapshot": done.id,
                "short_id": done.id.short(),
                "parent": done.snapshot.parent,
                "time": done.snapshot.time,
                "paths": done.snapshot.paths,
                "summary": s,
                "warnings": done.warnings,
            }),
            a.status_lines,
        );
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
    // The snapshot is written either way; a script learns it is incomplete.
    Ok(if done.is_complete() { ExitCode::SUCCESS } else { ExitCode::from(exit::INCOMPLETE) })
}

fn print_dry_run(ctx: &Ctx, done: chunkvault::backup::DryRunResult) -> CmdResult {
    for w in &done.warnings {
        eprintln!("warning: {w}");
    }
    let s = &done.snapshot.summary;
    if ctx.json() {
        ctx.print_json(&serde_json::json!({
            "dry_run": true,
            "parent": done.snapshot.parent,
            "paths": done.snapshot.paths,
            "summary": s,
            "warnings": done.warnings,
        }));
    } else {
        println!(
            "dry run, nothing written: files: {} new, {} changed, {} unmodified; {} dirs\n\
             would add {} ({} stored) in {} new blobs; {} total",
            s.files_new,
            s.files_changed,
            s.files_unmodified,
            s.dirs,
            human_bytes(s.bytes_new),
            human_bytes(s.bytes_stored),
            s.blobs_new,
            human_bytes(s.total_bytes),
        );
    }
    Ok(if done.warnings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(exit::INCOMPLETE) })
}
