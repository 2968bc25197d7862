//! What the binaries say about themselves: `--version` names the git revision they were built
//! from, and the completion scripts and man pages they generate are valid and complete.

use std::process::Command;

use warpline_tests::{bin, repo_root, unique};

/// Runs one of the binaries and returns its standard output, failing on a non-zero exit.
fn output_of(binary: &str, args: &[&str]) -> String {
    let out = Command::new(bin(binary))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    assert!(
        out.status.success(),
        "{binary} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn git(args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("git is needed to build and test from a checkout");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn version_names_the_git_revision() {
    let head = git(&["rev-parse", "--short=12", "HEAD"]);
    for binary in ["warpline", "warpline-worker"] {
        let version = output_of(binary, &["--version"]);
        assert!(
            version.starts_with(&format!("{binary} {} ({head} ", env!("CARGO_PKG_VERSION"))),
            "{binary} --version is `{}`, not built from HEAD {head} \
             (build the binaries first: cargo build --workspace --bins)",
            version.trim()
        );
    }
}

#[test]
fn completion_scripts_parse_and_know_the_subcommands() {
    for (binary, subcommand) in [("warpline", "submit"), ("warpline-worker", "exec")] {
        for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
            let script = output_of(binary, &["completions", shell]);
            assert!(
                script.contains(subcommand),
                "{binary}'s {shell} script lacks {subcommand}"
            );
        }
        let dir = std::env::temp_dir().join(unique("completions"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{binary}.bash"));
        std::fs::write(&path, output_of(binary, &["completions", "bash"])).unwrap();
        let check = Command::new("bash").arg("-n").arg(&path).output().unwrap();
        assert!(
            check.status.success(),
            "{binary}'s bash completion does not parse: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn man_pages_cover_every_subcommand() {
    let dir = std::env::temp_dir().join(unique("man"));
    let dir_arg = dir.to_str().unwrap();
    let listed = output_of("warpline", &["man", dir_arg]);
    let worker_listed = output_of("warpline-worker", &["man", dir_arg]);
    for page in [
        "warpline.1",
        "warpline-run.1",
        "warpline-serve.1",
        "warpline-submit.1",
        "warpline-audit-verify.1",
        "warpline-completions.1",
        "warpline-worker.1",
        "warpline-worker-exec.1",
    ] {
        let path = dir.join(page);
        assert!(
            listed.contains(path.to_str().unwrap())
                || worker_listed.contains(path.to_str().unwrap()),
            "{page} is not listed in:\n{listed}{worker_listed}"
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is not a man page:\n{text}");
    }
    let submit = std::fs::read_to_string(dir.join("warpline-submit.1")).unwrap();
    assert!(
        submit.contains("partitions\\-file"),
        "submit's page lacks its flags:\n{submit}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
