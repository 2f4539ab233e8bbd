//! `check`.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use chunkvault::check::{check, CheckOptions, CheckProgress, Severity};
use chunkvault::lock::LockKind;

use crate::ctx::Ctx;
use crate::{exit, CmdResult};

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Read every pack and verify every blob against its id.
    #[arg(long)]
    pub read_data: bool,
    /// Read only part N of M of the packs (e.g. 1/10), so big repositories can be verified in turns.
    #[arg(long, value_name = "N/M", value_parser = parse_subset)]
    pub read_data_subset: Option<(u32, u32)>,
    /// Do not take the shared lock that keeps a prune from deleting what is being checked.
    #[arg(long)]
    pub no_lock: bool,
}

fn parse_subset(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not N/M with 1 <= N <= M");
    let (n, m) = s.split_once('/').ok_or_else(bad)?;
    let (n, m): (u32, u32) = (n.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if n == 0 || n > m {
        return Err(bad());
    }
    Ok((n, m))
}

pub fn run(ctx: &Ctx, a: CheckArgs) -> CmdResult {
    let repo = ctx.open()?;
    // A prune running meanwhile would make its deletions look like damage.
    let _lock = if a.no_lock {
        None
    } else {
        let lock = repo.lock(LockKind::Shared, ctx.lock_options())?;
        repo.reload_index_if_replaced()?;
        Some(lock)
    };
    let progress = Arc::new(CheckProgress::default());
    let shown = progress.clone();
    let bar = ctx.progress(None, move |bar| {
        let total = shown.packs_total.load(Ordering::Relaxed);
        if total > 0 {
            bar.set_message(format!("read {}/{} packs", shown.packs_done.load(Ordering::Relaxed), total));
        }
    });
    let report = check(&repo, CheckOptions { read_data: a.read_data, read_data_subset: a.read_data_subset }, &progress);
    drop(bar);
    let report = report?;
    let damaged = report.has_damage();
    if ctx.json() {
        let mut v = serde_json::to_value(&report).expect("serializable");
        v["ok"] = serde_json::json!(!damaged);
        ctx.print_json(&v);
    } else {
        for p in &report.problems {
            let label = match p.severity {
                Severity::Damage => "error",
                Severity::Warning => "warning",
            };
            eprintln!("{label}: {}", p.message);
        }
        for f in &report.damaged_files {
            eprintln!("damaged file: {} in snapshot {}", f.path, f.snapshot.short());
        }
        println!(
            "checked {} snapshots, {} trees, {} packs ({} read), {} blobs: {}",
            report.snapshots,
            report.trees,
            report.packs,
            report.packs_read,
            report.blobs,
            if damaged { "DAMAGE FOUND" } else { "no errors were found" }
        );
    }
    Ok(if damaged { ExitCode::from(exit::DAMAGE) } else { ExitCode::SUCCESS })
}
