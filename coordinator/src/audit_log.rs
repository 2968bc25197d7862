//! The audit writer: appends sealed records to a JSONL file, one event-loop turn at a time.
//!
//! The coordinator stages a turn's records, then [`AuditLog::commit`] writes them and calls
//! `fdatasync` before anything the turn implies is acted on (a StepSpec published, a timer
//! armed). A crash can therefore lose a turn that was never acted on, but never leave an action
//! missing from the log. Opening an existing log verifies it first and continues its chain, so
//! one file may hold many backfills.
//!
//! Lines are written at their own offset (`pwrite`), not appended: a line's bytes and place in
//! the file follow from the chain before it. In fleet mode a deposed leader may wake after its
//! successor copied that leader's last committed turn from PostgreSQL into the same file; its
//! late write then puts the same bytes where they already are, instead of appending them a
//! second time.

use std::fs::{File, OpenOptions};
use std::io::BufReader;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::Utc;
use uuid::Uuid;
use warpline_shared::audit::{self, AuditEvent, AuditRecord, Verified};

/// Bytes of staged lines whose buffer is kept for the next turn; a larger one is released
/// after its commit.
const STAGED_KEPT: usize = 1 << 20;

/// An open, append-only audit log.
pub struct AuditLog {
    path: PathBuf,
    file: File,
    /// Where the next line goes: the length of the lines written so far.
    end: u64,
    /// The last written line's number.
    seq: u64,
    /// The last written line's hash.
    head: String,
    /// Records staged in this turn, already sealed: their lines, each with its newline.
    staged: String,
    staged_seq: u64,
    staged_head: String,
}

impl AuditLog {
    /// Opens (or creates) a log, verifying what it already holds.
    pub fn open(path: impl AsRef<Path>) -> anyhow::Result<AuditLog> {
        let path = path.as_ref();
        let verified = if path.exists() {
            let f = File::open(path)
                .with_context(|| format!("cannot read the audit log `{}`", path.display()))?;
            match audit::verify(BufReader::new(f)) {
                Ok(v) => v,
                Err(e) => bail!(
                    "the existing audit log `{}` does not verify ({e}); refusing to append to it: \
                     give another --audit file",
                    path.display()
                ),
            }
        } else {
            Verified::empty()
        };
        AuditLog::open_verified(path, verified)
    }

    /// Opens (or creates) a log that its caller has just verified (`v`, [`audit::verify`] of
    /// the file as it is; an empty one for a file that does not exist): a large log is read
    /// once, not once to check it and again to append to it.
    pub fn open_verified(path: impl AsRef<Path>, v: Verified) -> anyhow::Result<AuditLog> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the audit directory `{}`", dir.display())
            })?;
        }
        let Verified {
            lines: seq,
            head,
            bytes,
        } = v;
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the audit log `{}`", path.display()))?;
        // Where the verified lines end, not the file's length now: lines another writer put
        // after them since (a deposed leader's last turn) are the same bytes this log writes
        // in the same place.
        let mut end = bytes;
        // A complete last line whose end of line was lost gets it back before anything is
        // written after it (a torn one does not verify above).
        if seq > 0 {
            let mut last = [0u8; 1];
            file.read_exact_at(&mut last, end - 1)?;
            if last[0] != b'\n' {
                file.write_all_at(b"\n", end)?;
                file.sync_data()?;
                end += 1;
            }
        }
        Ok(AuditLog {
            path,
            file,
            end,
            seq,
            staged_seq: seq,
            staged_head: head.clone(),
            head,
            staged: String::new(),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The hash of the last committed line.
    pub fn head(&self) -> &str {
        &self.head
    }

    /// Lines committed so far.
    pub fn lines(&self) -> u64 {
        self.seq
    }

    /// Seals a record into this turn and returns it.
    pub fn stage(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> AuditRecord {
        self.stage_line(backfill_id, run_id, event).0
    }

    /// Like [`AuditLog::stage`], and also returns where the sealed line (without its newline)
    /// is among the staged ones ([`AuditLog::staged_line`]), so a store that writes the line
    /// elsewhere too needs neither to seal the record again nor to keep a copy of the line.
    pub fn stage_line(
        &mut self,
        backfill_id: Option<Uuid>,
        run_id: Option<Uuid>,
        event: AuditEvent,
    ) -> (AuditRecord, Range<usize>) {
        self.staged_seq += 1;
        let record = AuditRecord {
            seq: self.staged_seq,
            ts: Utc::now(),
            prev_hash: self.staged_head.clone(),
            backfill_id,
            run_id,
            event,
        };
        let (line, hash) = audit::seal(&record);
        let at = self.staged.len()..self.staged.len() + line.len();
        self.staged.push_str(&line);
        self.staged.push('\n');
        self.staged_head = hash;
        (record, at)
    }

    /// A line staged in this turn, by the place [`AuditLog::stage_line`] returned.
    pub fn staged_line(&self, at: Range<usize>) -> &str {
        &self.staged[at]
    }

    /// Writes and syncs the staged records, right after the lines written before them. Call
    /// before acting on them.
    pub fn commit(&mut self) -> anyhow::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.file
            .write_all_at(self.staged.as_bytes(), self.end)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("cannot write the audit log `{}`", self.path.display()))?;
        self.end += self.staged.len() as u64;
        self.staged.clear();
        // A large turn's lines (a 100,000-partition submit's are ~40 MB) are not kept for the
        // small turns after it.
        if self.staged.capacity() > STAGED_KEPT {
            self.staged = String::new();
        }
        self.seq = self.staged_seq;
        self.head = self.staged_head.clone();
        Ok(())
    }

    /// Writes lines sealed elsewhere (the database's, for the seqs this file lacks) after the
    /// last line, as [`AuditLog::commit`] writes its own, and continues the chain from them;
    /// returns how many it added. Lines the file already holds are skipped (a deposed leader
    /// may have written its last turn since the caller looked). Nothing may be staged.
    pub fn catch_up<'a>(
        &mut self,
        lines: impl IntoIterator<Item = &'a str>,
    ) -> anyhow::Result<u64> {
        assert!(self.staged.is_empty(), "catch_up with records staged");
        let mut added = 0;
        for line in lines {
            let (rec, hash) = audit::parse_line(line).map_err(|e| {
                anyhow::anyhow!("audit line {} to copy does not verify ({e})", self.seq + 1)
            })?;
            if rec.seq <= self.seq {
                continue;
            }
            if rec.seq != self.seq + 1 || rec.prev_hash != self.head {
                bail!(
                    "audit line {} to copy does not continue the chain of `{}` (line {}, head {})",
                    rec.seq,
                    self.path.display(),
                    self.seq,
                    self.head
                );
            }
            self.staged.push_str(line);
            self.staged.push('\n');
            self.seq = rec.seq;
            self.head = hash;
            added += 1;
        }
        self.staged_seq = self.seq;
        self.staged_head = self.head.clone();
        self.commit()?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use warpline_shared::contracts::Action;

    use super::*;

    fn event(to: &str) -> AuditEvent {
        AuditEvent::Transition {
            from: "INIT".into(),
            to: to.into(),
            action: Some(Action::Proceed),
        }
    }

    #[test]
    fn commits_verify_and_reopening_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.stage(None, None, event("A"));
        log.stage(None, None, event("B"));
        // Nothing reaches the file before the commit.
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        log.commit().unwrap();
        drop(log);
        let mut log = AuditLog::open(&path).unwrap();
        assert_eq!(log.lines(), 2);
        let rec = log.stage(None, None, event("C"));
        assert_eq!(rec.seq, 3);
        log.commit().unwrap();
        let v = audit::verify(BufReader::new(File::open(&path).unwrap())).unwrap();
        assert_eq!(v.lines, 3);
        assert_eq!(v.head, log.head());
    }

    #[test]
    fn refuses_to_append_to_a_broken_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut log = AuditLog::open(&path).unwrap();
        log.stage(None, None, event("A"));
        log.commit().unwrap();
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("\"A\"", "\"Z\"");
        std::fs::write(&path, text).unwrap();
        let err = AuditLog::open(&path).err().unwrap().to_string();
        assert!(err.contains("does not verify"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }
}
