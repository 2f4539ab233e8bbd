//! Getting data out of a snapshot as a stream: one file's bytes, or a
//! directory as a tar or zip archive (`dump`).
//!
//! Files are read through [`FileReader`] (the one blob read path, a bounded
//! window at a time), so a dump's memory is bounded whatever the file's
//! size; every chunk is verified against its id, as on restore. Directories
//! are walked by [`tree::walk`](crate::tree::walk).

use std::collections::HashMap;
use std::io::{self, Write};

use crate::repo::{RepoError, Repository};
use crate::restore::{FileReader, RestoreError};
use crate::tree::{walk, Node, NodeKind};

/// Why a dump failed.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    /// A tree or chunk could not be read.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Output(io::Error),
    /// The zip writer failed.
    #[error("writing the zip archive: {0}")]
    Zip(#[from] zip::result::ZipError),
}

/// Archive formats of a directory dump.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Archive {
    /// POSIX tar (PAX headers carry extended attributes): hard links,
    /// symlinks, fifos and devices as such.
    Tar,
    /// Zip (deflate): files, directories and symlinks; fifos and devices
    /// are left out (zip has no such entries).
    Zip,
}

/// Entries of a dump that the archive format cannot hold, with why.
pub type LeftOut = Vec<(String, &'static str)>;

/// Writes `node` (a directory with all below it, or one file), named `name`
/// in the archive, as an archive to `out`. Returns what was left out.
pub fn dump_archive(
    repo: &Repository,
    node: &Node,
    name: &str,
    format: Archive,
    out: impl Write,
) -> Result<LeftOut, DumpError> {
    let mut left_out = Vec::new();
    match format {
        Archive::Tar => {
            let mut tar = TarDump { repo, builder: tar::Builder::new(out), links: HashMap::new() };
            for_each_entry(repo, node, name, |path, node| tar.entry(path, node, &mut left_out))?;
            tar.builder.into_inner().map_err(DumpError::Output)?;
        }
        Archive::Zip => {
            let mut zip = zip::ZipWriter::new_stream(out);
            for_each_entry(repo, node, name, |path, node| zip_entry(repo, &mut zip, path, node, &mut left_out))?;
            zip.finish()?;
        }
    }
    Ok(left_out)
}

/// Calls `f` with `node` (named `name`) and, for a directory, every entry
/// below it in walk order (a directory right before its contents), each
/// with its path in the archive.
fn for_each_entry(
    repo: &Repository,
    node: &Node,
    name: &str,
    mut f: impl FnMut(&str, &Node) -> Result<(), DumpError>,
) -> Result<(), DumpError> {
    f(name, node)?;
    if let NodeKind::Dir { subtree } = &node.kind {
        for entry in walk(repo, subtree) {
            let (rel, child) = entry.map_err(|e| e.source)?;
            f(&format!("{name}/{}", rel.to_string_lossy()), &child)?;
        }
    }
    Ok(())
}

/// Opens `node`'s content for an archive entry.
fn content<'r>(repo: &'r Repository, node: &Node) -> Result<FileReader<'r>, DumpError> {
    FileReader::new(repo, node, None).map_err(|e| match e {
        RestoreError::Repo(e) => DumpError::Repo(e),
        other => DumpError::Output(io::Error::other(other)),
    })
}

struct TarDump<'r, W: Write> {
    repo: &'r Repository,
    builder: tar::Builder<W>,
    /// The archive path of the first entry of each hard-linked inode.
    links: HashMap<(u64, u64), String>,
}

impl<W: Write> TarDump<'_, W> {
    fn entry(&mut self, path: &str, node: &Node, left_out: &mut LeftOut) -> Result<(), DumpError> {
        use tar::EntryType;
        let out = DumpError::Output;
        let mut h = tar::Header::new_ustar();
        h.set_mode(node.mode & 0o7777);
        h.set_uid(u64::from(node.uid));
        h.set_gid(u64::from(node.gid));
        h.set_mtime(node.mtime.sec.max(0) as u64);
        // Names longer than ustar's 32 bytes are dropped rather than failing the dump.
        let _ = h.set_username(&node.extra.user);
        let _ = h.set_groupname(&node.extra.group);
        h.set_size(0);
        if !node.extra.xattrs.is_empty() {
            let keys: Vec<(String, &[u8])> = node
                .extra
                .xattrs
                .iter()
                .map(|x| (format!("SCHILY.xattr.{}", String::from_utf8_lossy(&x.name)), x.value.as_slice()))
                .collect();
            self.builder.append_pax_extensions(keys.iter().map(|(k, v)| (k.as_str(), *v))).map_err(out)?;
        }
        match &node.kind {
            NodeKind::Dir { .. } => {
                h.set_entry_type(EntryType::Directory);
                self.builder.append_data(&mut h, format!("{path}/"), io::empty()).map_err(out)?;
            }
            NodeKind::File { .. } => {
                let key = (node.extra.links > 1).then_some((node.extra.device, node.inode));
                if let Some(first) = key.and_then(|k| self.links.get(&k)) {
                    h.set_entry_type(EntryType::Link);
                    self.builder.append_link(&mut h, path, first).map_err(out)?;
                    return Ok(());
                }
                if let Some(k) = key {
                    self.links.insert(k, path.to_owned());
                }
                h.set_entry_type(EntryType::Regular);
                h.set_size(node.size);
                self.builder.append_data(&mut h, path, content(self.repo, node)?).map_err(out)?;
            }
            NodeKind::Symlink { target } => {
                h.set_entry_type(EntryType::Symlink);
                let target = String::from_utf8_lossy(target).into_owned();
                self.builder.append_link(&mut h, path, target).map_err(out)?;
            }
            NodeKind::Special { rdev } => {
                let ty = match node.type_name() {
                    "fifo" => EntryType::Fifo,
                    "chardev" => EntryType::Char,
                    "blockdev" => EntryType::Block,
                    _ => {
                        left_out.push((path.to_owned(), "a socket has no tar entry"));
                        return Ok(());
                    }
                };
                h.set_entry_type(ty);
                let (major, minor) = (libc::major(*rdev as libc::dev_t), libc::minor(*rdev as libc::dev_t));
                h.set_device_major(major).map_err(out)?;
                h.set_device_minor(minor).map_err(out)?;
                self.builder.append_data(&mut h, path, io::empty()).map_err(out)?;
            }
        }
        Ok(())
    }
}

fn zip_entry<W: Write>(
    repo: &Repository,
    zip: &mut zip::ZipWriter<zip::write::StreamWriter<W>>,
    path: &str,
    node: &Node,
    left_out: &mut LeftOut,
) -> Result<(), DumpError> {
    let mtime = chrono::DateTime::from_timestamp(node.mtime.sec, node.mtime.nsec)
        .and_then(|t| {
            use chrono::{Datelike, Timelike};
            zip::DateTime::from_date_and_time(
                u16::try_from(t.year()).ok()?,
                t.month() as u8,
                t.day() as u8,
                t.hour() as u8,
                t.minute() as u8,
                t.second() as u8,
            )
            .ok()
        })
        .unwrap_or_default();
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .unix_permissions(node.mode & 0o7777)
        .last_modified_time(mtime)
        .large_file(node.size >= u64::from(u32::MAX));
    match &node.kind {
        NodeKind::Dir { .. } => zip.add_directory(format!("{path}/"), opts)?,
        NodeKind::File { .. } => {
            zip.start_file(path, opts)?;
            io::copy(&mut content(repo, node)?, zip).map_err(DumpError::Output)?;
        }
        NodeKind::Symlink { target } => {
            zip.add_symlink(path, String::from_utf8_lossy(target), opts)?;
        }
        NodeKind::Special { .. } => left_out.push((path.to_owned(), "zip has no fifo, socket or device entries")),
    }
    Ok(())
}
