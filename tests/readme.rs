//! The README's walk-through of a server with TLS (a private CA, a
//! tenant-admin token, a device with the CA pushed in its managed config)
//! works as written: the shell block is taken from README.md and run by
//! bash, with only its port changed (tests run in parallel) and `~` a
//! temporary home holding `~/Documents`. It needs openssl, jq and curl,
//! which `.ci/run` installs.

use std::path::Path;
use std::process::Command;

mod common;

/// The first ```sh block after `heading` in README.md.
fn shell_block(readme: &str, heading: &str) -> String {
    let section = &readme[readme.find(heading).expect("the heading")..];
    let start = section.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = section[start..].find("\n```").expect("the block's end");
    section[start..start + end].to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn tls_walk_through_works_as_written() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = shell_block(&readme, "## Running the server in production, with TLS");
    assert!(block.contains("--role tenant-admin") && block.contains("caCertificate"), "{block}");
    let block = block.replace("8443", &free_port().to_string());

    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let docs = home.join("Documents");
    std::fs::create_dir_all(docs.join("taxes")).unwrap();
    std::fs::write(docs.join("notes.txt"), "walk-through\n").unwrap();
    let big: Vec<u8> = (0..300_000u32).flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes()).collect();
    std::fs::write(docs.join("taxes/2026.bin"), &big).unwrap();

    let bin_dir = Path::new(common::server::BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    // The server started with `&` goes when the script ends, however it ends.
    let script = format!("set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{block}\n");
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("HOME", &home)
        .env("PATH", path)
        .env_remove("CHUNKVAULT_ADMIN_TOKEN")
        .env_remove("CHUNKVAULT_CA_CERT")
        .env_remove("CHUNKVAULT_DEVICE_STATE")
        .output()
        .unwrap();
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the walk-through failed:\n{text}");

    // The restore holds the documents byte for byte, wherever under the
    // target the device put them.
    let restored = dir.path().join("cv-tls/restored");
    let found: Vec<_> = walk(&restored).into_iter().filter(|p| p.ends_with("taxes/2026.bin")).collect();
    assert_eq!(found.len(), 1, "{found:?}\n{text}");
    assert_eq!(std::fs::read(&found[0]).unwrap(), big);
    let notes = found[0].parent().unwrap().parent().unwrap().join("notes.txt");
    assert_eq!(std::fs::read_to_string(notes).unwrap(), "walk-through\n");
    // The tenant admin saw its device.
    assert!(text.contains("acme"), "{text}");
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
