//! Path confinement: the one lexical check that a path stays under one of its allowed roots.
//!
//! The config renders a step's paths and refuses any that leave the workdir and the config's
//! directory; the executor checks a StepSpec's paths again against its workdir and input roots
//! before it runs anything; the coordinator's API uses the same check for what a submit may
//! name. All of them call [`confined`], so "under a root" means the same everywhere. The check
//! is lexical by design: `.` and `..` are resolved without the filesystem (`..` at the root
//! stays at the root, as the operating system has it) and symbolic links are not followed.

use std::path::{Component, Path, PathBuf};

/// Normalises `.` and `..` without touching the filesystem; a relative path keeps the `..`
/// that climb above its start.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Makes `path` absolute against `base` and removes `.` and `..` without touching the
/// filesystem (`..` at the root stays at the root).
pub fn lexical_absolute(base: &Path, path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    let mut out = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::Prefix(_) | Component::RootDir => out.push(component.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
        }
    }
    out
}

/// True when `path`, taken from `base` when relative, lies lexically under one of `roots`
/// (each also taken from `base`). `/srv/w2` is not under `/srv/w`: components are compared,
/// not strings.
pub fn confined<R: AsRef<Path>>(base: &Path, path: &Path, roots: &[R]) -> bool {
    let p = lexical_absolute(base, path);
    roots
        .iter()
        .any(|r| p.starts_with(lexical_absolute(base, r.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_paths() {
        let base = Path::new("/srv/w");
        assert_eq!(
            lexical_absolute(base, Path::new("a/../b/./c")),
            PathBuf::from("/srv/w/b/c")
        );
        assert_eq!(
            lexical_absolute(base, Path::new("/x/../../..")),
            PathBuf::from("/")
        );
        assert_eq!(
            lexical_absolute(base, Path::new("../w2")),
            PathBuf::from("/srv/w2")
        );
        assert_eq!(normalize(Path::new("a/../../b")), PathBuf::from("../b"));
    }

    #[test]
    fn confined_compares_components_and_resolves_dotdot() {
        let base = Path::new("/");
        let roots = [Path::new("/srv/w"), Path::new("/etc/warpline")];
        assert!(confined(base, Path::new("/srv/w/a/b"), &roots));
        assert!(confined(base, Path::new("/srv/w"), &roots));
        assert!(confined(base, Path::new("/etc/warpline/ref.csv"), &roots));
        assert!(!confined(base, Path::new("/srv/w2/a"), &roots));
        assert!(!confined(base, Path::new("/srv/w/../x"), &roots));
        assert!(!confined(base, Path::new("/etc/passwd"), &roots));
        assert!(confined(Path::new("/srv/w"), Path::new("a/b"), &["."]));
        assert!(!confined(Path::new("/srv/w"), Path::new("../x"), &["."]));
        let none: [&Path; 0] = [];
        assert!(!confined(base, Path::new("/srv/w"), &none));
    }
}
