//! `init`, `snapshots` and `key`.

use std::path::PathBuf;
use std::process::ExitCode;

use chunkvault::chunker::ChunkerParams;
use chunkvault::crypto::KdfParams;
use chunkvault::id::KeyId;
use chunkvault::repo::{self, InitOptions, Repository};

use crate::ctx::{human_bytes, password_from, CliError, Ctx, FilterArgs};
use crate::CmdResult;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// zstd compression level for new data (0 stores uncompressed).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    pub compression: i32,
    /// Average chunk size in bytes (a power of two; min and max are 1/4 and 4x).
    #[arg(long, default_value_t = ChunkerParams::default().avg_size)]
    pub chunk_avg: u32,
    /// Target packfile size in MiB.
    #[arg(long, default_value_t = 16)]
    pub pack_size_mib: u32,
    /// Argon2id memory cost in KiB for this password's key file.
    #[arg(long, default_value_t = KdfParams::default().memory_kib, hide = true)]
    pub kdf_memory_kib: u32,
    /// Argon2id passes.
    #[arg(long, default_value_t = KdfParams::default().iterations, hide = true)]
    pub kdf_iterations: u32,
    /// Argon2id lanes (computed in parallel).
    #[arg(long, default_value_t = KdfParams::default().parallelism, hide = true)]
    pub kdf_parallelism: u32,
}

pub fn init(ctx: &Ctx, a: InitArgs) -> CmdResult {
    let location = ctx.repo_location()?;
    let password = ctx.password("new repository password: ")?;
    if password.is_empty() {
        return Err(CliError::Usage("refusing an empty password".into()));
    }
    let avg = a.chunk_avg;
    let opts = InitOptions {
        chunker: ChunkerParams { min_size: avg / 4, avg_size: avg, max_size: avg.saturating_mul(4) },
        compression_level: a.compression,
        pack_size: a.pack_size_mib.saturating_mul(1 << 20),
        kdf: KdfParams { memory_kib: a.kdf_memory_kib, iterations: a.kdf_iterations, parallelism: a.kdf_parallelism },
    };
    let backend = repo::open_backend(location, true)?;
    let r = Repository::init(backend, &password, &opts)?;
    if ctx.json() {
        ctx.print_json(
            &serde_json::json!({"repository": location, "id": r.config().id, "key": r.key_id(), "config": r.config()}),
        );
    } else {
        println!("created repository {} at {location}", r.config().id);
        ctx.info("Keep the password safe: without it the data cannot be recovered.");
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
}

pub fn snapshots(ctx: &Ctx, a: SnapshotsArgs) -> CmdResult {
    let r = ctx.open()?;
    let list = chunkvault::select::list(&r, &a.filter.filter())?;
    if ctx.json() {
        let v: Vec<_> = list
            .iter()
            .map(|(id, s)| {
                let mut j = serde_json::to_value(s).expect("serializable");
                j["id"] = serde_json::json!(id);
                j["short_id"] = serde_json::json!(id.short());
                j
            })
            .collect();
        ctx.print_json(&v);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<8}  {:<19}  {:<12}  {:>10}  {:<12}  paths", "id", "time", "host", "size", "tags");
    for (id, s) in &list {
        println!(
            "{:<8}  {:<19}  {:<12}  {:>10}  {:<12}  {}",
            id.short(),
            s.time.format("%Y-%m-%d %H:%M:%S"),
            s.hostname,
            human_bytes(s.summary.total_bytes),
            s.tags.join(","),
            s.paths.join(" ")
        );
    }
    ctx.info(format!("{} snapshots", list.len()));
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// Add a password. The new one comes from --new-password-file or $CHUNKVAULT_NEW_PASSWORD.
    Add {
        /// Read the new password from this file (first line).
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// List key files.
    List,
    /// Remove a key file (not the one in use).
    Remove {
        /// The key's id or a unique prefix of it (see `key list`).
        id: String,
    },
}

pub fn key(ctx: &Ctx, cmd: KeyCommand) -> CmdResult {
    let r = ctx.open()?;
    match cmd {
        KeyCommand::Add { new_password_file } => {
            let pw = password_from(new_password_file.as_ref(), "CHUNKVAULT_NEW_PASSWORD", "new password: ")?;
            if pw.is_empty() {
                return Err(CliError::Usage("refusing an empty password".into()));
            }
            let id = r.add_key(&pw, KdfParams::default())?;
            if ctx.json() {
                ctx.print_json(&serde_json::json!({"key": id}));
            } else {
                println!("added key {id}");
            }
        }
        KeyCommand::List => {
            let keys = r.list_keys()?;
            if ctx.json() {
                ctx.print_json(&keys);
            } else {
                println!("  {:<8}  {:<20}  {:<12}  host", "id", "created", "user");
                for k in keys {
                    let mark = if k.current { "*" } else { " " };
                    println!(
                        "{mark} {:<8}  {:<20}  {:<12}  {}",
                        k.id.short(),
                        k.created.format("%Y-%m-%d %H:%M:%S"),
                        k.username,
                        k.hostname
                    );
                }
            }
        }
        KeyCommand::Remove { id } => {
            let keys = r.list_keys()?;
            let matches: Vec<KeyId> =
                keys.iter().map(|k| k.id).filter(|k| k.to_hex().starts_with(&id.to_ascii_lowercase())).collect();
            let [key_id] = matches.as_slice() else {
                return Err(CliError::Other(format!("{id:?} matches {} keys", matches.len())));
            };
            r.remove_key(key_id)?;
            if ctx.json() {
                ctx.print_json(&serde_json::json!({"removed": key_id}));
            } else {
                println!("removed key {key_id}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
