//! Build script of the two binaries' packages (`warpline`, `warpline-worker`): puts the git
//! revision the binary was built from into `WARPLINE_LONG_VERSION`, which their `--version`
//! prints: `0.1.0 (a1b2c3d4e5f6 2026-12-02)`. Outside a git checkout (a source tarball, a
//! container build without `.git`) `WARPLINE_GIT_REV` names the revision instead, or the
//! version stands alone.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn main() {
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    println!("cargo:rerun-if-env-changed=WARPLINE_GIT_REV");
    let revision = match std::env::var("WARPLINE_GIT_REV") {
        Ok(rev) if !rev.trim().is_empty() => Some(rev.trim().to_owned()),
        _ => from_git(),
    };
    let long = match revision {
        Some(rev) => format!("{version} ({rev})"),
        None => version,
    };
    println!("cargo:rustc-env=WARPLINE_LONG_VERSION={long}");
}

/// `a1b2c3d4e5f6 2026-12-02` for HEAD, rebuilt when HEAD moves (a commit, a checkout).
fn from_git() -> Option<String> {
    let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
    let date = git(&["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
    // Rerun when HEAD or the branch it points at moves; paths as git itself resolves them
    // (a worktree's HEAD lives outside the checkout).
    let mut watched = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watched.push(git(&["rev-parse", "--git-path", &branch]));
        watched.push(git(&["rev-parse", "--git-path", "packed-refs"]));
    }
    for path in watched.into_iter().flatten() {
        let path = PathBuf::from(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(format!("{rev} {date}").trim().to_owned())
}
