//! `stats` and `diff`.

use std::process::ExitCode;

use chunkvault::select;
use chunkvault::stats::{diff, stats_of, Change};

use crate::ctx::{human_bytes, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The older snapshot (id, prefix or `latest`).
    pub from: String,
    /// The newer snapshot.
    pub to: String,
    #[command(flatten)]
    pub filter: FilterArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// Only these snapshots (ids, prefixes or `latest`; default: all that pass the filters).
    #[arg(value_name = "SNAPSHOT")]
    pub snapshots: Vec<String>,
    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn stats_cmd(ctx: &Ctx, a: StatsArgs) -> CmdResult {
    let repo = ctx.open()?;
    let snapshots = select::find_all(&repo, &a.snapshots, &a.filter.filter())?;
    let s = stats_of(&repo, &snapshots)?;
    if ctx.json() {
        ctx.print_json(&s);
    } else {
        println!("snapshots:          {}", s.snapshots);
        println!("logical size:       {} (file content over all snapshots)", human_bytes(s.logical_bytes));
        println!("unique chunks:      {} ({})", s.chunks, human_bytes(s.chunk_bytes));
        println!("stored chunks:      {}", human_bytes(s.chunk_stored_bytes));
        println!("trees:              {}", s.trees);
        println!("packs:              {} ({})", s.packs, human_bytes(s.pack_bytes));
        println!("dedup ratio:        {:.2}", s.dedup_ratio);
        println!("compression ratio:  {:.2}", s.compression_ratio);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn diff_cmd(ctx: &Ctx, a: DiffArgs) -> CmdResult {
    let repo = ctx.open()?;
    let filter = a.filter.filter();
    let (from_id, from) = select::find(&repo, &a.from, &filter)?;
    let (to_id, to) = select::find(&repo, &a.to, &filter)?;
    let changes = diff(&repo, &from, &to)?;
    if ctx.json() {
        ctx.print_json(&serde_json::json!({ "from": from_id, "to": to_id, "changes": changes }));
    } else {
        for d in &changes {
            let mark = match d.change {
                Change::Added => "+",
                Change::Removed => "-",
                Change::Modified => "M",
                Change::MetadataChanged => "U",
            };
            println!("{mark}    {}", d.path);
        }
        let count = |c: Change| changes.iter().filter(|d| d.change == c).count();
        ctx.info(format!(
            "{} added, {} removed, {} modified, {} metadata changed",
            count(Change::Added),
            count(Change::Removed),
            count(Change::Modified),
            count(Change::MetadataChanged)
        ));
    }
    Ok(ExitCode::SUCCESS)
}
