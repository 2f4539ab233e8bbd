//! Tree blobs: the listing of one directory.
//!
//! A snapshot points at the tree of its root directory; each directory node
//! points at the tree of that subdirectory, and each file node lists the
//! chunks of the file's content in order. Trees are stored as blobs of kind
//! [`BlobKind::Tree`](crate::id::BlobKind), so equal directories deduplicate
//! like equal chunks do.
//!
//! # Format
//!
//! All integers are little-endian. A tree is:
//!
//! | field      | size | meaning                            |
//! |------------|------|------------------------------------|
//! | magic      | 4    | `b"CVTR"`                          |
//! | version    | 1    | `1`, or `2` (see below)            |
//! | node_count | 4    | u32, number of nodes that follow   |
//!
//! followed by `node_count` nodes, each:
//!
//! | field      | size     | meaning                                   |
//! |------------|----------|-------------------------------------------|
//! | kind       | 1        | `1` file, `2` directory, `3` symlink, `4` special (version 2) |
//! | name_len   | 2        | u16                                       |
//! | name       | name_len | one path component (see [`validate_name`])|
//! | mode       | 4        | u32, `st_mode`                            |
//! | uid        | 4        | u32                                       |
//! | gid        | 4        | u32                                       |
//! | mtime sec  | 8        | i64, seconds since the Unix epoch         |
//! | mtime nsec | 4        | u32, below 1 000 000 000                  |
//! | ctime sec  | 8        | i64                                       |
//! | ctime nsec | 4        | u32, below 1 000 000 000                  |
//! | inode      | 8        | u64                                       |
//! | size       | 8        | u64, content length in bytes              |
//!
//! and then, by kind:
//!
//! * file: `chunk_count` u32, then `chunk_count` 32-byte chunk blob ids;
//! * directory: the 32-byte blob id of the subdirectory's tree;
//! * symlink: `target_len` u16, then the target bytes;
//! * special (a fifo, socket or device; which one is `mode`'s file type):
//!   `rdev` u64, the device number.
//!
//! In version 2 every node then carries its [`NodeExtra`]:
//!
//! | field        | size      | meaning                                        |
//! |--------------|-----------|------------------------------------------------|
//! | user_len     | 2         | u16, at most 4096                              |
//! | user         | user_len  | owner's user name (UTF-8, empty if unknown)    |
//! | group_len    | 2         | u16, at most 4096                              |
//! | group        | group_len | owner's group name (UTF-8, empty if unknown)   |
//! | device       | 8         | u64, `st_dev` of a file with hard links, else 0|
//! | links        | 8         | u64, `st_nlink` of a file with hard links, else 0 |
//! | xattr_count  | 2         | u16                                            |
//!
//! and `xattr_count` extended attributes, strictly increasing by name, each
//! `name_len` u8 (1 to 255), the name, `value_len` u32 (at most 65 536) and
//! the value. A tree is written as version 1 when no node has extra metadata
//! and none is special, so trees of older backups keep their encoding (and
//! their ids, so they still deduplicate), and version 2 otherwise; a version 2
//! tree that could have been version 1 is refused, which keeps one encoding.
//!
//! Nodes appear in strictly increasing order of their name bytes, so names
//! are unique, a lookup is a binary search, and every tree has exactly one
//! encoding (equal directories give equal blob ids). Nothing may follow the
//! last node.
//!
//! Tree bytes come from storage and are treated as hostile: [`Tree::decode`]
//! checks every count against the bytes that remain before allocating for
//! it, refuses anything over [`MAX_TREE_SIZE`], and never panics.

use std::os::unix::ffi::OsStrExt;

use crate::id::BlobId;
use crate::wire::{put_u32_len, Reader, Truncated};

/// Largest encoded tree accepted (decode refuses more).
///
/// [`Tree::new`] refuses to build a tree whose encoding would be larger, so
/// every tree that can be built can also be read back.
pub const MAX_TREE_SIZE: usize = 64 << 20;

/// Longest name, and longest symlink target, in bytes (Linux's `PATH_MAX`).
const MAX_NAME_LEN: usize = 4096;
const MAX_TARGET_LEN: usize = 4096;

const MAGIC: &[u8; 4] = b"CVTR";
/// The format without [`NodeExtra`] and special nodes.
const VERSION_1: u8 = 1;
/// The format with [`NodeExtra`] on every node and special nodes.
const VERSION_2: u8 = 2;

const KIND_FILE: u8 = 1;
const KIND_DIR: u8 = 2;
const KIND_SYMLINK: u8 = 3;
const KIND_SPECIAL: u8 = 4;

/// Longest user or group name, in bytes.
const MAX_OWNER_NAME_LEN: usize = 4096;
/// Longest extended attribute name (Linux's `XATTR_NAME_MAX`).
const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest extended attribute value (Linux's `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE_LEN: usize = 65536;
/// user_len, group_len, device, links, xattr_count.
const EXTRA_FIXED_LEN: usize = 2 + 2 + 8 + 8 + 2;

/// magic, version, node_count.
const HEADER_LEN: usize = 4 + 1 + 4;
/// A node without its name and kind-specific payload: kind, name_len, mode,
/// uid, gid, mtime, ctime, inode, size.
const NODE_FIXED_LEN: usize = 1 + 2 + 4 + 4 + 4 + (8 + 4) + (8 + 4) + 8 + 8;
/// The smallest possible node: a one-byte name and an empty symlink target.
const MIN_NODE_LEN: usize = NODE_FIXED_LEN + 1 + 2;
const ID_LEN: usize = 32;

/// A point in time with nanosecond precision, as `stat` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Timestamp {
    /// Seconds since the Unix epoch (negative before 1970).
    pub sec: i64,
    /// Nanoseconds within the second; always below 1 000 000 000 in a tree.
    pub nsec: u32,
}

impl Timestamp {
    fn is_valid(self) -> bool {
        self.nsec < 1_000_000_000
    }
}

/// What a node is, with what only that kind of node has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A regular file: its content is these chunks concatenated, in order.
    File {
        /// Data blob ids in file order; empty for an empty file. A chunk
        /// may repeat.
        chunks: Vec<BlobId>,
    },
    /// A directory: its listing is the tree blob `subtree`.
    Dir {
        /// The tree blob listing the directory.
        subtree: BlobId,
    },
    /// A symbolic link to `target` (raw bytes, never followed on restore).
    Symlink {
        /// The link's target, at most 4096 bytes without NUL; may be absolute
        /// or contain `..`.
        target: Vec<u8>,
    },
    /// A fifo, socket, or character or block device (`mode` says which);
    /// `rdev` is the device number of a device, 0 otherwise.
    Special {
        /// `st_rdev`: the device number of a device node, 0 for a fifo or socket.
        rdev: u64,
    },
}

/// One extended attribute: its full name (`user.comment`) and raw value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    /// The name with its namespace, 1 to 255 bytes without NUL.
    pub name: Vec<u8>,
    /// The value, at most [`MAX_XATTR_VALUE_LEN`] bytes.
    pub value: Vec<u8>,
}

/// Metadata beyond `stat`'s numbers, all optional: trees written before it
/// existed decode with the default (empty) value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeExtra {
    /// The owner's user name at backup time (empty when unknown).
    pub user: String,
    /// The owner's group name at backup time (empty when unknown).
    pub group: String,
    /// `st_dev` of a regular file with more than one link (0 otherwise):
    /// with the inode it tells which files of a snapshot are one file.
    pub device: u64,
    /// `st_nlink` of a regular file with more than one link (0 otherwise).
    pub links: u64,
    /// Extended attributes, sorted by name ([`Tree::new`] sorts them).
    pub xattrs: Vec<Xattr>,
}

impl NodeExtra {
    fn is_empty(&self) -> bool {
        *self == NodeExtra::default()
    }

    fn encoded_len(&self) -> usize {
        self.xattrs.iter().fold(EXTRA_FIXED_LEN + self.user.len() + self.group.len(), |acc, x| {
            acc.saturating_add(1 + x.name.len() + 4 + x.value.len())
        })
    }

    /// Checks lengths, and that attribute names are sorted and unique.
    fn validate(&self, node: &[u8]) -> Result<(), TreeError> {
        if self.user.len() > MAX_OWNER_NAME_LEN || self.group.len() > MAX_OWNER_NAME_LEN {
            return Err(TreeError::BadExtra(escape(node), "user or group name longer than 4096 bytes"));
        }
        if self.xattrs.len() > usize::from(u16::MAX) {
            return Err(TreeError::BadExtra(escape(node), "more than 65535 extended attributes"));
        }
        for x in &self.xattrs {
            if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME_LEN || x.name.contains(&0) {
                return Err(TreeError::BadExtra(
                    escape(node),
                    "extended attribute name not 1 to 255 bytes without NUL",
                ));
            }
            if x.value.len() > MAX_XATTR_VALUE_LEN {
                return Err(TreeError::BadExtra(escape(node), "extended attribute value over 64 KiB"));
            }
        }
        if self.xattrs.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(TreeError::BadExtra(escape(node), "extended attributes not sorted and unique"));
        }
        Ok(())
    }

    fn encode(&self, out: &mut Vec<u8>) {
        for s in [&self.user, &self.group] {
            put_u16_len(out, s.len());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.device.to_le_bytes());
        out.extend_from_slice(&self.links.to_le_bytes());
        put_u16_len(out, self.xattrs.len());
        for x in &self.xattrs {
            out.push(u8::try_from(x.name.len()).expect("validated to at most 255 bytes"));
            out.extend_from_slice(&x.name);
            put_u32_len(out, x.value.len());
            out.extend_from_slice(&x.value);
        }
    }

    fn decode(r: &mut Reader<'_>, node: &[u8]) -> Result<NodeExtra, TreeError> {
        let mut owner = || -> Result<String, TreeError> {
            let len = r.u16()?;
            let bytes = r.take(usize::from(len))?;
            String::from_utf8(bytes.to_vec()).map_err(|_| TreeError::BadExtra(escape(node), "owner name not UTF-8"))
        };
        let user = owner()?;
        let group = owner()?;
        let device = r.u64()?;
        let links = r.u64()?;
        let count = r.u16()?;
        // Each attribute takes at least 6 bytes: bound the allocation by what remains.
        if usize::from(count) > r.remaining() / 6 {
            return Err(TreeError::BadExtra(escape(node), "more extended attributes than bytes"));
        }
        let mut xattrs = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let name_len = r.u8()?;
            let name = r.take(usize::from(name_len))?.to_vec();
            let value_len = r.u32()? as usize;
            if value_len > MAX_XATTR_VALUE_LEN {
                return Err(TreeError::BadExtra(escape(node), "extended attribute value over 64 KiB"));
            }
            let value = r.take(value_len)?.to_vec();
            xattrs.push(Xattr { name, value });
        }
        let extra = NodeExtra { user, group, device, links, xattrs };
        extra.validate(node)?;
        Ok(extra)
    }
}

/// One entry of a directory with the metadata restore needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// One path component (see [`validate_name`]), raw bytes as on disk.
    pub name: Vec<u8>,
    /// What the entry is, with its content (chunks, subtree, target, rdev).
    pub kind: NodeKind,
    /// `st_mode`: file type and permission bits.
    pub mode: u32,
    /// Numeric owner at backup time; restore sets it when run as root
    /// (unless told to ignore owners).
    pub uid: u32,
    /// Numeric group at backup time; restored like `uid`.
    pub gid: u32,
    /// Last content modification (`st_mtime`), restored on the entry.
    pub mtime: Timestamp,
    /// Last status change (`st_ctime`); not restorable, kept so the next
    /// backup can tell a file unchanged.
    pub ctime: Timestamp,
    /// The inode number at backup time (lets the next backup spot unchanged files).
    pub inode: u64,
    /// Content length in bytes (0 for directories and symlinks by convention).
    pub size: u64,
    /// Owner names, hard link identity and extended attributes.
    pub extra: NodeExtra,
}

impl Node {
    /// Whether this node is a directory.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, NodeKind::Dir { .. })
    }

    /// Whether this node is a regular file.
    pub fn is_file(&self) -> bool {
        matches!(self.kind, NodeKind::File { .. })
    }

    /// What this node is, as `ls` and `find` print it: `file`, `dir`,
    /// `symlink`, `fifo`, `socket`, `chardev` or `blockdev`.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            NodeKind::File { .. } => "file",
            NodeKind::Dir { .. } => "dir",
            NodeKind::Symlink { .. } => "symlink",
            NodeKind::Special { .. } => match self.mode & libc::S_IFMT {
                libc::S_IFIFO => "fifo",
                libc::S_IFSOCK => "socket",
                libc::S_IFCHR => "chardev",
                libc::S_IFBLK => "blockdev",
                _ => "special",
            },
        }
    }

    /// The name as text, invalid UTF-8 replaced by U+FFFD (for display and
    /// for building display paths, never for touching the filesystem).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// Whether this node needs format version 2.
    fn needs_v2(&self) -> bool {
        matches!(self.kind, NodeKind::Special { .. }) || !self.extra.is_empty()
    }

    /// Bytes this node takes in the encoding of `version`.
    fn encoded_len(&self, version: u8) -> usize {
        let payload = match &self.kind {
            NodeKind::File { chunks } => 4 + ID_LEN.saturating_mul(chunks.len()),
            NodeKind::Dir { .. } => ID_LEN,
            NodeKind::Symlink { target } => 2 + target.len(),
            NodeKind::Special { .. } => 8,
        };
        let extra = if version == VERSION_2 { self.extra.encoded_len() } else { 0 };
        NODE_FIXED_LEN.saturating_add(self.name.len()).saturating_add(payload).saturating_add(extra)
    }

    /// Checks what the format requires of one node on its own.
    fn validate(&self) -> Result<(), TreeError> {
        validate_name(&self.name)?;
        if !self.mtime.is_valid() || !self.ctime.is_valid() {
            return Err(TreeError::BadTimestamp(escape(&self.name)));
        }
        if let NodeKind::Symlink { target } = &self.kind {
            validate_target(target)?;
        }
        self.extra.validate(&self.name)
    }
}

/// Why a tree cannot be built or decoded.
#[derive(Debug, thiserror::Error)]
///
/// Names and values inside the variants are escaped and cut to 100 bytes:
/// they come from hostile input and are safe to print.
pub enum TreeError {
    /// The bytes end inside a field.
    #[error("tree is truncated")]
    Truncated,
    /// The first four bytes are not `CVTR`.
    #[error("not a tree (bad magic bytes)")]
    BadMagic,
    /// The version byte (given) is neither 1 nor 2.
    #[error("unsupported tree format version {0}")]
    UnsupportedVersion(u8),
    /// A node's kind byte (given) is not 1 to 4 (4 only in version 2).
    #[error("unknown node kind {0}")]
    BadKind(u8),
    /// A name that is not one path component (see [`validate_name`]).
    /// Restore relies on this to never write outside its target.
    #[error("invalid name \"{0}\": a name is one path component of 1 to 4096 bytes, not \".\" or \"..\", without '/' or NUL")]
    InvalidName(String),
    /// A symlink target over 4096 bytes or holding a NUL.
    #[error("invalid symlink target \"{0}\": a target is at most 4096 bytes without NUL")]
    InvalidSymlinkTarget(String),
    /// Two nodes share this name.
    #[error("the name \"{0}\" appears more than once")]
    DuplicateName(String),
    /// Decoding: this node's name is smaller than the one before it.
    #[error("nodes are not sorted by name (\"{0}\" is out of order)")]
    NotSorted(String),
    /// The encoding (its length in bytes given) is over [`MAX_TREE_SIZE`]:
    /// refused by [`Tree::new`] as well as by [`Tree::decode`].
    #[error("tree of {0} bytes is larger than the limit of {MAX_TREE_SIZE} bytes")]
    TooLarge(usize),
    /// Bytes (how many given) follow the last node.
    #[error("{0} bytes follow the last node")]
    TrailingBytes(usize),
    /// The named node's mtime or ctime has `nsec` of one second or more.
    #[error("node \"{0}\" has a timestamp with 1 000 000 000 or more nanoseconds")]
    BadTimestamp(String),
    /// The node count cannot fit in the bytes left (checked before allocating).
    #[error("tree claims {count} nodes but only {remaining} bytes follow")]
    TooManyNodes {
        /// Nodes the tree claims.
        count: u32,
        /// Bytes left after the count.
        remaining: usize,
    },
    /// A file's chunk count cannot fit in the bytes left (checked before allocating).
    #[error("file claims {count} chunks but only {remaining} bytes follow")]
    TooManyChunks {
        /// Chunks the file node claims.
        count: u32,
        /// Bytes left after the count.
        remaining: usize,
    },
    /// The named node's [`NodeExtra`] breaks a rule (lengths, UTF-8 owner
    /// names, sorted unique attribute names); the text says which.
    #[error("node \"{0}\": {1}")]
    BadExtra(String, &'static str),
    /// A version 2 tree that version 1 could hold: refused so that every
    /// tree has exactly one encoding (and one id).
    #[error("a version 2 tree without anything that needs version 2 (not canonical)")]
    NotCanonical,
}

/// A name is one path component: non-empty, at most 4096 bytes, not "." or
/// "..", no '/' and no NUL.
///
/// Restore joins names onto a target directory, so anything else could make
/// it write outside that directory (or fail in the kernel).
pub fn validate_name(name: &[u8]) -> Result<(), TreeError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != b"."
        && name != b".."
        && !name.iter().any(|&b| b == b'/' || b == 0);
    if ok {
        Ok(())
    } else {
        Err(TreeError::InvalidName(escape(name)))
    }
}

/// A symlink target: at most 4096 bytes, no NUL. It may be absolute or
/// contain "..": restore creates the link and never follows it.
fn validate_target(target: &[u8]) -> Result<(), TreeError> {
    if target.len() <= MAX_TARGET_LEN && !target.contains(&0) {
        Ok(())
    } else {
        Err(TreeError::InvalidSymlinkTarget(escape(target)))
    }
}

/// Hostile bytes made fit for an error message: lossy UTF-8, control
/// characters and quotes escaped, long values cut short.
fn escape(bytes: &[u8]) -> String {
    const SHOWN: usize = 100;
    let shown = bytes.get(..SHOWN).unwrap_or(bytes);
    let mut s: String = String::from_utf8_lossy(shown).escape_debug().collect();
    if bytes.len() > SHOWN {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}

/// A directory listing: nodes sorted by name, names unique and valid.
///
/// The field is private so that a `Tree` can only come from [`Tree::new`] or
/// [`Tree::decode`], which both enforce those rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Builds a tree from nodes in any order. Sorts them by name and rejects
    /// invalid or duplicate names, invalid timestamps or symlink targets, and
    /// trees whose encoding would exceed [`MAX_TREE_SIZE`].
    pub fn new(mut nodes: Vec<Node>) -> Result<Tree, TreeError> {
        for node in &mut nodes {
            node.extra.xattrs.sort_unstable_by(|a, b| a.name.cmp(&b.name));
            node.validate()?;
        }
        nodes.sort_unstable_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = nodes.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(TreeError::DuplicateName(escape(&pair[0].name)));
        }
        let tree = Tree { nodes };
        let len = tree.encoded_len();
        if len > MAX_TREE_SIZE {
            return Err(TreeError::TooLarge(len));
        }
        Ok(tree)
    }

    /// The nodes, sorted by name.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`, by binary search.
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes.binary_search_by(|n| n.name.as_slice().cmp(name)).ok().map(|i| &self.nodes[i])
    }

    /// The format version this tree is written in: the oldest that holds it.
    fn version(&self) -> u8 {
        if self.nodes.iter().any(Node::needs_v2) {
            VERSION_2
        } else {
            VERSION_1
        }
    }

    fn encoded_len(&self) -> usize {
        let version = self.version();
        self.nodes.iter().fold(HEADER_LEN, |acc, n| acc.saturating_add(n.encoded_len(version)))
    }

    /// The canonical encoding (see the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let version = self.version();
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(MAGIC);
        out.push(version);
        put_u32_len(&mut out, self.nodes.len());
        for n in &self.nodes {
            out.push(match n.kind {
                NodeKind::File { .. } => KIND_FILE,
                NodeKind::Dir { .. } => KIND_DIR,
                NodeKind::Symlink { .. } => KIND_SYMLINK,
                NodeKind::Special { .. } => KIND_SPECIAL,
            });
            put_u16_len(&mut out, n.name.len());
            out.extend_from_slice(&n.name);
            out.extend_from_slice(&n.mode.to_le_bytes());
            out.extend_from_slice(&n.uid.to_le_bytes());
            out.extend_from_slice(&n.gid.to_le_bytes());
            for t in [n.mtime, n.ctime] {
                out.extend_from_slice(&t.sec.to_le_bytes());
                out.extend_from_slice(&t.nsec.to_le_bytes());
            }
            out.extend_from_slice(&n.inode.to_le_bytes());
            out.extend_from_slice(&n.size.to_le_bytes());
            match &n.kind {
                NodeKind::File { chunks } => {
                    put_u32_len(&mut out, chunks.len());
                    for c in chunks {
                        out.extend_from_slice(c.as_bytes());
                    }
                }
                NodeKind::Dir { subtree } => out.extend_from_slice(subtree.as_bytes()),
                NodeKind::Symlink { target } => {
                    put_u16_len(&mut out, target.len());
                    out.extend_from_slice(target);
                }
                NodeKind::Special { rdev } => out.extend_from_slice(&rdev.to_le_bytes()),
            }
            if version == VERSION_2 {
                n.extra.encode(&mut out);
            }
        }
        out
    }

    /// Parses and validates an encoded tree: everything [`Tree::new`] checks,
    /// plus strictly increasing names, exact length and bounded counts.
    pub fn decode(bytes: &[u8]) -> Result<Tree, TreeError> {
        if bytes.len() > MAX_TREE_SIZE {
            return Err(TreeError::TooLarge(bytes.len()));
        }
        let mut r = Reader(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(TreeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION_1 && version != VERSION_2 {
            return Err(TreeError::UnsupportedVersion(version));
        }
        let count = r.u32()?;
        if count as usize > r.remaining() / MIN_NODE_LEN {
            return Err(TreeError::TooManyNodes { count, remaining: r.remaining() });
        }
        let mut nodes: Vec<Node> = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let node = read_node(&mut r, version)?;
            if let Some(prev) = nodes.last() {
                match prev.name.cmp(&node.name) {
                    std::cmp::Ordering::Less => {}
                    std::cmp::Ordering::Equal => return Err(TreeError::DuplicateName(escape(&node.name))),
                    std::cmp::Ordering::Greater => return Err(TreeError::NotSorted(escape(&node.name))),
                }
            }
            nodes.push(node);
        }
        if r.remaining() != 0 {
            return Err(TreeError::TrailingBytes(r.remaining()));
        }
        let tree = Tree { nodes };
        if version != tree.version() {
            return Err(TreeError::NotCanonical);
        }
        Ok(tree)
    }
}

/// Reads and validates one node of a tree of format `version`.
fn read_node(r: &mut Reader<'_>, version: u8) -> Result<Node, TreeError> {
    let kind = r.u8()?;
    let special_ok = version == VERSION_2 && kind == KIND_SPECIAL;
    if !matches!(kind, KIND_FILE | KIND_DIR | KIND_SYMLINK) && !special_ok {
        return Err(TreeError::BadKind(kind));
    }
    let name_len = r.u16()?;
    let name = r.take(usize::from(name_len))?;
    validate_name(name)?;
    let name = name.to_vec();
    let mode = r.u32()?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let mtime = Timestamp { sec: r.i64()?, nsec: r.u32()? };
    let ctime = Timestamp { sec: r.i64()?, nsec: r.u32()? };
    if !mtime.is_valid() || !ctime.is_valid() {
        return Err(TreeError::BadTimestamp(escape(&name)));
    }
    let inode = r.u64()?;
    let size = r.u64()?;
    let kind = match kind {
        KIND_FILE => {
            let count = r.u32()?;
            if count as usize > r.remaining() / ID_LEN {
                return Err(TreeError::TooManyChunks { count, remaining: r.remaining() });
            }
            let mut chunks = Vec::with_capacity(count as usize);
            for _ in 0..count {
                chunks.push(BlobId(r.array::<ID_LEN>()?));
            }
            NodeKind::File { chunks }
        }
        KIND_DIR => NodeKind::Dir { subtree: BlobId(r.array::<ID_LEN>()?) },
        KIND_SYMLINK => {
            let len = r.u16()?;
            let target = r.take(usize::from(len))?;
            validate_target(target)?;
            NodeKind::Symlink { target: target.to_vec() }
        }
        _ => NodeKind::Special { rdev: r.u64()? },
    };
    let extra = if version == VERSION_2 { NodeExtra::decode(r, &name)? } else { NodeExtra::default() };
    Ok(Node { name, kind, mode, uid, gid, mtime, ctime, inode, size, extra })
}

/// Appends a count that [`Tree::new`] has bounded (names and targets are at
/// most 4096 bytes).
fn put_u16_len(out: &mut Vec<u8>, n: usize) {
    let n = u16::try_from(n).expect("names and targets are validated to at most 4096 bytes");
    out.extend_from_slice(&n.to_le_bytes());
}

impl From<Truncated> for TreeError {
    fn from(_: Truncated) -> Self {
        TreeError::Truncated
    }
}

/// A depth-first walk of a tree and every subtree below it ([`walk`]).
pub struct Walk<'r> {
    repo: &'r crate::repo::Repository,
    /// Open directories: their path, tree id, and the nodes not yet yielded.
    stack: Vec<(std::path::PathBuf, BlobId, std::vec::IntoIter<Node>)>,
    /// The directory yielded last: entered at the next step unless skipped.
    enter: Option<(std::path::PathBuf, BlobId)>,
}

/// A subtree a [`walk`] could not load; the walk goes on with its siblings.
#[derive(Debug, thiserror::Error)]
#[error("tree {tree} at /{}: {source}", path.display())]
pub struct WalkError {
    /// The directory's path below the root (empty for the root).
    pub path: std::path::PathBuf,
    /// Its tree id.
    pub tree: BlobId,
    /// Why it could not be loaded.
    #[source]
    pub source: crate::repo::RepoError,
}

/// Walks `root` depth-first, loading subtrees through the repository as it
/// reaches them. Yields each entry with its path below the root (relative,
/// the names' bytes kept): a directory's entries in name order, each
/// directory right before its contents. A subtree that cannot be loaded is
/// yielded as a [`WalkError`] (the root too); call [`Walk::skip_subtree`]
/// after a directory to leave its contents out.
pub fn walk<'r>(repo: &'r crate::repo::Repository, root: &BlobId) -> Walk<'r> {
    Walk { repo, stack: Vec::new(), enter: Some((std::path::PathBuf::new(), *root)) }
}

impl Walk<'_> {
    /// Does not descend into the directory yielded last (a subtree already
    /// seen, or one a restore does not select).
    pub fn skip_subtree(&mut self) {
        self.enter = None;
    }

    /// The tree id of the directory holding the entry yielded last.
    pub fn parent_tree(&self) -> Option<BlobId> {
        self.stack.last().map(|(_, id, _)| *id)
    }
}

impl Iterator for Walk<'_> {
    type Item = Result<(std::path::PathBuf, Node), WalkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some((path, tree)) = self.enter.take() {
            match self.repo.load_tree(&tree) {
                Ok(t) => self.stack.push((path, tree, t.nodes.into_iter())),
                Err(source) => return Some(Err(WalkError { path, tree, source })),
            }
        }
        loop {
            let (dir, _, nodes) = self.stack.last_mut()?;
            let Some(node) = nodes.next() else {
                self.stack.pop();
                continue;
            };
            let path = dir.join(std::ffi::OsStr::from_bytes(&node.name));
            if let NodeKind::Dir { subtree } = &node.kind {
                self.enter = Some((path.clone(), *subtree));
            }
            return Some(Ok((path, node)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn node(name: &[u8], kind: NodeKind) -> Node {
        Node {
            name: name.to_vec(),
            kind,
            mode: 0o100644,
            uid: 1000,
            gid: 1000,
            mtime: Timestamp { sec: 1_700_000_000, nsec: 5 },
            ctime: Timestamp { sec: -3, nsec: 999_999_999 },
            inode: 42,
            size: 7,
            extra: NodeExtra::default(),
        }
    }

    #[test]
    fn walk_is_depth_first_in_name_order_and_can_skip_and_survive_a_lost_subtree() {
        use crate::id::BlobKind;
        let dir = tempfile::tempdir().unwrap();
        let repo = crate::test_support::local_repo(dir.path());
        let packer = crate::packer::Packer::new(&repo, 1);
        let save = |nodes: Vec<Node>| packer.save(BlobKind::Tree, &Tree::new(nodes).unwrap().encode()).unwrap().0;
        let file = |name: &[u8]| node(name, NodeKind::File { chunks: vec![] });
        let deep = save(vec![file(b"z")]);
        let b = save(vec![node(b"deep", NodeKind::Dir { subtree: deep }), file(b"y")]);
        // A subtree that is not stored: the walk reports it and goes on.
        let lost = BlobId([9; 32]);
        let root = save(vec![
            file(b"c"),
            node(b"b", NodeKind::Dir { subtree: b }),
            node(b"a", NodeKind::Dir { subtree: lost }),
        ]);
        packer.finish().unwrap();

        let show = |w: Walk<'_>| -> Vec<String> {
            w.map(|e| match e {
                Ok((p, _)) => p.display().to_string(),
                Err(e) => format!("error at {}", e.path.display()),
            })
            .collect()
        };
        assert_eq!(show(walk(&repo, &root)), ["a", "error at a", "b", "b/deep", "b/deep/z", "b/y", "c"]);
        let mut w = walk(&repo, &root);
        let mut seen = Vec::new();
        while let Some(Ok((p, n))) = w.next() {
            if n.is_dir() {
                w.skip_subtree();
            }
            seen.push(p.display().to_string());
        }
        assert_eq!(seen, ["a", "b", "c"]);
        assert!(matches!(walk(&repo, &lost).next(), Some(Err(WalkError { tree, .. })) if tree == lost));
    }

    fn file(name: &[u8]) -> Node {
        node(name, NodeKind::File { chunks: vec![BlobId([1; 32]), BlobId([2; 32])] })
    }

    fn sample() -> Tree {
        Tree::new(vec![
            file(b"zeta"),
            node(b"dir", NodeKind::Dir { subtree: BlobId([9; 32]) }),
            node(b"link", NodeKind::Symlink { target: b"../../etc/passwd".to_vec() }),
            file("caf\u{e9} au lait".as_bytes()),
            file(b"\xff\xfe not utf-8"),
        ])
        .unwrap()
    }

    fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
        // Any byte but '/' and NUL.
        let byte = any::<u8>().prop_map(|b| if b == b'/' || b == 0 { b'_' } else { b });
        prop_oneof![
            4 => "[a-zA-Z0-9 ._-]{1,16}".prop_map(String::into_bytes),
            2 => "[^/\\x00]{1,8}".prop_map(String::into_bytes),
            2 => prop::collection::vec(byte.clone(), 1..24),
            1 => prop::collection::vec(byte, 4000..=4096),
        ]
        .prop_filter("not . or ..", |n| validate_name(n).is_ok())
    }

    fn timestamp_strategy() -> impl Strategy<Value = Timestamp> {
        (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timestamp { sec, nsec })
    }

    fn id_strategy() -> impl Strategy<Value = BlobId> {
        any::<[u8; 32]>().prop_map(BlobId)
    }

    fn kind_strategy() -> impl Strategy<Value = NodeKind> {
        prop_oneof![
            prop::collection::vec(id_strategy(), 0..8).prop_map(|chunks| NodeKind::File { chunks }),
            id_strategy().prop_map(|subtree| NodeKind::Dir { subtree }),
            prop::collection::vec(1u8..=255, 0..64).prop_map(|target| NodeKind::Symlink { target }),
            any::<u64>().prop_map(|rdev| NodeKind::Special { rdev }),
        ]
    }

    fn xattr_strategy() -> impl Strategy<Value = Xattr> {
        (prop::collection::vec(1u8..=255, 1..20), prop::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(name, value)| Xattr { name, value })
    }

    fn extra_strategy() -> impl Strategy<Value = NodeExtra> {
        prop_oneof![
            2 => Just(NodeExtra::default()),
            1 => ("[a-z]{0,8}", "[a-z]{0,8}", any::<(u64, u64)>(), prop::collection::vec(xattr_strategy(), 0..4))
                .prop_map(|(user, group, (device, links), mut xattrs)| {
                    xattrs.sort();
                    xattrs.dedup_by(|a, b| a.name == b.name);
                    NodeExtra { user, group, device, links, xattrs }
                }),
        ]
    }

    prop_compose! {
        fn node_strategy()(
            name in name_strategy(),
            kind in kind_strategy(),
            (mode, uid, gid) in any::<(u32, u32, u32)>(),
            mtime in timestamp_strategy(),
            ctime in timestamp_strategy(),
            (inode, size) in any::<(u64, u64)>(),
            extra in extra_strategy(),
        ) -> Node {
            Node { name, kind, mode, uid, gid, mtime, ctime, inode, size, extra }
        }
    }

    /// Arbitrary valid trees: random nodes with duplicate names dropped.
    fn tree_strategy() -> impl Strategy<Value = Tree> {
        prop::collection::vec(node_strategy(), 0..12).prop_map(|nodes| {
            let mut seen = std::collections::HashSet::new();
            let unique = nodes.into_iter().filter(|n| seen.insert(n.name.clone())).collect();
            Tree::new(unique).unwrap()
        })
    }

    proptest! {
        #[test]
        fn roundtrip(tree in tree_strategy()) {
            let bytes = tree.encode();
            prop_assert_eq!(bytes.len(), tree.encoded_len());
            let back = Tree::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &tree);
            prop_assert!(tree.nodes().windows(2).all(|w| w[0].name < w[1].name));
            for n in tree.nodes() {
                prop_assert_eq!(back.find(&n.name), Some(n));
            }
        }

        #[test]
        fn new_sorts_any_order(tree in tree_strategy(), seed in any::<u64>()) {
            let mut nodes = tree.nodes().to_vec();
            if !nodes.is_empty() {
                let len = nodes.len();
                nodes.rotate_left(seed as usize % len);
                nodes.reverse();
            }
            prop_assert_eq!(Tree::new(nodes).unwrap(), tree);
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Tree::decode(&bytes);
            // Past the header too, with a small count, so the node parser sees random input.
            let mut with_header = b"CVTR\x01".to_vec();
            with_header.extend_from_slice(&u32::from(bytes.first().copied().unwrap_or(0) % 4).to_le_bytes());
            with_header.extend_from_slice(bytes.get(1..).unwrap_or_default());
            if let Ok(tree) = Tree::decode(&with_header) {
                prop_assert_eq!(tree.encode(), with_header);
            }
        }

        #[test]
        fn flipped_bytes_never_panic(tree in tree_strategy(), pos in any::<prop::sample::Index>(), mask in 1u8..=255) {
            let mut bytes = tree.encode();
            let i = pos.index(bytes.len());
            bytes[i] ^= mask;
            // Whatever decodes must be canonical: re-encoding gives the same bytes.
            if let Ok(t) = Tree::decode(&bytes) {
                prop_assert_eq!(t.encode(), bytes);
            }
        }

        #[test]
        fn truncated_is_rejected(tree in tree_strategy(), cut in any::<prop::sample::Index>()) {
            let bytes = tree.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(Tree::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn rejects_invalid_names() {
        let long = vec![b'a'; 4097];
        for bad in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b", &long] {
            assert!(matches!(validate_name(bad), Err(TreeError::InvalidName(_))), "{bad:?}");
            assert!(matches!(Tree::new(vec![file(bad)]), Err(TreeError::InvalidName(_))), "{bad:?}");
        }
        for good in [&b"a"[..], b"...", b".hidden", b"with space", "\u{1f600}".as_bytes(), b"\xff", &[b'a'; 4096]] {
            assert!(validate_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn invalid_name_message_is_escaped_and_short() {
        let msg = validate_name(b"evil\n\0name").unwrap_err().to_string();
        assert!(msg.contains(r"evil\n\0name"), "{msg}");
        let msg = validate_name(&[b'x'; 5000]).unwrap_err().to_string();
        assert!(msg.contains("(5000 bytes)") && msg.len() < 400, "{msg}");
    }

    #[test]
    fn decode_rejects_invalid_names() {
        let mut bytes = Tree::new(vec![file(b"ab")]).unwrap().encode();
        let at = HEADER_LEN + 3;
        assert_eq!(&bytes[at..at + 2], b"ab");
        bytes[at..at + 2].copy_from_slice(b"..");
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::InvalidName(_))));
        bytes[at..at + 2].copy_from_slice(b"a/");
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::InvalidName(_))));
    }

    #[test]
    fn rejects_duplicates() {
        assert!(matches!(Tree::new(vec![file(b"a"), file(b"b"), file(b"a")]), Err(TreeError::DuplicateName(_))));
        // Splice two encodings of the same node into one tree.
        let one = Tree::new(vec![file(b"a")]).unwrap().encode();
        let mut two = one.clone();
        two[5..9].copy_from_slice(&2u32.to_le_bytes());
        two.extend_from_slice(&one[HEADER_LEN..]);
        assert!(matches!(Tree::decode(&two), Err(TreeError::DuplicateName(_))));
    }

    #[test]
    fn decode_rejects_unsorted() {
        let b = Tree::new(vec![file(b"b")]).unwrap().encode();
        let a = Tree::new(vec![file(b"a")]).unwrap().encode();
        let mut bytes = b.clone();
        bytes[5..9].copy_from_slice(&2u32.to_le_bytes());
        bytes.extend_from_slice(&a[HEADER_LEN..]);
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::NotSorted(_))));
    }

    #[test]
    fn rejects_bad_timestamps_and_targets() {
        let mut n = file(b"a");
        n.ctime.nsec = 1_000_000_000;
        assert!(matches!(Tree::new(vec![n]), Err(TreeError::BadTimestamp(_))));
        let mut bytes = Tree::new(vec![file(b"a")]).unwrap().encode();
        let mtime_nsec = HEADER_LEN + 1 + 2 + 1 + 12 + 8;
        bytes[mtime_nsec..mtime_nsec + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::BadTimestamp(_))));

        for bad in [b"a\0b".to_vec(), vec![b'x'; 4097]] {
            let n = node(b"l", NodeKind::Symlink { target: bad });
            assert!(matches!(Tree::new(vec![n]), Err(TreeError::InvalidSymlinkTarget(_))));
        }
        let ok = node(b"l", NodeKind::Symlink { target: vec![b'x'; 4096] });
        assert!(Tree::new(vec![ok]).is_ok());
    }

    #[test]
    fn rejects_bad_header_kind_and_trailing_bytes() {
        let bytes = sample().encode();
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(matches!(Tree::decode(&b), Err(TreeError::BadMagic)));
        let mut b = bytes.clone();
        b[4] = 3;
        assert!(matches!(Tree::decode(&b), Err(TreeError::UnsupportedVersion(3))));
        let mut b = bytes.clone();
        b[HEADER_LEN] = 7;
        assert!(matches!(Tree::decode(&b), Err(TreeError::BadKind(7))));
        let mut b = bytes.clone();
        b.push(0);
        assert!(matches!(Tree::decode(&b), Err(TreeError::TrailingBytes(1))));
        assert!(matches!(Tree::decode(&bytes[..3]), Err(TreeError::Truncated)));
    }

    #[test]
    fn huge_counts_are_refused_before_allocating() {
        let mut b = b"CVTR\x01".to_vec();
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Tree::decode(&b), Err(TreeError::TooManyNodes { count: u32::MAX, remaining: 0 })));

        let bytes = Tree::new(vec![node(b"f", NodeKind::File { chunks: vec![] })]).unwrap().encode();
        let mut b = bytes.clone();
        let at = bytes.len() - 4;
        b[at..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Tree::decode(&b), Err(TreeError::TooManyChunks { count: u32::MAX, remaining: 0 })));

        assert!(matches!(Tree::decode(&vec![0; MAX_TREE_SIZE + 1]), Err(TreeError::TooLarge(_))));
    }

    #[test]
    fn new_refuses_trees_too_large_to_decode() {
        let chunks = vec![BlobId([0; 32]); MAX_TREE_SIZE / 32];
        let n = node(b"big", NodeKind::File { chunks });
        assert!(matches!(Tree::new(vec![n]), Err(TreeError::TooLarge(_))));
    }

    fn with_extra() -> Node {
        let mut n = file(b"linked");
        n.extra = NodeExtra {
            user: "alice".into(),
            group: "staff".into(),
            device: 2049,
            links: 2,
            xattrs: vec![
                Xattr { name: b"user.z".to_vec(), value: b"last".to_vec() },
                Xattr { name: b"user.a".to_vec(), value: vec![0, 1, 2] },
            ],
        };
        n
    }

    #[test]
    fn trees_without_extra_metadata_keep_the_version_1_encoding() {
        // The encoding of this tree as written before version 2 existed.
        let old = sample().encode();
        assert_eq!(old[4], VERSION_1);
        assert_eq!(Tree::decode(&old).unwrap(), sample());
        let mut nodes = sample().nodes().to_vec();
        nodes.push(with_extra());
        let new = Tree::new(nodes).unwrap();
        let bytes = new.encode();
        assert_eq!(bytes[4], VERSION_2);
        let back = Tree::decode(&bytes).unwrap();
        assert_eq!(back, new);
        let xattrs = &back.find(b"linked").unwrap().extra.xattrs;
        assert_eq!(xattrs[0].name, b"user.a", "Tree::new sorts attributes by name");
    }

    #[test]
    fn special_nodes_need_version_2_and_version_1_refuses_them() {
        let fifo = Node { mode: 0o010644, ..node(b"fifo", NodeKind::Special { rdev: 0 }) };
        let bytes = Tree::new(vec![fifo.clone()]).unwrap().encode();
        assert_eq!(bytes[4], VERSION_2);
        assert_eq!(Tree::decode(&bytes).unwrap().nodes(), &[fifo]);
        let mut v1 = bytes.clone();
        v1[4] = VERSION_1;
        assert!(Tree::decode(&v1).is_err());
    }

    #[test]
    fn version_2_without_need_is_not_canonical() {
        let mut bytes = Tree::new(vec![file(b"a")]).unwrap().encode();
        bytes[4] = VERSION_2;
        let mut empty_extra = Vec::new();
        NodeExtra::default().encode(&mut empty_extra);
        bytes.extend_from_slice(&empty_extra);
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::NotCanonical)));
    }

    #[test]
    fn bad_extended_attributes_are_refused() {
        let mut n = with_extra();
        n.extra.xattrs[0].value = vec![0; MAX_XATTR_VALUE_LEN + 1];
        assert!(matches!(Tree::new(vec![n]), Err(TreeError::BadExtra(..))));
        let mut n = with_extra();
        n.extra.xattrs[1].name = n.extra.xattrs[0].name.clone();
        assert!(matches!(Tree::new(vec![n]), Err(TreeError::BadExtra(..))));
        let mut n = with_extra();
        n.extra.xattrs[0].name = b"user\0x".to_vec();
        assert!(matches!(Tree::new(vec![n]), Err(TreeError::BadExtra(..))));
        // A huge attribute count with no bytes behind it is refused before allocating.
        let mut bytes = Tree::new(vec![with_extra()]).unwrap().encode();
        let tail = (1 + 6 + 4 + 3) + (1 + 6 + 4 + 4);
        let at = bytes.len() - tail;
        bytes.truncate(at);
        bytes[at - 2..].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(Tree::decode(&bytes), Err(TreeError::BadExtra(..))));
    }

    #[test]
    fn find_and_accessors() {
        let t = sample();
        assert_eq!(t.nodes().len(), 5);
        assert!(t.find(b"dir").unwrap().is_dir());
        assert!(t.find(b"zeta").unwrap().is_file());
        assert!(!t.find(b"link").unwrap().is_file());
        assert!(t.find(b"missing").is_none());
        assert_eq!(t.find(b"\xff\xfe not utf-8").unwrap().name_lossy(), "\u{fffd}\u{fffd} not utf-8");
        assert_eq!(Tree::decode(&Tree::default().encode()).unwrap(), Tree::default());
    }
}
