//! Metadata a restore gives back: hard links, extended attributes, fifos,
//! devices, owners and owner names; what it cannot give back is named on
//! stderr. Run as root here (devices and ownership need it).

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use common::{restored, Env};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(st.success(), "{cmd} {args:?}");
}

/// A tree with a file of three links, a file owned by another user with a
/// trusted.* attribute, a fifo, a device (when root) and attributes on a
/// directory and a symlink-free file.
fn make_tree(src: &Path) {
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("a"), b"linked content\n").unwrap();
    fs::hard_link(src.join("a"), src.join("b")).unwrap();
    fs::hard_link(src.join("a"), src.join("dir/c")).unwrap();
    fs::write(src.join("d"), b"alone\n").unwrap();
    xattr::set(src.join("a"), "user.comment", b"kept with the inode").unwrap();
    xattr::set(src.join("dir"), "user.dir", b"on a directory").unwrap();
    run("mkfifo", &[src.join("fifo").to_str().unwrap()]);
    if is_root() {
        xattr::set(src.join("d"), "trusted.secret", b"root only").unwrap();
        run("mknod", &[src.join("null").to_str().unwrap(), "c", "1", "3"]);
        nix::unistd::chown(&src.join("d"), Some(1234.into()), Some(5678.into())).unwrap();
    }
}

#[test]
fn hard_links_xattrs_fifos_devices_and_owners_are_restored() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    let snap = env.backup(&src);
    assert_eq!(snap["summary"]["errors"], 0, "{snap}");
    let target = env.path("restore");
    let report = env.json(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(report["hardlinks"], 2, "{report}");
    assert!(report["left_out"].as_array().unwrap().is_empty(), "{report}");
    let out = restored(&target, &src);

    let a = fs::metadata(out.join("a")).unwrap();
    assert_eq!(a.nlink(), 3, "a, b and dir/c are one file again");
    assert_eq!(fs::metadata(out.join("b")).unwrap().ino(), a.ino());
    assert_eq!(fs::metadata(out.join("dir/c")).unwrap().ino(), a.ino());
    assert_eq!(fs::read(out.join("dir/c")).unwrap(), b"linked content\n");
    assert_eq!(fs::metadata(out.join("d")).unwrap().nlink(), 1);
    assert_eq!(xattr::get(out.join("b"), "user.comment").unwrap().as_deref(), Some(&b"kept with the inode"[..]));
    assert_eq!(xattr::get(out.join("dir"), "user.dir").unwrap().as_deref(), Some(&b"on a directory"[..]));
    assert!(fs::symlink_metadata(out.join("fifo")).unwrap().file_type().is_fifo());

    if is_root() {
        let d = fs::metadata(out.join("d")).unwrap();
        assert_eq!((d.uid(), d.gid()), (1234, 5678), "root restores the numeric owner");
        assert_eq!(xattr::get(out.join("d"), "trusted.secret").unwrap().as_deref(), Some(&b"root only"[..]));
        let null = fs::symlink_metadata(out.join("null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), fs::metadata("/dev/null").unwrap().rdev());
    }
}

#[test]
fn ls_shows_owner_names_links_attributes_and_special_types() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    env.backup(&src);
    let list = env.json(&["ls", "latest"]);
    let find = |suffix: &str| {
        list.as_array().unwrap().iter().find(|e| e["path"].as_str().unwrap().ends_with(suffix)).cloned().unwrap()
    };
    let a = find("/src/a");
    assert_eq!(a["links"], 3);
    assert_eq!(a["xattrs"], serde_json::json!(["user.comment"]));
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    assert_eq!(a["user"], me);
    assert_eq!(find("/src/fifo")["type"], "fifo");
    if is_root() {
        assert_eq!(find("/src/null")["type"], "chardev");
    }
}

#[test]
fn a_hard_link_restored_without_its_sibling_is_a_plain_file() {
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    env.backup(&src);
    let target = env.path("restore");
    let include = format!("{}/b", src.display());
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap(), "--include", &include]);
    let b = restored(&target, &src).join("b");
    assert_eq!(fs::read(&b).unwrap(), b"linked content\n");
    assert_eq!(fs::metadata(&b).unwrap().nlink(), 1);
}

#[test]
fn a_socket_is_kept_in_the_snapshot_and_named_on_stderr_when_not_restored() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    env.backup(&src);
    let target = env.path("restore");
    let out = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not restored") && stderr.contains("sock") && stderr.contains("socket"), "{stderr}");
    assert!(restored(&target, &src).join("f").exists());
}

#[test]
fn the_snapshot_user_comes_from_the_uid_not_from_the_environment() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    let out = env.cmd().args(["backup", src.to_str().unwrap()]).env("USER", "impostor").env_remove("LOGNAME").output();
    assert!(out.unwrap().status.success());
    let snaps = env.json(&["snapshots"]);
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid()).unwrap().unwrap().name;
    assert_eq!(snaps[0]["username"], me);
    assert_eq!(snaps[0]["hostname"], nix::unistd::gethostname().unwrap().to_str().unwrap());
}

/// As a user who is not root: the device and the trusted.* attribute cannot
/// be restored, and each is named on stderr with why; the rest comes back.
#[test]
fn a_restore_by_another_user_names_what_it_cannot_restore() {
    if !is_root() {
        eprintln!("skipped: needs root to make a device and to switch users");
        return;
    }
    if Env::uninit().is_s3() {
        eprintln!("skipped: copies the repository's directory, which an S3 run does not have");
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    make_tree(&src);
    env.backup(&src);
    // A copy of the repository that user nobody can read, in a place it can reach.
    let base = env.path("shared");
    fs::create_dir(&base).unwrap();
    run("cp", &["-a", env.repo.to_str().unwrap(), base.join("repo").to_str().unwrap()]);
    run("chown", &["-R", "nobody", base.to_str().unwrap()]);
    fs::set_permissions(env.dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let target = base.join("restore");
    let out = Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", env!("CARGO_BIN_EXE_chunkvault")])
        .args(["restore", "latest", "--target", target.to_str().unwrap(), "--no-cache"])
        .env("CHUNKVAULT_REPO", base.join("repo"))
        .env("CHUNKVAULT_PASSWORD", common::PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("not restored") && stderr.contains("null: a device: only root can create one"), "{stderr}");
    assert!(stderr.contains("extended attribute trusted.secret"), "{stderr}");
    let out_dir = restored(&target, &src);
    assert!(!out_dir.join("null").exists());
    assert_eq!(fs::metadata(out_dir.join("a")).unwrap().nlink(), 3);
    assert_eq!(xattr::get(out_dir.join("a"), "user.comment").unwrap().as_deref(), Some(&b"kept with the inode"[..]));
    assert_eq!(
        fs::metadata(out_dir.join("d")).unwrap().uid(),
        65534,
        "not root: the restoring user owns what it writes"
    );
}
