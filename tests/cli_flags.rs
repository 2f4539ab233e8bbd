//! Flags for scripts and terminals: --password-command, --files-from,
//! -v levels, shell completions and man pages.

mod common;

use std::fs;
use std::process::Command;

use common::{Env, PASSWORD};

#[test]
fn password_command_opens_the_repository_and_its_failure_is_an_error() {
    let env = Env::new();
    let run = |cmd: &str| {
        env.cmd().env_remove("CHUNKVAULT_PASSWORD").args(["snapshots", "--password-command", cmd]).output().unwrap()
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
    let loud = env.cmd().env_remove("CHUNKVAULT_LOG").args(args).arg("-vv").output().unwrap();
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

/// Lines on stdout: status lines, then the summary; returns them parsed.
fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON document a line"))
        .collect()
}

#[test]
fn status_lines_precede_a_one_line_summary_for_front_ends() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), common::pseudo_random(1 << 20, 1)).unwrap();
    let out = env.run(&["backup", src.to_str().unwrap(), "--json", "--status-lines"]);
    assert!(out.status.success());
    let lines = json_lines(&out.stdout);
    let (summary, status) = lines.split_last().unwrap();
    assert!(!status.is_empty(), "at least one status line");
    for s in status {
        assert_eq!(s["message_type"], "status");
        assert!(
            s["percent_done"].as_f64().unwrap() <= 1.0
                && s.get("total_bytes").is_some()
                && s.get("bytes_done").is_some()
        );
    }
    assert_eq!(summary["message_type"], "summary");
    let id = summary["snapshot"].as_str().unwrap();

    let target = env.path("t");
    let out = env.run(&["restore", id, "--target", target.to_str().unwrap(), "--json", "--status-lines"]);
    assert!(out.status.success());
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.last().unwrap()["message_type"], "summary");
    assert_eq!(lines.last().unwrap()["files"], 1);
    assert_eq!(lines[0]["message_type"], "status");

    let no_json = env.run(&["backup", src.to_str().unwrap(), "--status-lines"]);
    assert_eq!(no_json.status.code(), Some(2), "--status-lines needs --json");
}

/// Each command's `--help` offers the flags it uses and no others: no
/// repository flags on `serve` or `completion`, no `--json` where nothing is
/// printed as a result, `--retry-lock` only where a lock is taken.
#[test]
fn each_command_offers_only_the_flags_it_uses() {
    let help = |args: &[&str]| -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_chunkvault")).args(args).arg("--help").output().unwrap();
        assert!(out.status.success(), "{args:?} --help");
        String::from_utf8(out.stdout).unwrap()
    };
    let flag =
        |text: &str, f: &str| text.split(|c: char| c.is_whitespace() || c == ',').any(|w| w.trim_end_matches('.') == f);
    let cases: &[(&[&str], &[&str], &[&str])] = &[
        (&["serve"], &["--password-file", "--verbose"], &["--repo", "--cache-dir", "--json", "--retry-lock"]),
        (&["completion"], &[], &["--repo", "--json", "--quiet", "--verbose", "--threads"]),
        (&["init"], &["--repo", "--password-file", "--json"], &["--cache-dir", "--retry-lock", "--threads"]),
        (&["backup"], &["--repo", "--password-command", "--cache-dir", "--retry-lock", "--json", "--quiet"], &[]),
        (&["snapshots"], &["--repo", "--no-cache", "--json"], &["--retry-lock"]),
        (&["cat"], &["--repo", "--quiet"], &["--json", "--retry-lock"]),
        (&["mount"], &["--repo", "--host", "--allow-other"], &["--json", "--retry-lock"]),
        (&["copy"], &["--repo", "--from-repo", "--from-password-file", "--retry-lock", "--json"], &[]),
        (&["key", "add"], &["--repo", "--new-password-file"], &["--retry-lock"]),
        (&["repair", "index"], &["--repo", "--retry-lock"], &[]),
        (&["device", "snapshots"], &["--json"], &["--repo", "--cache-dir"]),
        (&["admin", "devices"], &["--json", "--server"], &["--repo", "--password-file"]),
    ];
    for (args, has, lacks) in cases {
        let text = help(args);
        for f in *has {
            assert!(flag(&text, f), "{args:?} --help lacks {f}:\n{text}");
        }
        for f in *lacks {
            assert!(!flag(&text, f), "{args:?} --help offers {f}:\n{text}");
        }
    }
    // Repository flags go after the command; the environment works as before.
    let out =
        Command::new(env!("CARGO_BIN_EXE_chunkvault")).args(["--repo", "/nowhere", "snapshots"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}
