//! What a worker may run: allowlist entries, and how a command is found.
//!
//! An entry is a program, optionally followed by the arguments every allowed invocation must
//! start with: `load-batch` allows `load-batch` with any arguments; `/opt/venv/bin/python
//! /opt/toolchain/url_to_manifest.py` allows that interpreter only with that script first,
//! so `python -c '…'` or another script is refused. Tokens are separated by whitespace (a path
//! with a space cannot be pinned). A token with a `/` is a path: made absolute against the
//! directory the entry was given in ([`AllowEntry::parse`]) and compared with the argument made
//! absolute against the step's `cwd`; any other token must equal its argument.
//!
//! A command is looked up predictably ([`resolve_command`]): a path (with a `/`) as given, a
//! bare name in the operator's explicit tools directories and then on `PATH`. Nothing is
//! looked for beside the running binary.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

pub use warpline_shared::paths::lexical_absolute;

use warpline_shared::fleet::AllowedCommand;

/// Programs that run whatever code their arguments hold; an entry for one of them without a
/// pinned script allows arbitrary code and is warned about.
const INTERPRETERS: [&str; 19] = [
    "python", "python2", "python3", "pypy", "pypy3", "sh", "bash", "dash", "zsh", "ksh", "fish",
    "node", "deno", "bun", "perl", "ruby", "php", "Rscript", "env",
];

/// One allowlist entry: a program and the argument prefix it is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// The entry as written.
    pub text: String,
    /// The program: a bare name, or an absolute path.
    pub program: String,
    /// Arguments every allowed invocation starts with (paths made absolute).
    pub prefix: Vec<String>,
}

/// An allowlist entry that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllowError {
    /// Nothing in it.
    #[error("empty allowlist entry: name a program, optionally followed by its pinned arguments")]
    Empty,
    /// It starts with an option.
    #[error("allowlist entry `{0}` starts with `-`: it must start with a program name or path")]
    Option(String),
    /// A `--tools-dir` or `--path-root` that cannot be used.
    #[error("--{flag} `{}` {reason}", dir.display())]
    Dir {
        /// The option that named it.
        flag: &'static str,
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Both `--confine-args` and `--unconfined-args` were given.
    #[error(
        "give one of --confine-args and --unconfined-args (or WARPLINE_CONFINE_ARGS and WARPLINE_UNCONFINED_ARGS), not both"
    )]
    ConfinementFlags,
    /// The current directory, against which relative entries are taken, cannot be read.
    #[error("cannot read the current directory for relative --allow entries: {0}")]
    Cwd(String),
}

/// Parses command-line `--allow` entries (relative paths from the current directory) into an
/// [`crate::ExecConfig`] allowlist, and warns about an interpreter allowed with no pinned
/// script: it would run any code a StepSpec names.
pub fn parse_allowlist(entries: &[String]) -> Result<BTreeSet<String>, AllowError> {
    let here = std::env::current_dir().map_err(|e| AllowError::Cwd(e.to_string()))?;
    let mut out = BTreeSet::new();
    for e in entries.iter().filter(|e| !e.trim().is_empty()) {
        let entry = AllowEntry::parse(e, &here)?;
        if entry.is_unpinned_interpreter() {
            tracing::warn!(
                entry = %entry.text,
                "an interpreter is allowed with no pinned script: any step could run `{} -c ...`; pin what it runs, e.g. `--allow '{} /path/to/script.py'`",
                entry.program,
                entry.program
            );
        }
        out.insert(entry.to_text());
    }
    Ok(out)
}

/// Makes `--tools-dir` directories absolute and checks they exist.
pub fn tools_dirs(dirs: Vec<PathBuf>) -> Result<Vec<PathBuf>, AllowError> {
    existing_dirs("tools-dir", dirs)
}

/// Makes `--path-root` directories absolute and checks they exist.
pub fn path_roots(dirs: Vec<PathBuf>) -> Result<Vec<PathBuf>, AllowError> {
    existing_dirs("path-root", dirs)
}

fn existing_dirs(flag: &'static str, dirs: Vec<PathBuf>) -> Result<Vec<PathBuf>, AllowError> {
    dirs.into_iter()
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| {
            if !d.is_dir() {
                return Err(AllowError::Dir {
                    flag,
                    dir: d,
                    reason: "is not a directory".into(),
                });
            }
            std::path::absolute(&d).map_err(|e| AllowError::Dir {
                flag,
                dir: d.clone(),
                reason: format!("cannot be made absolute: {e}"),
            })
        })
        .collect()
}

impl AllowEntry {
    /// Parses an entry; relative paths in it are taken from `base` (the directory it was given
    /// in, normally the current one).
    pub fn parse(text: &str, base: &Path) -> Result<AllowEntry, AllowError> {
        let mut tokens = text.split_whitespace();
        let program = tokens.next().ok_or(AllowError::Empty)?;
        if program.starts_with('-') {
            return Err(AllowError::Option(text.trim().to_string()));
        }
        let abs = |t: &str| {
            if t.contains('/') {
                lexical_absolute(base, Path::new(t)).display().to_string()
            } else {
                t.to_string()
            }
        };
        Ok(AllowEntry {
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
            program: abs(program),
            prefix: tokens.map(abs).collect(),
        })
    }

    /// The entry with absolute paths, as text.
    pub fn to_text(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.prefix.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// True when this entry lets an interpreter run code its entry does not pin.
    pub fn is_unpinned_interpreter(&self) -> bool {
        self.prefix.is_empty() && is_interpreter(&self.program)
    }

    /// True when this entry allows `command` (resolved to `program`) with `args`, run in `cwd`.
    pub fn allows(
        &self,
        command: &str,
        program: Option<&Path>,
        args: &[String],
        cwd: &Path,
        tools_dirs: &[PathBuf],
    ) -> bool {
        let program_matches = self.program == command
            || match (program, self.resolved(tools_dirs)) {
                (Some(p), Some(mine)) => lexical_absolute(Path::new("/"), p) == mine,
                _ => false,
            };
        program_matches && prefix_matches(&self.prefix, args, cwd)
    }

    fn resolved(&self, tools_dirs: &[PathBuf]) -> Option<PathBuf> {
        if self.program.contains('/') {
            Some(PathBuf::from(&self.program))
        } else {
            resolve_command(&self.program, tools_dirs).ok()
        }
    }
}

/// True when `args` start with `prefix`: a token with a `/` compared as an absolute path (the
/// argument made absolute against `cwd`), any other token as is.
fn prefix_matches(prefix: &[String], args: &[String], cwd: &Path) -> bool {
    prefix.len() <= args.len()
        && prefix.iter().zip(args).all(|(want, got)| {
            want == got
                || (want.contains('/')
                    && got.contains('/')
                    && lexical_absolute(cwd, Path::new(got)) == Path::new(want))
        })
}

/// What a worker advertises in its heartbeats: each allowlist entry with the program it
/// resolves to on this worker (its tools dirs, then `PATH`), looked up afresh each time, so a
/// tool installed later shows up.
pub fn advertise(allowlist: &BTreeSet<String>, tools_dirs: &[PathBuf]) -> Vec<AllowedCommand> {
    allowlist
        .iter()
        .filter_map(|e| AllowEntry::parse(e, Path::new("/")).ok())
        .map(|e| AllowedCommand {
            entry: e.to_text(),
            resolved: e.resolved(tools_dirs).map(|p| p.display().to_string()),
            program: e.program,
            pinned: e.prefix,
        })
        .collect()
}

/// True when a worker that advertises `entries` may run `command` with `args` in `cwd`, as far
/// as the coordinator can tell without the worker's filesystem: an entry that resolves on that
/// worker names the command (the same bare name, its resolved path, or, for a bare command
/// and an entry given as a path, the same file name) and its pinned arguments match. The
/// worker's own check ([`crate::check_allowed`]) stays the authority: a step this wrongly
/// allows is handed back, never run.
pub fn advertised_allows(
    entries: &[AllowedCommand],
    command: &str,
    args: &[String],
    cwd: &Path,
) -> bool {
    entries.iter().any(|e| {
        let Some(resolved) = e.resolved.as_deref() else {
            return false;
        };
        let program_matches = e.program == command
            || if command.contains('/') {
                lexical_absolute(Path::new("/"), Path::new(command)) == Path::new(resolved)
            } else {
                e.program.contains('/')
                    && Path::new(resolved).file_name() == Some(std::ffi::OsStr::new(command))
            };
        program_matches && prefix_matches(&e.pinned, args, cwd)
    })
}

/// True when `program`'s file name is a known interpreter (`python3.12` counts as `python3`).
pub fn is_interpreter(program: &str) -> bool {
    let name = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let base = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    INTERPRETERS.contains(&name.as_str()) || INTERPRETERS.contains(&base)
}

/// Why a command could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No executable by that name.
    #[error("command `{command}` not found (looked in {looked_in})")]
    NotFound {
        /// The command as given.
        command: String,
        /// Where it was looked for.
        looked_in: String,
    },
    /// The path could not be made absolute.
    #[error("cannot resolve command `{command}`: {source}")]
    Io {
        /// The command as given.
        command: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

/// Finds the program for `command`: a path when it has a `/` (a relative one from the current
/// directory), else the first executable of that name in `tools_dirs` then `$PATH`.
pub fn resolve_command(command: &str, tools_dirs: &[PathBuf]) -> Result<PathBuf, ResolveError> {
    if command.is_empty() {
        return Err(ResolveError::NotFound {
            command: String::new(),
            looked_in: "nowhere: the command is empty".into(),
        });
    }
    if command.contains('/') {
        let path = std::path::absolute(command).map_err(|source| ResolveError::Io {
            command: command.to_string(),
            source,
        })?;
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ResolveError::NotFound {
                command: command.to_string(),
                looked_in: format!("`{}`", path.display()),
            })
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = tools_dirs
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path_var))
        .collect();
    let mut not_executable = None;
    for dir in &dirs {
        let candidate = dir.join(command);
        if candidate.is_file() {
            if is_executable(&candidate) {
                return Ok(candidate);
            }
            not_executable.get_or_insert(candidate);
        }
    }
    // A file that exists but is not executable is still the answer, as in a shell: starting it
    // then fails with "permission denied" (exit 126) rather than "not found".
    not_executable.ok_or_else(|| ResolveError::NotFound {
        command: command.to_string(),
        looked_in: if dirs.is_empty() {
            "no directory: the tools directories and $PATH are empty".into()
        } else {
            dirs.iter()
                .map(|d| format!("`{}`", d.display()))
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_pinned_interpreter_runs_only_its_script() {
        let e =
            AllowEntry::parse("python3 scripts/url_to_manifest.py", Path::new("/opt/tc")).unwrap();
        assert_eq!(e.program, "python3");
        assert_eq!(e.prefix, ["/opt/tc/scripts/url_to_manifest.py"]);
        assert_eq!(e.to_text(), "python3 /opt/tc/scripts/url_to_manifest.py");
        let cwd = Path::new("/srv/w/runs/2024-01");
        let ok = |a: &[&str]| e.allows("python3", None, &args(a), cwd, &[]);
        assert!(ok(&[
            "/opt/tc/scripts/url_to_manifest.py",
            "--month",
            "2024-01"
        ]));
        assert!(ok(&["../../../../opt/tc/scripts/url_to_manifest.py"]));
        assert!(!ok(&["-c", "import os"]));
        assert!(!ok(&["/opt/tc/scripts/other.py"]));
        assert!(!ok(&[]));
        assert!(!e.allows(
            "python",
            None,
            &args(&["/opt/tc/scripts/url_to_manifest.py"]),
            cwd,
            &[]
        ));
        assert!(!e.is_unpinned_interpreter());
    }

    #[test]
    fn a_program_path_matches_what_a_name_resolves_to() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("load-batch");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tools = [dir.path().to_path_buf()];
        let by_name = AllowEntry::parse("load-batch", Path::new("/")).unwrap();
        assert!(by_name.allows("load-batch", Some(&tool), &[], Path::new("/"), &tools));
        let cmd = tool.display().to_string();
        assert!(by_name.allows(&cmd, Some(&tool), &args(&["x"]), Path::new("/"), &tools));
        let other = dir.path().join("other");
        assert!(!by_name.allows("other", Some(&other), &[], Path::new("/"), &tools));
        let by_path = AllowEntry::parse(&cmd, Path::new("/")).unwrap();
        assert!(by_path.allows(&cmd, Some(&tool), &[], Path::new("/"), &[]));
    }

    #[test]
    fn an_advertised_allowlist_allows_what_the_worker_would() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("load-batch");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tools = [dir.path().to_path_buf()];
        let list: BTreeSet<String> = [
            "load-batch".to_string(),
            "python3 /opt/tc/export.py".to_string(),
            "missing-tool".to_string(),
        ]
        .into();
        let ad = advertise(&list, &tools);
        assert_eq!(ad.len(), 3);
        let load = ad.iter().find(|a| a.program == "load-batch").unwrap();
        assert_eq!(load.resolved.as_deref(), Some(tool.to_str().unwrap()));
        let missing = ad.iter().find(|a| a.program == "missing-tool").unwrap();
        assert_eq!(missing.resolved, None);
        let cwd = Path::new("/w/runs/2024-01");
        assert!(advertised_allows(&ad, "load-batch", &args(&["--x"]), cwd));
        // A command given as a path matches the entry that resolves to it.
        assert!(advertised_allows(&ad, tool.to_str().unwrap(), &[], cwd));
        // Allowed but not resolvable on the worker: it would hand the step back.
        assert!(!advertised_allows(&ad, "missing-tool", &[], cwd));
        assert!(!advertised_allows(&ad, "url_to_manifest", &[], cwd));
        // The pinned script is required when python3 resolves at all on this machine.
        if ad
            .iter()
            .any(|a| a.program == "python3" && a.resolved.is_some())
        {
            assert!(advertised_allows(
                &ad,
                "python3",
                &args(&["/opt/tc/export.py", "--month", "2024-01"]),
                cwd
            ));
            assert!(!advertised_allows(
                &ad,
                "python3",
                &args(&["-c", "print(1)"]),
                cwd
            ));
        }
        assert!(!advertised_allows(&[], "load-batch", &[], cwd));
        // An entry given as a path serves a bare command of the same file name.
        let by_path: BTreeSet<String> = [tool.display().to_string()].into();
        assert!(advertised_allows(
            &advertise(&by_path, &[]),
            "load-batch",
            &[],
            cwd
        ));
    }

    #[test]
    fn interpreters_and_bad_entries() {
        for i in [
            "python3",
            "/opt/venv/bin/python",
            "python3.12",
            "bash",
            "env",
        ] {
            assert!(is_interpreter(i), "{i}");
        }
        for n in ["load-batch", "python-ish", "url_to_manifest"] {
            assert!(!is_interpreter(n), "{n}");
        }
        assert!(
            AllowEntry::parse("sh", Path::new("/"))
                .unwrap()
                .is_unpinned_interpreter()
        );
        assert_eq!(
            AllowEntry::parse("  ", Path::new("/")),
            Err(AllowError::Empty)
        );
        assert!(matches!(
            AllowEntry::parse("-c x", Path::new("/")),
            Err(AllowError::Option(_))
        ));
    }

    #[test]
    fn resolve_looks_in_tools_dirs_then_path_and_reports_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("sh");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            resolve_command("sh", &[dir.path().to_path_buf()]).unwrap(),
            tool
        );
        assert_ne!(resolve_command("sh", &[]).unwrap(), tool);

        let err =
            resolve_command("warpline-no-such-tool", &[dir.path().to_path_buf()]).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("command `warpline-no-such-tool` not found (looked in `"),
            "{msg}"
        );
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }
}
