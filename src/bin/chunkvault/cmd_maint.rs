//! Keeping a repository healthy: `forget`, `prune`, `repair`, `unlock`.

use std::process::ExitCode;
use std::sync::Arc;

use chunkvault::lock::remove_locks;
use chunkvault::prune::{forget_ids, prune, PruneOptions, PruneProgress, PruneReport};
use chunkvault::repair::{repair_index, repair_snapshots};
use chunkvault::retention::{self, GroupBy, Policy};
use chunkvault::select::{self, TagChange};

use crate::ctx::{human_bytes, CliError, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Repack a pack when more than this percentage of it is unused.
    #[arg(long, default_value_t = 10.0, value_parser = parse_percent)]
    pub max_unused_percent: f64,
    /// Show what would be done; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

#[derive(clap::Args, Debug)]
pub struct ForgetArgs {
    /// Remove these snapshots (ids or unique prefixes; readable or not)
    /// instead of applying a --keep-* policy.
    #[arg(value_name = "SNAPSHOT_ID")]
    pub snapshots: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest snapshot of each of the N newest hours.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest snapshot of each of the N newest days.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest snapshot of each of the N newest ISO weeks.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest snapshot of each of the N newest months.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_monthly: u32,
    /// Keep the newest snapshot of each of the N newest years.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_yearly: u32,
    /// Keep snapshots at most this much older than the newest (e.g. 36h, 14d, 8w, 6m, 2y).
    #[arg(long, value_name = "DURATION", value_parser = parse_within)]
    pub keep_within: Option<chrono::Duration>,
    /// Keep snapshots carrying this tag (repeatable).
    #[arg(long = "keep-tag", value_name = "TAG")]
    pub keep_tags: Vec<String>,
    /// Apply the policy separately to each group of snapshots with the same
    /// of these, comma-separated: `host`, `paths`, `tags` (default
    /// `host,paths`; `` makes one group).
    #[arg(long, value_name = "FIELDS", default_value = "host,paths", value_parser = parse_group_by)]
    pub group_by: GroupBy,
    /// Show what would be removed; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Prune afterwards.
    #[arg(long)]
    pub prune: bool,
    /// With --prune: repack a pack when more than this percentage of it is unused.
    #[arg(long, default_value_t = 10.0, value_parser = parse_percent)]
    pub max_unused_percent: f64,
    /// The policy considers only snapshots passing these filters.
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// Snapshots to change (ids, prefixes or `latest`; default: all that pass the filters).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    /// Add this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub add: Vec<String>,
    /// Remove this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub remove: Vec<String>,
    /// Replace all tags with these (repeatable; `--set ''` clears them).
    #[arg(long, value_name = "TAG")]
    pub set: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(clap::Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, not only stale ones (only when no other process uses the repository).
    #[arg(long)]
    pub remove_all: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the index from the packs' own blob tables.
    Index,
    /// Write new snapshots without the files whose data is missing or damaged.
    Snapshots(RepairSnapshotsArgs),
}

#[derive(clap::Args, Debug)]
pub struct RepairSnapshotsArgs {
    /// Read and verify every chunk (otherwise: indexed inside an existing pack counts as present).
    #[arg(long)]
    pub read_data: bool,
    /// Remove the damaged originals once their repaired copies are written.
    #[arg(long)]
    pub forget: bool,
    /// Show what would be dropped; change nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

pub fn repair_cmd(ctx: &Ctx, c: RepairCommand) -> CmdResult {
    let repo = ctx.open()?;
    match c {
        RepairCommand::Index => {
            let r = repair_index(&repo, ctx.lock_options()).map_err(repair_err)?;
            if ctx.json() {
                ctx.print_json(&r);
            } else {
                for (pack, why) in &r.unreadable_packs {
                    eprintln!("warning: pack {pack} left out: {why}");
                }
                println!(
                    "indexed {} blobs in {} packs: wrote {} index segments, deleted {}",
                    r.blobs, r.packs, r.segments_written, r.segments_deleted
                );
            }
        }
        RepairCommand::Snapshots(a) => {
            let done =
                repair_snapshots(&repo, a.read_data, a.forget, a.dry_run, ctx.lock_options()).map_err(repair_err)?;
            if ctx.json() {
                ctx.print_json(&serde_json::json!({ "dry_run": a.dry_run, "snapshots": done }));
            } else {
                for r in &done {
                    if let Some(why) = &r.unreadable {
                        let fate = match (a.dry_run, r.forgotten) {
                            (true, _) => "",
                            (false, true) => ", removed",
                            (false, false) => ", kept (--forget removes it)",
                        };
                        println!("snapshot {}: cannot be read ({why}){fate}", r.old.short());
                        continue;
                    }
                    for p in &r.dropped {
                        println!("snapshot {}: dropped {p}", r.old.short());
                    }
                    if let (false, Some(new)) = (a.dry_run, r.new) {
                        let fate = if r.forgotten { "removed" } else { "kept" };
                        println!("snapshot {} -> {} (original {fate})", r.old.short(), new.short());
                    }
                }
                println!("{} damaged snapshots{}", done.len(), if a.dry_run { " (dry run)" } else { " repaired" });
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn repair_err(e: chunkvault::repair::RepairError) -> CliError {
    use chunkvault::repair::RepairError;
    match e {
        RepairError::Repo(e) => e.into(),
        RepairError::Lock(e) => e.into(),
        other => CliError::Other(other.to_string()),
    }
}

fn parse_group_by(s: &str) -> Result<GroupBy, String> {
    let mut g = GroupBy { host: false, paths: false, tags: false };
    for field in s.split(',').filter(|f| !f.is_empty()) {
        match field {
            "host" => g.host = true,
            "paths" => g.paths = true,
            "tags" => g.tags = true,
            other => return Err(format!("cannot group by {other:?} (host, paths, tags)")),
        }
    }
    Ok(g)
}

fn parse_percent(s: &str) -> Result<f64, String> {
    match s.trim_end_matches('%').parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentage between 0 and 100")),
    }
}

/// `<n><unit>` with unit h, d, w, m (30 days) or y (365 days).
fn parse_within(s: &str) -> Result<chrono::Duration, String> {
    let bad = || format!("{s:?} is not a duration like 36h, 14d, 8w, 6m or 2y");
    let unit = s.chars().last().ok_or_else(bad)?;
    let n: i64 = s[..s.len() - unit.len_utf8()].parse().map_err(|_| bad())?;
    let hours = match unit {
        'h' => 1,
        'd' => 24,
        'w' => 24 * 7,
        'm' => 24 * 30,
        'y' => 24 * 365,
        _ => return Err(bad()),
    };
    n.checked_mul(hours).filter(|h| *h >= 0 && *h < 24 * 365 * 10_000).map(chrono::Duration::hours).ok_or_else(bad)
}

pub fn forget_cmd(ctx: &Ctx, a: ForgetArgs) -> CmdResult {
    let policy = Policy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
        tags: a.keep_tags,
    };
    if !a.snapshots.is_empty() && !policy.is_empty() {
        return Err(CliError::Usage("give snapshot ids or --keep-* options, not both".into()));
    }
    if a.snapshots.is_empty() && policy.is_empty() {
        return Err(CliError::Usage(
            "no snapshot id and no --keep-* option given: refusing to forget every snapshot".into(),
        ));
    }
    let repo = ctx.open()?;
    let (decisions, removed) = if a.snapshots.is_empty() {
        let candidates = select::list(&repo, &a.filter.filter())?;
        let decisions = retention::apply(&policy, a.group_by, &candidates);
        let ids: Vec<String> = decisions.iter().flat_map(|d| d.remove.iter().map(|id| id.to_hex())).collect();
        (decisions, forget_ids(&repo, &ids, a.dry_run)?)
    } else {
        (Vec::new(), forget_ids(&repo, &a.snapshots, a.dry_run)?)
    };
    let pruned = if a.prune && !a.dry_run {
        Some(run_prune(
            ctx,
            &repo,
            PruneOptions { max_unused_percent: a.max_unused_percent, ..PruneOptions::default() },
        )?)
    } else {
        None
    };
    if ctx.json() {
        ctx.print_json(&serde_json::json!({
            "dry_run": a.dry_run,
            "groups": decisions,
            "removed": removed.len(),
            "removed_ids": removed,
            "prune": pruned,
        }));
    } else {
        for d in &decisions {
            println!(
                "host {} paths [{}] tags [{}]: keep {}, remove {}",
                d.hostname,
                d.paths.join(", "),
                d.tags.join(", "),
                d.keep.len(),
                d.remove.len()
            );
            for k in &d.keep {
                println!("  keep   {} ({})", k.id.short(), k.reasons.join(", "));
            }
            for id in &d.remove {
                println!("  remove {}", id.short());
            }
        }
        let verb = if a.dry_run { "would remove" } else { "removed" };
        if !a.snapshots.is_empty() {
            for id in &removed {
                println!("  remove {}", id.short());
            }
        }
        println!("{verb} {} snapshots", removed.len());
        if let Some(r) = &pruned {
            print_prune(r);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn tag_cmd(ctx: &Ctx, a: TagArgs) -> CmdResult {
    if a.add.is_empty() && a.remove.is_empty() && a.set.is_empty() {
        return Err(CliError::Usage("nothing to do: give --add, --remove or --set".into()));
    }
    let change = TagChange {
        set: (!a.set.is_empty()).then(|| a.set.iter().filter(|t| !t.is_empty()).cloned().collect()),
        add: a.add,
        remove: a.remove,
    };
    let repo = ctx.open()?;
    let chosen = select::find_all(&repo, &a.snapshots, &a.filter.filter())?;
    let changed = select::retag(&repo, &chosen, &change, ctx.lock_options())?;
    if ctx.json() {
        let v: Vec<_> = changed.iter().map(|(old, new)| serde_json::json!({"old": old, "new": new})).collect();
        ctx.print_json(&serde_json::json!({ "changed": v }));
    } else {
        for (old, new) in &changed {
            println!("snapshot {} -> {}", old.short(), new.short());
        }
        println!("changed the tags of {} of {} snapshots", changed.len(), chosen.len());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prune_cmd(ctx: &Ctx, a: PruneArgs) -> CmdResult {
    let repo = ctx.open()?;
    let report = run_prune(
        ctx,
        &repo,
        PruneOptions { max_unused_percent: a.max_unused_percent, dry_run: a.dry_run, ..PruneOptions::default() },
    )?;
    if ctx.json() {
        ctx.print_json(&report);
    } else {
        print_prune(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn run_prune(ctx: &Ctx, repo: &chunkvault::repo::Repository, opts: PruneOptions) -> Result<PruneReport, CliError> {
    let opts = PruneOptions { lock: ctx.lock_options(), ..opts };
    let progress = Arc::new(PruneProgress::default());
    let shown = progress.clone();
    let bar = ctx.progress(None, move |bar| {
        bar.set_message(shown.phase.lock().unwrap_or_else(|p| p.into_inner()).clone());
    });
    let report = prune(repo, &opts, &progress);
    drop(bar);
    Ok(report?)
}

fn print_prune(r: &PruneReport) {
    let verb = if r.dry_run { "would" } else { "will" };
    println!(
        "{} snapshots use {} blobs; {} blobs are unused ({} of {})",
        r.snapshots,
        r.blobs_used,
        r.blobs_unused,
        human_bytes(r.bytes_unused_before),
        human_bytes(r.bytes_before)
    );
    println!(
        "packs: {} total, {} kept, {} repacked ({} copied), {} unused and {} unindexed deleted",
        r.packs_total,
        r.packs_kept,
        r.packs_repacked,
        human_bytes(r.bytes_repacked),
        r.packs_unused,
        r.packs_unindexed
    );
    if r.dry_run {
        println!("dry run: nothing changed; the repository {verb} shrink to about {}", human_bytes(r.bytes_after));
    } else {
        println!(
            "wrote {} packs and {} index segments, deleted {} index segments; repository now {}",
            r.packs_written,
            r.index_segments_written,
            r.index_segments_deleted,
            human_bytes(r.bytes_after)
        );
    }
}

pub fn unlock_cmd(ctx: &Ctx, a: UnlockArgs) -> CmdResult {
    let repo = ctx.open()?;
    let removed = remove_locks(repo.backend().as_ref(), a.remove_all, &ctx.lock_options())?;
    if ctx.json() {
        ctx.print_json(&serde_json::json!({ "removed": removed }));
    } else {
        println!("removed {removed} locks");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_durations_parse_and_refuse_junk() {
        assert_eq!(parse_within("36h").unwrap(), chrono::Duration::hours(36));
        assert_eq!(parse_within("2w").unwrap(), chrono::Duration::days(14));
        assert_eq!(parse_within("1y").unwrap(), chrono::Duration::days(365));
        for bad in ["", "d", "3", "-1d", "1x", "99999999999999y", "1é"] {
            assert!(parse_within(bad).is_err(), "{bad:?}");
        }
        assert!(parse_percent("5%").is_ok());
        assert!(parse_percent("101").is_err());
    }
}
