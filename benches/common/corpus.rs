//! A mixed corpus for the benches: real files from /usr (text, binaries,
//! compressed archives) plus 10% incompressible pseudo-random bytes.

use std::path::Path;

/// Up to `bytes` of real files concatenated, then 10% random data.
pub fn mixed(bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes);
    let real = bytes - bytes / 10;
    for root in ["/usr/lib", "/usr/share", "/usr/bin"] {
        collect(Path::new(root), real, &mut out);
    }
    let random = crate::noise::pseudo_random(bytes - out.len(), 1);
    out.extend_from_slice(&random);
    out
}

fn collect(dir: &Path, limit: usize, out: &mut Vec<u8>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if out.len() >= limit {
            return;
        }
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            collect(&p, limit, out);
        } else if m.is_file() && m.len() < 8 << 20 {
            if let Ok(data) = std::fs::read(&p) {
                let take = data.len().min(limit - out.len());
                out.extend_from_slice(&data[..take]);
            }
        }
    }
}
