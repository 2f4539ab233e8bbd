//! `restore`, `ls` and `cat`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chunkvault::id::BlobId;
use chunkvault::repo::Repository;
use chunkvault::restore::{self, Overwrite, RestoreOptions, RestoreProgress};
use chunkvault::select;
use chunkvault::tree::{Node, NodeKind};

use crate::ctx::{human_bytes, CliError, Ctx, FilterArgs};
use crate::{exit, CmdResult};

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id, unique id prefix, or `latest`.
    pub snapshot: String,
    /// Directory to restore into (created if missing).
    #[arg(long)]
    pub target: PathBuf,
    /// Restore only this path of the snapshot and what lies below it (repeatable).
    #[arg(long)]
    pub include: Vec<String>,
    /// What to do with files already in the target: replace them (`always`),
    /// only when their size or mtime differ (`if-changed`), or keep them
    /// (`never`). A file is only ever replaced by a complete, verified copy.
    #[arg(long, value_enum, default_value_t = OverwriteArg::Always)]
    pub overwrite: OverwriteArg,
    /// With --json: print a `{"message_type":"status",...}` line on stdout
    /// every second, then the result as one `"message_type":"summary"` line.
    #[arg(long, requires = "json")]
    pub status_lines: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `--overwrite` values (restic's names).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OverwriteArg {
    Always,
    IfChanged,
    Never,
}

impl From<OverwriteArg> for Overwrite {
    fn from(a: OverwriteArg) -> Overwrite {
        match a {
            OverwriteArg::Always => Overwrite::Always,
            OverwriteArg::IfChanged => Overwrite::IfChanged,
            OverwriteArg::Never => Overwrite::Never,
        }
    }
}

pub fn restore(ctx: &Ctx, a: RestoreArgs) -> CmdResult {
    let repo = ctx.open()?;
    let (id, snap) = select::find(&repo, &a.snapshot, &a.filter.filter())?;
    let progress = Arc::new(RestoreProgress::default());
    let shown = progress.clone();
    let bar = ctx.progress(Some(0), move |bar| {
        bar.set_length(shown.total_bytes.load(Ordering::Relaxed));
        bar.set_position(shown.bytes.load(Ordering::Relaxed));
        bar.set_message("restored");
    });
    let (shown, started) = (progress.clone(), std::time::Instant::now());
    let status = ctx.status_lines(a.status_lines, move || {
        let (done, all) = (shown.bytes.load(Ordering::Relaxed), shown.total_bytes.load(Ordering::Relaxed));
        let fraction = if all == 0 { 0.0 } else { (done as f64 / all as f64).min(1.0) };
        let elapsed = started.elapsed().as_secs_f64();
        serde_json::json!({
            "percent_done": fraction,
            "total_bytes": all,
            "bytes_restored": done,
            "seconds_elapsed": elapsed.round() as u64,
            "seconds_remaining": (fraction > 0.0).then(|| (elapsed / fraction - elapsed).round() as u64),
        })
    });
    let opts = RestoreOptions {
        include: a.include,
        overwrite: a.overwrite.into(),
        strip_special_bits: false,
        ignore_owner: false,
    };
    let result = restore::restore(&repo, &snap, &a.target, &opts, &progress);
    drop((bar, status));
    let report = result?;
    for w in &report.warnings {
        ctx.info(format!("warning: {w}"));
    }
    for l in &report.left_out {
        eprintln!("not restored: {}: {}", l.path, l.error);
    }
    for d in &report.damaged {
        eprintln!("damaged: {}: {} (not restored)", d.path, d.error);
    }
    for f in &report.failed {
        eprintln!("not restored: {}: {}", f.path, f.error);
    }
    if ctx.json() {
        let mut v = serde_json::to_value(&report).expect("serializable");
        v["snapshot"] = serde_json::json!(id);
        v["target"] = serde_json::json!(a.target);
        ctx.print_result(v, a.status_lines);
    } else {
        let skipped =
            if report.skipped > 0 { format!(", {} left as they were", report.skipped) } else { String::new() };
        println!(
            "restored snapshot {} to {}: {} files ({} hard links), {} dirs, {} symlinks, {} fifos/devices, {}{skipped}",
            id.short(),
            a.target.display(),
            report.files,
            report.hardlinks,
            report.dirs,
            report.symlinks,
            report.specials,
            human_bytes(report.bytes)
        );
    }
    if !report.damaged.is_empty() {
        eprintln!(
            "chunkvault: error: {} files could not be restored because the repository is damaged",
            report.damaged.len()
        );
        Ok(ExitCode::from(exit::DAMAGE))
    } else if !report.failed.is_empty() {
        eprintln!("chunkvault: error: {} entries could not be put in place in the target", report.failed.len());
        Ok(ExitCode::from(exit::ERROR))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    /// Snapshot id, unique id prefix, or `latest`.
    pub snapshot: String,
    /// Path inside the snapshot (default: everything).
    pub path: Option<String>,
    /// Do not descend into subdirectories.
    #[arg(long)]
    pub no_recurse: bool,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(serde::Serialize)]
struct Entry {
    path: String,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: String,
    size: u64,
    mtime: String,
    uid: u32,
    gid: u32,
    /// Owner names at backup time (empty when unknown or not recorded).
    user: String,
    group: String,
    /// Hard links of the file when backed up (0: not recorded or one).
    #[serde(skip_serializing_if = "is_zero")]
    links: u64,
    /// Names of its extended attributes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    xattrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn entry(path: String, n: &Node) -> Entry {
    let target = match &n.kind {
        NodeKind::Symlink { target } => Some(String::from_utf8_lossy(target).into_owned()),
        _ => None,
    };
    let mtime = chrono::DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec).map(|t| t.to_rfc3339()).unwrap_or_default();
    Entry {
        path,
        kind: n.type_name(),
        mode: format!("{:o}", n.mode & 0o7777),
        size: n.size,
        mtime,
        uid: n.uid,
        gid: n.gid,
        user: n.extra.user.clone(),
        group: n.extra.group.clone(),
        links: n.extra.links,
        xattrs: n.extra.xattrs.iter().map(|x| String::from_utf8_lossy(&x.name).into_owned()).collect(),
        target,
    }
}

pub fn ls(ctx: &Ctx, a: LsArgs) -> CmdResult {
    let repo = ctx.open()?;
    let (_, snap) = select::find(&repo, &a.snapshot, &a.filter.filter())?;
    let base = a.path.clone().unwrap_or_default();
    let base = base.trim_matches('/');
    let mut out = Vec::new();
    match repo.find_node(&snap.tree, base)? {
        None => list_tree(&repo, &snap.tree, "", !a.no_recurse, &mut out)?,
        Some(node) => {
            let path = format!("/{base}");
            out.push(entry(path.clone(), &node));
            if let NodeKind::Dir { subtree } = &node.kind {
                list_tree(&repo, subtree, &path, !a.no_recurse, &mut out)?;
            }
        }
    }
    if ctx.json() {
        ctx.print_json(&out);
    } else {
        let mut stdout = std::io::stdout().lock();
        for e in &out {
            let suffix = e.target.as_ref().map(|t| format!(" -> {t}")).unwrap_or_default();
            let _ = writeln!(stdout, "{:<7} {:>5} {:>12} {:<25} {}{}", e.kind, e.mode, e.size, e.mtime, e.path, suffix);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list_tree(
    repo: &Repository,
    tree: &BlobId,
    prefix: &str,
    recurse: bool,
    out: &mut Vec<Entry>,
) -> Result<(), CliError> {
    if !recurse {
        for n in repo.load_tree(tree)?.nodes() {
            out.push(entry(format!("{prefix}/{}", n.name_lossy()), n));
        }
        return Ok(());
    }
    for e in chunkvault::tree::walk(repo, tree) {
        let (rel, n) = e.map_err(|e| e.source)?;
        out.push(entry(format!("{prefix}/{}", rel.to_string_lossy()), &n));
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct CatArgs {
    /// Snapshot id, unique id prefix, or `latest`.
    pub snapshot: String,
    /// Path of a file inside the snapshot.
    pub path: String,
    /// Only bytes START-END (END exclusive; either may be omitted).
    #[arg(long)]
    pub range: Option<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

fn parse_range(s: &str) -> Result<(u64, u64), CliError> {
    let bad = || CliError::Usage(format!("--range {s:?}: expected START-END, e.g. 0-4096 or 100-"));
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let start = if a.is_empty() { 0 } else { a.parse().map_err(|_| bad())? };
    let end = if b.is_empty() { u64::MAX } else { b.parse().map_err(|_| bad())? };
    if end < start {
        return Err(bad());
    }
    Ok((start, end))
}

pub fn cat(ctx: &Ctx, a: CatArgs) -> CmdResult {
    let range = a.range.as_deref().map(parse_range).transpose()?;
    let repo = ctx.open()?;
    let (_, snap) = select::find(&repo, &a.snapshot, &a.filter.filter())?;
    let node =
        repo.find_node(&snap.tree, &a.path)?.ok_or_else(|| CliError::Other(format!("{}: not a file", a.path)))?;
    let mut stdout = std::io::stdout().lock();
    restore::cat(&repo, &node, range, &mut stdout)?;
    stdout.flush().map_err(|e| CliError::Other(format!("writing stdout: {e}")))?;
    Ok(ExitCode::SUCCESS)
}
