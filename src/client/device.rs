//! The device client: silent activation from a managed app configuration,
//! local chunking and hashing, upload of only the chunks the server lacks,
//! restore with path validation, and logging out when retired or wiped.
//!
//! State lives in one directory (0700) holding `state.json` (0600): the
//! stand-in for a phone's keychain. Deleting the directory logs out.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::journal::{self, Journal, WipeReport};
use super::remote::RemoteChunks;
use super::{ClientError, Http, JsonBody};
use crate::api::{self, *};
use crate::chunker::{Chunker, ChunkerParams};
use crate::crypto::IdKey;
use crate::id::BlobId;
use crate::restore::{Overwrite, RestoreOptions, RestorePlan, RestoreProgress, RestoreReport};
use crate::tree::{Node, NodeKind, Timestamp};

/// Largest managed config accepted.
const MAX_MANAGED_CONFIG: usize = 64 * 1024;
/// Chunk bytes held before asking which are missing and uploading them.
const BATCH_BYTES: usize = 16 << 20;
/// File bytes read and chunked together on all cores (smaller files are
/// grouped up to this; a larger file is chunked alone, a window at a time).
const GROUP_BYTES: u64 = 16 << 20;
/// Files at least this large are mapped rather than read into a buffer.
const MMAP_THRESHOLD: u64 = 8 << 20;
/// Bundle uploads in flight at once (the server's per-tenant limit is 8).
const BUNDLES_IN_FLIGHT: usize = 4;
/// A cached session is reused while it has at least this long to live.
const SESSION_MARGIN_SECS: i64 = 60;

/// The managed app configuration an MDM pushes (its keys are fixed by MDM
/// convention, hence camelCase).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedConfig {
    /// `serverURL`: the auth server, `https://` (or `http://` to loopback,
    /// or with `allow_insecure_http`).
    #[serde(rename = "serverURL")]
    pub server_url: String,
    /// `userEmail`: the user the device belongs to (checked like the server
    /// checks it).
    pub user_email: String,
    /// `deploymentToken`: the secret the device activates with; not kept
    /// after activation.
    pub deployment_token: String,
    /// `allowRestoreToOtherDevice` (default true): whether this device may
    /// restore snapshots of the user's other devices. The server's policy
    /// can narrow it; this can never widen the server's.
    #[serde(default = "yes")]
    pub allow_restore_to_other_device: bool,
    /// `allowOpenIn` (default true): whether restored files may be handed
    /// to other apps; narrowed by the server's policy like the one above.
    #[serde(default = "yes")]
    pub allow_open_in: bool,
    /// `deviceId`: the id to activate under (checked like the server checks
    /// it); a random 32-hex-character id when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// A CA certificate (PEM text) trusted besides the platform's roots, for
    /// a server whose certificate a private CA signed; at most
    /// [`crate::tls::MAX_CA_PEM`] bytes. Kept in the device state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificate: Option<String>,
    /// Allows a plain `http://` serverURL that is not a loopback address
    /// (device and session tokens would cross the network in the clear).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_insecure_http: bool,
}

fn yes() -> bool {
    true
}

impl ManagedConfig {
    /// Parses and checks a managed config. Never panics.
    pub fn parse(bytes: &[u8]) -> Result<ManagedConfig, ClientError> {
        if bytes.len() > MAX_MANAGED_CONFIG {
            return Err(ClientError::Local("managed config too large".into()));
        }
        let c: ManagedConfig =
            serde_json::from_slice(bytes).map_err(|e| ClientError::Local(format!("managed config: {e}")))?;
        if !(c.server_url.starts_with("http://") || c.server_url.starts_with("https://")) {
            return Err(ClientError::Local("managed config: serverURL must be an http(s) URL".into()));
        }
        check_transport(&c.server_url, c.allow_insecure_http)?;
        if let Some(pem) = &c.ca_certificate {
            crate::tls::parse_ca_pem(pem.as_bytes()).map_err(|e| ClientError::Local(format!("managed config: {e}")))?;
        }
        api::check_email(&c.user_email).map_err(ClientError::Local)?;
        if let Some(d) = &c.device_id {
            api::check_device_id(d).map_err(ClientError::Local)?;
        }
        Ok(c)
    }
}

/// Refuses a plain `http://` URL to anything but a loopback address unless
/// `allow_insecure_http`: tokens would cross the network in the clear.
fn check_transport(url: &str, allow_insecure_http: bool) -> Result<(), ClientError> {
    let Some(rest) = url.strip_prefix("http://") else { return Ok(()) };
    if allow_insecure_http || is_loopback_authority(rest) {
        return Ok(());
    }
    Err(ClientError::Local(format!(
        "refusing plain http:// to {url}: device and session tokens would cross the network unencrypted; \
         use an https:// serverURL, or set allowInsecureHttp: true in the managed config"
    )))
}

/// Whether the authority at the start of `rest` (what follows `http://`)
/// is a loopback address: 127.0.0.0/8, `[::1]` or `localhost`.
fn is_loopback_authority(rest: &str) -> bool {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return false;
    }
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CachedSession {
    token: String,
    expires_at: DateTime<Utc>,
}

/// What the device keeps between runs.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LocalState {
    server_url: String,
    email: String,
    device_id: String,
    device_token: String,
    allow_restore_to_other_device: bool,
    allow_open_in: bool,
    #[serde(default)]
    session: Option<CachedSession>,
    /// The managed config's `caCertificate`, for every later call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_certificate: Option<String>,
}

impl LocalState {
    /// The transport to the server, trusting the platform's roots and the
    /// CA this device was given.
    fn http(&self) -> Result<Http, ClientError> {
        let ca = match &self.ca_certificate {
            Some(pem) => crate::tls::parse_ca_pem(pem.as_bytes()).map_err(ClientError::Local)?,
            None => Vec::new(),
        };
        Ok(Http::with_ca(&self.server_url, &ca))
    }
}

/// Why the device logged out, and for a wipe what it removed.
#[derive(Clone, Debug, Serialize)]
pub struct Logout {
    /// `device_retired` or `device_wiped`.
    pub reason: String,
    /// What the wipe removed and left (wiped devices only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wipe: Option<WipeReport>,
}

/// `device status`.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceStatus {
    /// The auth server the device activated with.
    pub server_url: String,
    /// The user the device belongs to.
    pub email: String,
    /// The device's id.
    pub device_id: String,
    /// `active`, or the server's refusal code.
    pub state: String,
    /// Set when this call logged the device out (retired or wiped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logged_out: Option<Logout>,
}

/// `device restore`: the snapshot and what the restore did.
#[derive(Clone, Debug, Serialize)]
pub struct RestoreSummary {
    /// The restored snapshot's id, in hex.
    pub snapshot: String,
    /// What the restore wrote, skipped and could not restore (flattened
    /// into this object in JSON).
    #[serde(flatten)]
    pub report: RestoreReport,
}

/// `device backup`.
#[derive(Clone, Debug, Serialize)]
pub struct BackupSummary {
    /// The committed snapshot's id, in hex.
    pub id: String,
    /// Regular files in the snapshot, as the server counted them.
    pub files: u64,
    /// Bytes of file content in the snapshot.
    pub bytes: u64,
    /// Chunks of files read (a chunk repeated is counted each time).
    pub chunks: u64,
    /// Chunks the server lacked, uploaded.
    pub chunks_uploaded: u64,
    /// Plaintext bytes of those chunks.
    pub bytes_uploaded: u64,
    /// Paths left out: not a regular file, directory or symlink, or a
    /// name or symlink target the manifest cannot carry.
    pub skipped: Vec<String>,
}

/// The default state directory: the user's config directory.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CHUNKVAULT_DEVICE_STATE") {
        return d.into();
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    config.join("chunkvault").join("device")
}

/// An activated device.
pub struct Device {
    dir: PathBuf,
    state: LocalState,
    http: Http,
    logged_out: Option<Logout>,
}

impl Device {
    /// Activates silently from a managed config and saves the device token.
    pub fn activate(dir: &Path, managed: &ManagedConfig) -> Result<Device, ClientError> {
        let device_id = managed.device_id.clone().unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        check_transport(&managed.server_url, managed.allow_insecure_http)?;
        let mut state = LocalState {
            server_url: managed.server_url.clone(),
            email: managed.user_email.clone(),
            device_id: device_id.clone(),
            device_token: String::new(),
            allow_restore_to_other_device: managed.allow_restore_to_other_device,
            allow_open_in: managed.allow_open_in,
            session: None,
            ca_certificate: managed.ca_certificate.clone(),
        };
        let http = state.http()?;
        let resp: ActivateResponse = http.post(
            "/v1/activate",
            None,
            &ActivateRequest {
                deployment_token: managed.deployment_token.clone(),
                email: managed.user_email.clone(),
                device_id: device_id.clone(),
            },
        )?;
        state.device_token = resp.device_token;
        let device = Device { dir: dir.to_owned(), state, http, logged_out: None };
        device.save()?;
        Ok(device)
    }

    /// Loads an activated device's state.
    pub fn load(dir: &Path) -> Result<Device, ClientError> {
        let path = dir.join("state.json");
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClientError::Local(format!(
                    "this device is not activated (no {}); run `chunkvault device activate`",
                    path.display()
                )))
            }
            other => other.map_err(ClientError::io(&path))?,
        };
        let state: LocalState =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))?;
        let http = state.http()?;
        Ok(Device { dir: dir.to_owned(), state, http, logged_out: None })
    }

    /// Set when a server answer logged this device out (retired or wiped).
    pub fn logged_out(&self) -> Option<&Logout> {
        self.logged_out.as_ref()
    }

    /// Tells `observer` of every request this device makes from now on
    /// (load tests, diagnostics).
    pub fn set_request_observer(&mut self, observer: Option<super::RequestObserver>) {
        self.http.set_observer(observer);
    }

    /// The device's id, as activated.
    pub fn device_id(&self) -> &str {
        &self.state.device_id
    }

    /// Writes the state owner-only, atomically.
    fn save(&self) -> Result<(), ClientError> {
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir).map_err(ClientError::io(&self.dir))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700)).map_err(ClientError::io(&self.dir))?;
        let tmp = self.dir.join("state.json.tmp");
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(ClientError::io(&tmp))?;
        f.write_all(&serde_json::to_vec_pretty(&self.state).expect("state serializes"))
            .and_then(|_| f.sync_all())
            .map_err(ClientError::io(&tmp))?;
        fs::rename(&tmp, self.dir.join("state.json")).map_err(ClientError::io(&tmp))
    }

    /// Passes a server answer through; a retired or wiped device logs out
    /// (and for wiped, deletes what it restored) before reporting it.
    fn guard<T>(&mut self, r: Result<T, ClientError>) -> Result<T, ClientError> {
        match r.as_ref().err().and_then(ClientError::code) {
            Some("device_retired") => self.forget(false),
            Some("device_wiped") => self.forget(true),
            Some("invalid_token" | "token_expired") => {
                // A stale cached session: drop it so the next call gets a fresh one.
                self.state.session = None;
                let _ = self.save();
            }
            _ => {}
        }
        r
    }

    fn forget(&mut self, wipe: bool) {
        let report = wipe.then(|| journal::wipe(&self.dir));
        let reason = if wipe { "device_wiped" } else { "device_retired" };
        self.logged_out = Some(Logout { reason: reason.into(), wipe: report });
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// A session token: the cached one while it is fresh, else a new one.
    pub fn session(&mut self) -> Result<String, ClientError> {
        let now = Utc::now();
        if let Some(s) = &self.state.session {
            if s.expires_at.timestamp() - now.timestamp() > SESSION_MARGIN_SECS {
                return Ok(s.token.clone());
            }
        }
        let req = SessionRequest {
            device_token: self.state.device_token.clone(),
            email: self.state.email.clone(),
            device_id: self.state.device_id.clone(),
        };
        let resp: Result<SessionResponse, _> = self.http.post("/v1/session", None, &req);
        let resp = self.guard(resp)?;
        // The admin's policies (which the server enforces too) and the
        // managed config's both hold: the config can narrow, never widen.
        self.state.allow_restore_to_other_device &= resp.policies.allow_restore_to_other_device;
        self.state.allow_open_in &= resp.policies.allow_open_in;
        self.state.session = Some(CachedSession { token: resp.session_token.clone(), expires_at: resp.expires_at });
        self.save()?;
        Ok(resp.session_token)
    }

    fn get<T: serde::de::DeserializeOwned>(&mut self, path: &str) -> Result<T, ClientError> {
        let token = self.session()?;
        let r = self.http.get(path, Some(&token));
        self.guard(r)
    }

    fn post<B: Serialize, T: serde::de::DeserializeOwned>(&mut self, path: &str, body: &B) -> Result<T, ClientError> {
        self.post_json(path, &JsonBody::encode(body)?)
    }

    fn post_json<T: serde::de::DeserializeOwned>(&mut self, path: &str, body: &JsonBody) -> Result<T, ClientError> {
        let token = self.session()?;
        let r = self.http.post_json(path, Some(&token), body);
        self.guard(r)
    }

    /// Asks the server for the device's state (and gets logged out if retired).
    pub fn status(&mut self) -> Result<DeviceStatus, ClientError> {
        let state = match self.get::<Vec<SnapshotInfo>>("/v1/snapshots") {
            Ok(_) => "active".to_owned(),
            Err(ClientError::Api { code, .. }) => code,
            Err(e) => return Err(e),
        };
        Ok(DeviceStatus {
            server_url: self.state.server_url.clone(),
            email: self.state.email.clone(),
            device_id: self.state.device_id.clone(),
            state,
            logged_out: self.logged_out.clone(),
        })
    }

    /// The user's snapshots (from all of their devices).
    pub fn snapshots(&mut self) -> Result<Vec<SnapshotInfo>, ClientError> {
        self.get("/v1/snapshots")
    }

    /// Backs up `paths`; retries once when the server lost uploaded chunks
    /// before the commit (a restart in between).
    pub fn backup(&mut self, paths: &[PathBuf]) -> Result<BackupSummary, ClientError> {
        match self.backup_once(paths) {
            Err(e) if e.code() == Some("missing_chunks") => self.backup_once(paths),
            other => other,
        }
    }

    fn backup_once(&mut self, paths: &[PathBuf]) -> Result<BackupSummary, ClientError> {
        let chunking: Chunking = self.get("/v1/chunking")?;
        let params =
            ChunkerParams { min_size: chunking.min_size, avg_size: chunking.avg_size, max_size: chunking.max_size };
        let chunker = Chunker::new(params, chunking.seed).map_err(|e| ClientError::Local(e.to_string()))?;
        let key = crate::id::parse_hex32(&chunking.id_key).map_err(|e| ClientError::Local(e.to_string()))?;
        let id_key = IdKey::from_bytes(key);
        let mut walked = Walked::default();
        let mut abs_paths = Vec::new();
        for p in paths {
            let abs = std::path::absolute(p).map_err(ClientError::io(p))?;
            let abs: PathBuf = abs.components().filter(|c| !matches!(c, Component::CurDir)).collect();
            fs::symlink_metadata(&abs).map_err(ClientError::io(&abs))?;
            abs_paths.push(abs.to_string_lossy().into_owned());
            walked.extend(walk(&abs)?);
        }
        let Walked { entries, skipped } = walked;
        let mut files = Vec::with_capacity(entries.len());
        let mut todo = Vec::new();
        for (file, source) in entries {
            if let Some((path, size)) = source {
                todo.push((files.len(), path, size));
            }
            files.push(file);
        }
        // Chunk and hash on all cores while other threads ask which chunks
        // are missing and upload them in bundles (one batch of chunks queued
        // between the two).
        let http = self.http.clone();
        let (tx, rx) = sync_channel::<(String, Batch)>(1);
        let (hashed, sent) = std::thread::scope(|s| {
            let sender = s.spawn(move || upload(&http, rx));
            let hashed = self.hash_files(&chunker, &id_key, &mut files, &todo, &tx).and_then(|chunks| {
                // The manifest is encoded while the last bundles upload
                // rather than after (for 42,000 files, 25 ms the server
                // would wait).
                let bytes = files.iter().map(|f: &ManifestFile| f.size).sum::<u64>();
                let files = std::mem::take(&mut files);
                let req = CommitRequest {
                    hostname: crate::snapshot::current_host(),
                    paths: abs_paths,
                    tags: Vec::new(),
                    files,
                };
                Ok((chunks, bytes, JsonBody::encode(&req)?))
            });
            drop(tx);
            let sent = sender.join().unwrap_or_else(|_| Err(ClientError::Local("the upload thread panicked".into())));
            (hashed, sent)
        });
        // An upload error is the cause when both failed (the hashing side
        // then only saw the channel close).
        let sent = self.guard(sent)?;
        let (chunks, bytes, manifest) = hashed?;
        let done: CommitResponse = self.post_json("/v1/snapshots", &manifest)?;
        Ok(BackupSummary {
            id: done.id.to_hex(),
            files: done.files,
            bytes,
            chunks,
            chunks_uploaded: sent.chunks,
            bytes_uploaded: sent.bytes,
            skipped,
        })
    }

    /// Chunks and names the files of `todo` (index into `files`, path, size
    /// when walked) on all cores, filling in their chunk lists and sizes,
    /// and hands batches of chunks to the uploader. Returns the number of
    /// chunks.
    fn hash_files(
        &mut self,
        chunker: &Chunker,
        id_key: &IdKey,
        files: &mut [ManifestFile],
        todo: &[(usize, PathBuf, u64)],
        tx: &SyncSender<(String, Batch)>,
    ) -> Result<u64, ClientError> {
        use rayon::prelude::*;
        let mut batch = Batch::default();
        let mut chunks = 0u64;
        let send = |this: &mut Self, batch: &mut Batch, force: bool| -> Result<(), ClientError> {
            if batch.items.is_empty() || (!force && batch.bytes < BATCH_BYTES) {
                return Ok(());
            }
            let token = this.session()?;
            tx.send((token, std::mem::take(batch))).map_err(|_| ClientError::Local("the upload thread stopped".into()))
        };
        let mut rest = todo;
        while let Some((_, _, size)) = rest.first() {
            if *size >= MMAP_THRESHOLD {
                let (i, path, _) = &rest[0];
                rest = &rest[1..];
                let file = fs::File::open(path).map_err(ClientError::io(path))?;
                // SAFETY: a read-only private map; a file truncated meanwhile
                // raises SIGBUS and stops the backup, as in the CLI.
                let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(ClientError::io(path))?;
                let _ = map.advise(memmap2::Advice::Sequential);
                let map = Arc::new(FileBytes::Mapped(map));
                let mut cuts = chunker.cut_points(&map).peekable();
                let mut ids = Vec::new();
                while cuts.peek().is_some() {
                    let mut window = Vec::new();
                    let mut bytes = 0;
                    while let Some(r) = cuts.next_if(|_| bytes < GROUP_BYTES as usize) {
                        bytes += r.len();
                        window.push(r);
                    }
                    let named: Vec<BlobId> = window.par_iter().map(|r| id_key.blob_id(&map[r.clone()])).collect();
                    for (id, r) in named.iter().zip(window) {
                        batch.add(*id, &map, r);
                    }
                    ids.extend(named);
                    send(self, &mut batch, false)?;
                }
                chunks += ids.len() as u64;
                files[*i].size = map.len() as u64;
                files[*i].chunks = ids;
                continue;
            }
            // Smaller files, up to GROUP_BYTES of them, read and chunked on all cores.
            let mut n = 0;
            let mut bytes = 0;
            while n < rest.len() && rest[n].2 < MMAP_THRESHOLD && (n == 0 || bytes + rest[n].2 <= GROUP_BYTES) {
                bytes += rest[n].2;
                n += 1;
            }
            let (group, tail) = rest.split_at(n);
            rest = tail;
            type Named = (Arc<FileBytes>, Vec<(BlobId, Range<usize>)>);
            let done: Vec<Named> = group
                .par_iter()
                .map(|(_, path, size)| {
                    use std::io::Read;
                    let mut data = Vec::with_capacity(*size as usize);
                    fs::File::open(path).and_then(|mut f| f.read_to_end(&mut data)).map_err(ClientError::io(path))?;
                    let named = chunker.cut_points(&data).map(|r| (id_key.blob_id(&data[r.clone()]), r)).collect();
                    Ok((Arc::new(FileBytes::Read(data)), named))
                })
                .collect::<Result<_, ClientError>>()?;
            for ((i, _, _), (data, named)) in group.iter().zip(done) {
                for (id, r) in &named {
                    batch.add(*id, &data, r.clone());
                }
                chunks += named.len() as u64;
                files[*i].size = data.len() as u64;
                files[*i].chunks = named.into_iter().map(|(id, _)| id).collect();
            }
            send(self, &mut batch, false)?;
        }
        send(self, &mut batch, true)?;
        Ok(chunks)
    }

    /// Restores a snapshot (`latest`, an id or a unique prefix) under
    /// `target`, as the CLI restores it: directories, files, symlinks,
    /// modes and mtimes, with setuid, setgid and sticky bits dropped (they
    /// come from the server) and ownership left to the restoring user. Each
    /// entry is recorded in the journal before it is created, so a wipe
    /// removes exactly what restores wrote. With `allowRestoreToOtherDevice`
    /// off, `latest` is this device's newest snapshot.
    pub fn restore(
        &mut self,
        spec: &str,
        target: &Path,
        include: &[String],
        overwrite: Overwrite,
    ) -> Result<RestoreSummary, ClientError> {
        let mine_only = !self.state.allow_restore_to_other_device;
        let snapshots: Vec<SnapshotInfo> = self
            .snapshots()?
            .into_iter()
            .filter(|s| !mine_only || s.device.as_deref() == Some(self.state.device_id.as_str()))
            .collect();
        let snap = if spec == "latest" {
            snapshots.last()
        } else {
            let found: Vec<_> = snapshots.iter().filter(|s| s.id.to_hex().starts_with(spec)).collect();
            if found.len() > 1 {
                return Err(ClientError::Local(format!("{spec:?} matches several snapshots")));
            }
            found.first().copied()
        }
        .ok_or_else(|| {
            let whose =
                if mine_only { " of this device (policy: no restores of other devices' snapshots)" } else { "" };
            ClientError::Local(format!("no snapshot{whose} matches {spec:?}"))
        })?
        .clone();
        let chunking: Chunking = self.get("/v1/chunking")?;
        let id_key =
            IdKey::from_bytes(crate::id::parse_hex32(&chunking.id_key).map_err(|e| ClientError::Local(e.to_string()))?);
        let RestorePlanResponse { entries, chunks } = self.post(
            &format!("/v1/snapshots/{}/restore-plan", snap.id),
            &RestorePlanRequest { include: include.to_vec() },
        )?;
        let plan = plan_from_wire(entries).map_err(|e| ClientError::Local(e.to_string()))?;
        let token = self.session()?;
        let source = RemoteChunks::new(self.http.clone(), token, snap.id.to_hex(), id_key, chunks);
        let journal = Journal::open(&self.dir).map_err(ClientError::io(&self.dir))?;
        let opts = RestoreOptions { include: Vec::new(), overwrite, strip_special_bits: true, ignore_owner: true };
        let report =
            crate::restore::restore_plan(&plan, &source, target, &opts, Some(&journal), &RestoreProgress::default())
                .map_err(|e| ClientError::Local(e.to_string()))?;
        Ok(RestoreSummary { snapshot: snap.id.to_hex(), report })
    }
}

/// A restore plan from the entries of the storage node's answer (taken
/// apart, not copied: 42,000 entries); every path is checked again (a
/// hostile server cannot name a path outside the target).
pub fn plan_from_wire(entries: Vec<PlanEntry>) -> Result<RestorePlan, crate::restore::RestoreError> {
    let mut plan = RestorePlan::default();
    for e in entries {
        let (kind, type_bits) = match e.kind {
            EntryKind::File => (NodeKind::File { chunks: e.chunks }, 0o100000),
            EntryKind::Dir => (NodeKind::Dir { subtree: BlobId([0; 32]) }, 0o040000),
            EntryKind::Symlink => (NodeKind::Symlink { target: e.target.unwrap_or_default().into_bytes() }, 0o120000),
        };
        let mtime = Timestamp { sec: e.mtime, nsec: e.mtime_nsec.min(999_999_999) };
        let node = Node {
            name: e.path.rsplit('/').next().unwrap_or_default().as_bytes().to_vec(),
            kind,
            mode: type_bits | (e.mode & 0o7777),
            uid: e.uid,
            gid: e.gid,
            mtime,
            ctime: mtime,
            inode: 0,
            size: e.size,
            extra: crate::tree::NodeExtra::default(),
        };
        plan.push(&e.path, node)?;
    }
    Ok(plan)
}

/// What a walk found under one path, in order.
#[derive(Default)]
struct Walked {
    /// Every entry's manifest line; a regular file's also carries its path
    /// and size, to be chunked later.
    entries: Vec<(ManifestFile, Option<(PathBuf, u64)>)>,
    /// Entries that cannot be backed up (special files, unusable names or
    /// link targets).
    skipped: Vec<String>,
}

impl Walked {
    fn extend(&mut self, other: Walked) {
        self.entries.extend(other.entries);
        self.skipped.extend(other.skipped);
    }
}

/// Walks `path` (metadata only, the entries of each directory on all
/// cores), returning its entries in path order.
fn walk(path: &Path) -> Result<Walked, ClientError> {
    use rayon::prelude::*;
    use std::os::unix::fs::MetadataExt;
    let mut walked = Walked::default();
    let meta = fs::symlink_metadata(path).map_err(ClientError::io(path))?;
    let rel = path.to_string_lossy().trim_start_matches('/').to_owned();
    if api::check_manifest_path(&rel).is_err() {
        walked.skipped.push(path.display().to_string());
        return Ok(walked);
    }
    let entry = |kind, target| ManifestFile {
        kind,
        target,
        path: rel.clone(),
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: 0,
        chunks: Vec::new(),
    };
    if meta.is_dir() {
        walked.entries.push((entry(EntryKind::Dir, None), None));
        let mut names: Vec<std::ffi::OsString> = fs::read_dir(path)
            .map_err(ClientError::io(path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(ClientError::io(path))?;
        names.sort_unstable();
        let children: Vec<Walked> = names.par_iter().map(|name| walk(&path.join(name))).collect::<Result<_, _>>()?;
        for child in children {
            walked.extend(child);
        }
    } else if meta.file_type().is_symlink() {
        let target = fs::read_link(path).map_err(ClientError::io(path))?;
        match target.to_str() {
            Some(t) if !t.is_empty() && t.len() <= api::MAX_LINK_TARGET => {
                walked.entries.push((entry(EntryKind::Symlink, Some(t.to_owned())), None))
            }
            _ => walked.skipped.push(path.display().to_string()),
        }
    } else if meta.is_file() {
        walked.entries.push((entry(EntryKind::File, None), Some((path.to_owned(), meta.len()))));
    } else {
        walked.skipped.push(path.display().to_string());
    }
    Ok(walked)
}

/// File bytes that a batch's chunks point into: a file read whole or
/// mapped. Shared, so queueing a chunk copies nothing; only the chunks the
/// server lacks are copied, once, into a bundle.
enum FileBytes {
    Read(Vec<u8>),
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Read(v) => v,
            FileBytes::Mapped(m) => m,
        }
    }
}

/// Named chunks waiting to be checked and uploaded, each once.
#[derive(Default)]
struct Batch {
    items: Vec<(BlobId, Arc<FileBytes>, Range<usize>)>,
    ids: HashSet<BlobId>,
    bytes: usize,
}

impl Batch {
    /// Queues the chunk at `range` of `file` unless this batch has it already.
    fn add(&mut self, id: BlobId, file: &Arc<FileBytes>, range: Range<usize>) {
        if self.ids.insert(id) {
            self.bytes += range.len();
            self.items.push((id, Arc::clone(file), range));
        }
    }
}

/// Chunks going to the server in one `POST /v1/chunks/bundle`: ranges of
/// the files' buffers and maps, read into the HTTP client's send buffer as
/// the request is written, so no copy of the bundle is gathered first.
#[derive(Default)]
struct Bundle {
    frames: Vec<(BlobId, Arc<FileBytes>, Range<usize>)>,
    /// The body's length: every frame's header and bytes.
    len: usize,
    /// Bytes of the read (not mapped) files the frames keep in memory: a
    /// bundle of a few new chunks of many files keeps them all until sent.
    pinned: usize,
}

impl Bundle {
    /// Whether a frame of `data_len` bytes more would take the body past
    /// `MAX_BUNDLE_BODY` (a lone chunk always fits: chunks are smaller),
    /// or the bundle keeps as many bytes of files in memory already.
    fn full_for(&self, data_len: usize) -> bool {
        !self.frames.is_empty()
            && (self.len + BUNDLE_FRAME_HEADER + data_len > MAX_BUNDLE_BODY || self.pinned >= MAX_BUNDLE_BODY)
    }

    fn push(&mut self, id: BlobId, file: &Arc<FileBytes>, range: Range<usize>) {
        // A file's chunks come one after another, so a file is counted once.
        let same_file = self.frames.last().is_some_and(|(_, last, _)| Arc::ptr_eq(last, file));
        if !same_file && matches!(**file, FileBytes::Read(_)) {
            self.pinned += file.len();
        }
        self.len += BUNDLE_FRAME_HEADER + range.len();
        self.frames.push((id, Arc::clone(file), range));
    }

    /// The body, frame by frame (`api::parse_bundle` reads it back).
    fn reader(&self) -> BundleReader<'_> {
        BundleReader { frames: self.frames.iter(), header: [0; BUNDLE_FRAME_HEADER], header_left: 0, data: &[] }
    }
}

/// Reads a [`Bundle`]'s body.
struct BundleReader<'a> {
    frames: std::slice::Iter<'a, (BlobId, Arc<FileBytes>, Range<usize>)>,
    header: [u8; BUNDLE_FRAME_HEADER],
    /// How much of `header` is still to be read (from its end).
    header_left: usize,
    /// What is still to be read of the current frame's chunk.
    data: &'a [u8],
}

impl std::io::Read for BundleReader<'_> {
    /// Fills `buf` as far as the body goes (the client writes each read to
    /// the socket: a read per 36-byte header would be a write per chunk).
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            if self.header_left > 0 {
                let from = &self.header[BUNDLE_FRAME_HEADER - self.header_left..];
                let k = from.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&from[..k]);
                self.header_left -= k;
                n += k;
            } else if !self.data.is_empty() {
                let k = self.data.len().min(buf.len() - n);
                buf[n..n + k].copy_from_slice(&self.data[..k]);
                self.data = &self.data[k..];
                n += k;
            } else if let Some((id, file, range)) = self.frames.next() {
                self.header = api::bundle_frame_header(id, range.len());
                self.header_left = BUNDLE_FRAME_HEADER;
                self.data = &file[range.clone()];
            } else {
                break;
            }
        }
        Ok(n)
    }
}

/// What the uploader sent.
#[derive(Clone, Copy, Default)]
struct Sent {
    chunks: u64,
    bytes: u64,
}

/// Uploads the batches arriving on `batches`: asks which chunks of each the
/// server lacks (in queries of at most `MAX_MISSING_QUERY` ids) and sends
/// those in bundles of at most `MAX_BUNDLE_BODY` bytes over
/// [`BUNDLES_IN_FLIGHT`] connections. The next batch is queried while the
/// bundles of the one before are still in flight, so the server is not left
/// idle for a round trip at every batch. Returns the first error.
fn upload(http: &Http, batches: Receiver<(String, Batch)>) -> Result<Sent, ClientError> {
    // One bundle waits while BUNDLES_IN_FLIGHT are sent: the chunks held
    // here stay within (BUNDLES_IN_FLIGHT + 2) bundles.
    let (bundle_tx, bundle_rx) = sync_channel::<(String, Bundle)>(1);
    let bundle_rx = Mutex::new(bundle_rx);
    let failed = Mutex::new(None);
    let fail = |e: ClientError| {
        failed.lock().expect("error lock").get_or_insert(e);
    };
    let has_failed = || failed.lock().expect("error lock").is_some();
    let mut sent = Sent::default();
    std::thread::scope(|s| {
        for _ in 0..BUNDLES_IN_FLIGHT {
            s.spawn(|| {
                loop {
                    // The lock only for taking a bundle: held by a `while let`
                    // scrutinee it would last through the upload, and the
                    // workers would send one bundle at a time.
                    let next = bundle_rx.lock().expect("bundle lock").recv();
                    let Ok((token, bundle)) = next else { break };
                    // After a failure the rest is only drained, so that the
                    // producer never blocks on a full channel.
                    if !has_failed() {
                        let len = bundle.len as u64;
                        let r =
                            http.post_body::<BundleResponse, _>("/v1/chunks/bundle", &token, len, || bundle.reader());
                        if let Err(e) = r {
                            fail(e);
                        }
                    }
                }
            });
        }
        for (token, batch) in batches {
            if has_failed() {
                break;
            }
            let missing = match ask_missing(http, &token, &batch) {
                Ok(missing) => missing,
                Err(e) => {
                    fail(e);
                    break;
                }
            };
            let mut bundle = Bundle::default();
            for (id, file, range) in batch.items.iter().filter(|(id, _, _)| missing.contains(id)) {
                if bundle.full_for(range.len()) {
                    // Fails only when every worker is gone, which the error check covers.
                    let _ = bundle_tx.send((token.clone(), std::mem::take(&mut bundle)));
                }
                bundle.push(*id, file, range.clone());
                sent.chunks += 1;
                sent.bytes += range.len() as u64;
            }
            if !bundle.frames.is_empty() {
                let _ = bundle_tx.send((token, bundle));
            }
        }
        drop(bundle_tx);
    });
    match failed.into_inner().expect("error lock") {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}

/// The chunks of `batch` the server lacks.
fn ask_missing(http: &Http, token: &str, batch: &Batch) -> Result<HashSet<BlobId>, ClientError> {
    let ids: Vec<BlobId> = batch.items.iter().map(|(id, _, _)| *id).collect();
    let mut missing = HashSet::new();
    for part in ids.chunks(MAX_MISSING_QUERY) {
        let answer: MissingResponse =
            http.post("/v1/chunks/missing", Some(token), &MissingRequest { chunks: part.to_vec() })?;
        missing.extend(answer.missing);
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A bare HTTP/1.1 server for `upload`: every chunk is missing, and
    /// no bundle is answered until `together` bundle requests are open at
    /// once (or 5 s passed: then 500, and the upload fails).
    fn bundle_server(together: usize) -> String {
        use std::io::{BufRead, BufReader, Read, Write};
        use std::sync::Condvar;
        use std::time::Duration;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let open = Arc::new((Mutex::new(0usize), Condvar::new()));
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let open = open.clone();
                std::thread::spawn(move || {
                    let mut conn = BufReader::new(conn.unwrap());
                    loop {
                        let (mut line, mut len) = (String::new(), 0usize);
                        if conn.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                        loop {
                            let mut h = String::new();
                            conn.read_line(&mut h).unwrap();
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                                len = v.trim().parse().unwrap();
                            }
                            if h == "\r\n" {
                                break;
                            }
                        }
                        let mut body = vec![0; len];
                        conn.read_exact(&mut body).unwrap();
                        let (status, reply) = if path == "/v1/chunks/missing" {
                            let req: MissingRequest = serde_json::from_slice(&body).unwrap();
                            (200, serde_json::to_vec(&MissingResponse { missing: req.chunks }).unwrap())
                        } else {
                            let (count, arrived) = &*open;
                            let mut n = count.lock().unwrap();
                            *n += 1;
                            arrived.notify_all();
                            let wait = Duration::from_secs(5);
                            let (n, _) = arrived.wait_timeout_while(n, wait, |n| *n < together).unwrap();
                            let status = if *n >= together { 200 } else { 500 };
                            (status, br#"{"stored":1,"deduplicated":0}"#.to_vec())
                        };
                        let head = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            reply.len()
                        );
                        let out = conn.get_mut();
                        out.write_all(head.as_bytes()).and_then(|()| out.write_all(&reply)).unwrap();
                    }
                });
            }
        });
        url
    }

    #[test]
    fn bundles_are_sent_several_at_once() {
        // Three chunks of 4 MiB make three bundles; a server that answers
        // none until two are open at once sees them only if the workers
        // send concurrently.
        let file = Arc::new(FileBytes::Read(vec![7; 12 << 20]));
        let mut batch = Batch::default();
        for i in 0..3u8 {
            batch.add(BlobId([i; 32]), &file, usize::from(i) * (4 << 20)..usize::from(i + 1) * (4 << 20));
        }
        let (tx, rx) = sync_channel(1);
        tx.send(("token".to_owned(), batch)).unwrap();
        drop(tx);
        let sent = upload(&Http::new(&bundle_server(2)), rx).unwrap();
        assert_eq!((sent.chunks, sent.bytes), (3, 12 << 20));
    }

    #[test]
    fn managed_config_keys_and_defaults() {
        let c = ManagedConfig::parse(
            br#"{"serverURL":"http://h:1","userEmail":"a@b.c","deploymentToken":"t","allowOpenIn":false,"allowInsecureHttp":true}"#,
        )
        .unwrap();
        assert_eq!(c.server_url, "http://h:1");
        assert!(c.allow_restore_to_other_device);
        assert!(!c.allow_open_in);
        assert_eq!(c.device_id, None);
        assert!(ManagedConfig::parse(br#"{"serverURL":"ftp://h","userEmail":"a@b.c","deploymentToken":"t"}"#).is_err());
        assert!(ManagedConfig::parse(
            br#"{"serverURL":"http://h","userEmail":"a@b.c","deploymentToken":"t","deviceId":"a/b"}"#
        )
        .is_err());
    }

    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let cfg = |url: &str, extra: &str| {
            ManagedConfig::parse(
                format!(r#"{{"serverURL":"{url}","userEmail":"a@b.c","deploymentToken":"t"{extra}}}"#).as_bytes(),
            )
        };
        for ok in ["http://127.0.0.1:8080", "http://127.1.2.3/x", "http://[::1]:1", "http://localhost", "https://h"] {
            cfg(ok, "").unwrap();
        }
        for bad in
            ["http://h:1", "http://10.0.0.1", "http://127.0.0.1@evil", "http://localhost.evil.com", "http://[::2]"]
        {
            let e = cfg(bad, "").unwrap_err().to_string();
            assert!(e.contains("allowInsecureHttp"), "{bad}: {e}");
        }
        cfg("http://h:1", r#","allowInsecureHttp":true"#).unwrap();
    }

    #[test]
    fn ca_certificate_is_checked_and_bounded() {
        let cfg = |pem: &str| {
            let v = serde_json::json!({"serverURL":"https://h","userEmail":"a@b.c","deploymentToken":"t","caCertificate":pem});
            ManagedConfig::parse(&serde_json::to_vec(&v).unwrap())
        };
        assert!(cfg("not a pem").unwrap_err().to_string().contains("no `BEGIN CERTIFICATE`"));
        let junk = format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", "QUJD".repeat(10));
        assert!(cfg(&junk).is_err());
        let big = "A".repeat(crate::tls::MAX_CA_PEM + 1);
        assert!(cfg(&big).unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn batch_dedups_by_id() {
        let file = Arc::new(FileBytes::Read(b"samesameother".to_vec()));
        let mut b = Batch::default();
        b.add(BlobId([1; 32]), &file, 0..4);
        b.add(BlobId([1; 32]), &file, 4..8);
        b.add(BlobId([2; 32]), &file, 8..13);
        assert_eq!((b.items.len(), b.bytes), (2, 9));
        assert_eq!(&b.items[1].1[b.items[1].2.clone()], b"other");
    }

    #[test]
    fn a_bundle_of_small_chunks_of_many_files_is_cut_by_what_it_keeps_in_memory() {
        let big = Arc::new(FileBytes::Read(vec![7; MAX_BUNDLE_BODY / 4]));
        let others: Vec<_> = (0..5).map(|_| Arc::clone(&big)).map(|b| Arc::new(FileBytes::Read(b.to_vec()))).collect();
        let mut bundle = Bundle::default();
        // Two chunks of one file count it once.
        bundle.push(BlobId([1; 32]), &big, 0..10);
        bundle.push(BlobId([2; 32]), &big, 10..20);
        assert_eq!(bundle.pinned, MAX_BUNDLE_BODY / 4);
        for (i, f) in others.iter().take(3).enumerate() {
            assert!(!bundle.full_for(10), "after {i} more files");
            bundle.push(BlobId([3 + i as u8; 32]), f, 0..10);
        }
        // 50 bytes of chunks, but four quarters of MAX_BUNDLE_BODY held.
        assert!(bundle.full_for(10));
        assert_eq!(bundle.len, 5 * (BUNDLE_FRAME_HEADER + 10));
    }

    #[test]
    fn a_hostile_restore_plan_cannot_leave_the_target() {
        let entry = |path: &str| PlanEntry {
            path: path.into(),
            kind: EntryKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            chunks: Vec::new(),
            target: None,
        };
        for bad in ["../x", "/etc/passwd", "a/../../x", "a//b", "", "a/./b", "nul\0byte"] {
            assert!(plan_from_wire(vec![entry(bad)]).is_err(), "{bad:?}");
        }
        assert_eq!(
            plan_from_wire(vec![entry("home/me/ok.txt")]).unwrap().files[0].rel,
            PathBuf::from("home/me/ok.txt")
        );
    }

    proptest! {
        /// A bundle read in any size of reads is the body `push_bundle_frame`
        /// builds, and parses back to its chunks.
        #[test]
        fn a_bundle_reads_as_its_frames(
            files in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
            cuts in prop::collection::vec((0usize..6, 0usize..300, 0usize..300), 1..20),
            read_size in 1usize..100,
        ) {
            use std::io::Read;
            let files: Vec<Arc<FileBytes>> = files.into_iter().map(|f| Arc::new(FileBytes::Read(f))).collect();
            let mut bundle = Bundle::default();
            let mut expected = Vec::new();
            for (n, (f, a, b)) in cuts.into_iter().enumerate() {
                let file = &files[f % files.len()];
                let (a, b) = (a.min(b).min(file.len()), a.max(b).min(file.len()));
                let id = BlobId([n as u8; 32]);
                api::push_bundle_frame(&mut expected, &id, &file[a..b]);
                bundle.push(id, file, a..b);
            }
            prop_assert_eq!(bundle.len, expected.len());
            let mut reader = bundle.reader();
            let mut body = Vec::new();
            let mut buf = vec![0u8; read_size];
            loop {
                let n = reader.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                // Every read but the last fills the buffer.
                prop_assert!(n == read_size || body.len() + n == expected.len());
                body.extend_from_slice(&buf[..n]);
            }
            prop_assert_eq!(&body, &expected);
            let parsed = api::parse_bundle(&body, 1 << 20).unwrap();
            prop_assert_eq!(parsed.len(), bundle.frames.len());
        }

        #[test]
        fn managed_config_parse_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = ManagedConfig::parse(&bytes);
        }

        #[test]
        fn managed_config_roundtrip(email in "[a-z]{1,8}@[a-z]{1,8}\\.com", id in proptest::option::of("[a-z0-9]{1,16}"), r in any::<bool>()) {
            let c = ManagedConfig {
                server_url: "https://backup.example.com".into(),
                user_email: email,
                deployment_token: "cvdt_x".into(),
                allow_restore_to_other_device: r,
                allow_open_in: !r,
                ca_certificate: None,
                allow_insecure_http: r,
                device_id: id,
            };
            prop_assert_eq!(ManagedConfig::parse(&serde_json::to_vec(&c).unwrap()).unwrap(), c);
        }
    }
}
