//! `find` and `dump`: getting at data without a restore.

use std::io::Write;
use std::process::ExitCode;

use chunkvault::dump::{dump_archive, Archive};
use chunkvault::find::{find, Patterns};
use chunkvault::select;
use chunkvault::tree::NodeKind;

use crate::ctx::{human_bytes, CliError, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct FindArgs {
    /// Glob patterns: without a `/` matched against names (`*.jpg`), with
    /// one against whole paths (`/home/*/.ssh`, `**/cache/**`).
    #[arg(required = true, value_name = "PATTERN")]
    pub patterns: Vec<String>,
    /// Search only this snapshot (id, prefix or `latest`; repeatable).
    #[arg(long = "snapshot", short = 's', value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn find_cmd(ctx: &Ctx, a: FindArgs) -> CmdResult {
    let patterns = Patterns::new(&a.patterns).map_err(|e| CliError::Usage(e.to_string()))?;
    let repo = ctx.open()?;
    let snapshots = select::find_all(&repo, &a.snapshots, &a.filter.filter())?;
    let found = find(&repo, &snapshots, &patterns).map_err(|e| match e {
        chunkvault::find::FindError::Repo(r) => CliError::Repo(r),
        other => CliError::Usage(other.to_string()),
    })?;
    if ctx.json() {
        ctx.print_json(&found);
        return Ok(ExitCode::SUCCESS);
    }
    let mut stdout = std::io::stdout().lock();
    for s in &found {
        let _ = writeln!(stdout, "snapshot {} of {} at {}:", s.snapshot.short(), s.hostname, s.time);
        for m in &s.matches {
            let _ = writeln!(stdout, "  {:<8} {:>10}  {:<25}  {}", m.kind, human_bytes(m.size), m.mtime, m.path);
        }
    }
    let total: usize = found.iter().map(|s| s.matches.len()).sum();
    ctx.info(format!("{total} matches in {} of {} snapshots", found.len(), snapshots.len()));
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// Snapshot id, unique id prefix, or `latest`.
    pub snapshot: String,
    /// Path inside the snapshot: a file is written as it is, a directory as an archive.
    pub path: String,
    /// Archive format for a directory (or to wrap a file).
    #[arg(long, value_enum)]
    pub archive: Option<ArchiveArg>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

/// `--archive` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ArchiveArg {
    Tar,
    Zip,
}

pub fn dump_cmd(ctx: &Ctx, a: DumpArgs) -> CmdResult {
    let repo = ctx.open()?;
    let (_, snap) = select::find(&repo, &a.snapshot, &a.filter.filter())?;
    let rel = a.path.trim_matches('/');
    let node = if rel.is_empty() {
        None
    } else {
        Some(
            repo.find_node(&snap.tree, rel)?
                .ok_or_else(|| CliError::Other(format!("{}: not in the snapshot", a.path)))?,
        )
    };
    let mut stdout = std::io::stdout().lock();
    let format = match (a.archive, &node) {
        (Some(ArchiveArg::Zip), _) => Archive::Zip,
        (Some(ArchiveArg::Tar), _) => Archive::Tar,
        (None, Some(n)) if n.is_file() => {
            chunkvault::restore::cat(&repo, n, None, &mut stdout)?;
            stdout.flush().map_err(|e| CliError::Other(format!("writing stdout: {e}")))?;
            return Ok(ExitCode::SUCCESS);
        }
        (None, _) => Archive::Tar,
    };
    // The snapshot's root has no node of its own: a directory node for it.
    let root;
    let (node, name) = match &node {
        Some(n) => (n, n.name_lossy()),
        None => {
            root = chunkvault::tree::Node {
                name: b"root".to_vec(),
                ..chunkvault::backup::stream_node(NodeKind::Dir { subtree: snap.tree }, 0o755, Default::default(), 0)
            };
            (&root, ".".to_owned())
        }
    };
    let left_out = dump_archive(&repo, node, &name, format, &mut stdout).map_err(|e| match e {
        chunkvault::dump::DumpError::Repo(r) => CliError::Repo(r),
        other => CliError::Other(other.to_string()),
    })?;
    stdout.flush().map_err(|e| CliError::Other(format!("writing stdout: {e}")))?;
    for (path, why) in &left_out {
        eprintln!("not in the archive: {path}: {why}");
    }
    Ok(ExitCode::SUCCESS)
}
