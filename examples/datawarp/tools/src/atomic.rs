//! Atomic file output: every tool writes to a temporary file beside the target and renames it
//! into place, so a reader (or a validator) never sees half a file, even when a step is killed.

use std::io::Write;
use std::path::Path;

use crate::error::{Result, ResultExt};

/// Writes `bytes` to `path` atomically, creating missing parent directories.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .permanent(|| format!("cannot create directory `{}`", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files are private by default; outputs are read by other workers and people.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut temp = builder
        .tempfile_in(dir)
        .permanent(|| format!("cannot create a temporary file in `{}`", dir.display()))?;
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .permanent(|| format!("cannot write `{}`", path.display()))?;
    temp.persist(path)
        .permanent(|| format!("cannot move the output into `{}`", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_into_new_directories_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("a/b/out.yaml");
        super::write(&target, b"one").unwrap();
        super::write(&target, b"two").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"two");
        let entries = std::fs::read_dir(dir.path().join("a/b")).unwrap().count();
        assert_eq!(entries, 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&target).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o644);
        }
    }
}
