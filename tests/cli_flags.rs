//! Flags for scripts and terminals: --password-command, --files-from,
//! -v levels, shell completions and man pages.

mod common;

use std::fs;

use common::{Env, PASSWORD};

#[test]
fn password_command_opens_the_repository_and_its_failure_is_an_error() {
    let env = Env::new();
    let run = |cmd: &str| {
        env.cmd().env_remove("CHUNKVAULT_PASSWORD").args(["--password-command", cmd, "snapshots"]).output().unwrap()
    };
    assert!(run(&format!("echo '{PASSWORD}'")).status.success());
    assert_eq!(run("echo wrong").status.code(), Some(12), "a wrong password from the command");
    let failed = run("exit 4");
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("--password-command failed"));
}

#[test]
fn files_from_lists_and_nul_separated_lists_add_paths() {
    let env = Env::new();
    let names = ["a", "b c", "with\nnewline", "d"];
    for n in names {
        fs::create_dir(env.path(n)).unwrap();
    }
    let list = env.path("list.txt");
    fs::write(&list, format!("# a comment\n\n  {}  \n{}\n", env.path("a").display(), env.path("b c").display()))
        .unwrap();
    let raw = env.path("list.bin");
    fs::write(&raw, format!("{}\0{}\0", env.path("with\nnewline").display(), env.path("d").display())).unwrap();
    let snap =
        env.json(&["backup", "--files-from", list.to_str().unwrap(), "--files-from-verbatim", raw.to_str().unwrap()]);
    let mut paths: Vec<String> =
        snap["paths"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_owned()).collect();
    paths.sort();
    let mut want: Vec<String> = names.iter().map(|n| env.path(n).to_str().unwrap().to_owned()).collect();
    want.sort();
    assert_eq!(paths, want);

    let empty = env.path("empty.txt");
    fs::write(&empty, "# nothing\n").unwrap();
    assert_eq!(env.run(&["backup", "--files-from", empty.to_str().unwrap()]).status.code(), Some(2));
    assert_eq!(env.run(&["backup"]).status.code(), Some(2), "no paths and no list");
}

#[test]
fn verbose_levels_turn_on_the_log() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("skip.tmp"), b"x").unwrap();
    let args = ["backup", src.to_str().unwrap(), "--exclude", "*.tmp"];
    let quiet = env.cmd().env_remove("CHUNKVAULT_LOG").args(args).output().unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("excluded"));
    let loud = env.cmd().env_remove("CHUNKVAULT_LOG").arg("-vv").args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&loud.stderr);
    assert!(stderr.contains("skip.tmp: excluded"), "{stderr}");
}

#[test]
fn completions_for_each_shell_and_man_pages_are_generated() {
    let env = Env::uninit();
    for (shell, marker) in [
        ("bash", "_chunkvault()"),
        ("zsh", "#compdef chunkvault"),
        ("fish", "complete -c chunkvault"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = env.ok(&["completion", shell]);
        assert!(out.contains(marker), "{shell}: {}", &out[..out.len().min(200)]);
        assert!(out.contains("files-from"), "{shell} completes backup's flags");
    }
    let dir = env.path("man");
    env.ok(&["generate-man", dir.to_str().unwrap()]);
    let top = fs::read_to_string(dir.join("chunkvault.1")).unwrap();
    assert!(top.contains(".TH chunkvault"));
    let backup = fs::read_to_string(dir.join("chunkvault-backup.1")).unwrap();
    assert!(backup.contains("exclude\\-larger\\-than"), "{}", &backup[..backup.len().min(400)]);
    assert!(dir.join("chunkvault-key-add.1").exists());
}
