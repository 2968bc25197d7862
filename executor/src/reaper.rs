//! The reaper: a small process that kills a worker's tools when the worker dies.
//!
//! A worker that dies (SIGKILL, the OOM killer) must take its tools with it: the broker hands
//! the step to another worker, and two copies must never write the same artefacts at once.
//! `PR_SET_PDEATHSIG` set in a `pre_exec` hook did that, but a `pre_exec` hook makes std `fork`
//! the whole multi-threaded worker for every tool instead of using `posix_spawn` (a `vfork`),
//! and that fork cost more CPU than anything else the worker does per step
//! (docs/BENCHMARKS.md).
//!
//! Instead, a worker starts one [`Reaper`] (its own binary again, with a hidden subcommand that
//! calls [`serve`]) whose standard input is a pipe only the worker holds the write end of
//! (close-on-exec, so no tool inherits it). After spawning a tool, before anything else, the
//! worker writes the tool's process group id into the pipe ([`Reaper::register`]), and when the
//! attempt is over it writes it again, negated ([`Reaper::unregister`]). The kernel closes a
//! process's descriptors however it dies, so when the worker dies the reaper reads end of file,
//! sends `SIGKILL` to every group still registered, and exits. A worker that ends normally
//! drops its write end the same way, with nothing left registered.
//!
//! What this relies on, and does not cover:
//!
//! - Records are 4 bytes, fewer than `PIPE_BUF`, so writes from several threads never
//!   interleave.
//! - Between `posix_spawn` returning (the tool has already exec'd) and the registration's one
//!   `write(2)` there is no `.await` and no allocation: a worker killed in that window of a few
//!   microseconds leaves that one tool running. `PR_SET_PDEATHSIG` had no such window; it
//!   is the price of not forking, and it is documented in ARCHITECTURE.md.
//! - The whole group is killed, so a tool's own children in its group die too (the death
//!   signal reached only the tool itself). A child that left the group (`setsid`) escapes, as
//!   before.
//! - If the reaper itself dies, registration fails (`EPIPE`: nobody holds the read end) and the
//!   tool just spawned is killed; [`Reaper::exited`] lets the worker stop taking steps.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::signal::{SigHandler, Signal, killpg, signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

/// The bytes of one record: a process group id, little-endian; negative when unregistered.
const RECORD: usize = 4;

/// The worker's side of its reaper: the pipe's write end and whether the reaper still runs.
#[derive(Debug)]
pub struct Reaper {
    /// The write end of the reaper's standard input; only this process holds it.
    pipe: io::PipeWriter,
    /// The reaper's pid, for logs and tests.
    pid: u32,
    /// Set (by the task waiting for it) once the reaper exited.
    gone: Arc<AtomicBool>,
    /// Cancelled once the reaper exited.
    exited: CancellationToken,
    /// Set when this side is dropped: the reaper's exit that follows is the one asked for.
    closing: Arc<AtomicBool>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        // Before the pipe closes (the fields drop after this): its end of file is what makes
        // the reaper exit.
        self.closing.store(true, Ordering::SeqCst);
    }
}

impl Reaper {
    /// Starts `program args…` as this process's reaper: a program that calls [`serve`] on its
    /// standard input. It runs in a process group of its own, so a terminal's SIGINT does not
    /// reach it (it ignores SIGINT, SIGTERM and SIGHUP anyway and stops at end of file). Must be
    /// called inside a tokio runtime, which waits for the reaper's exit.
    pub fn start(program: &Path, args: &[&str]) -> io::Result<Reaper> {
        let (reader, writer) = io::pipe()?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn()?;
        // The read end was moved into `command`: drop it now, so that only the reaper holds it
        // and a write after the reaper died fails instead of filling a pipe nobody reads.
        drop(command);
        let pid = child.id().unwrap_or_default();
        let gone = Arc::new(AtomicBool::new(false));
        let closing = Arc::new(AtomicBool::new(false));
        let exited = CancellationToken::new();
        let (flag, token, asked) = (gone.clone(), exited.clone(), closing.clone());
        tokio::spawn(async move {
            let status = child.wait().await;
            flag.store(true, Ordering::SeqCst);
            if asked.load(Ordering::SeqCst) {
                tracing::debug!(reaper_pid = pid, ?status, "the reaper stopped");
            } else {
                tracing::error!(
                    reaper_pid = pid,
                    ?status,
                    "the reaper exited: tools started from now on would not die with this process"
                );
            }
            token.cancel();
        });
        tracing::debug!(reaper_pid = pid, "reaper started");
        Ok(Reaper {
            pipe: writer,
            pid,
            gone,
            exited,
            closing,
        })
    }

    /// The reaper's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the reaper is still running, as far as this process has seen.
    pub fn alive(&self) -> bool {
        !self.gone.load(Ordering::SeqCst)
    }

    /// Cancelled once the reaper exited.
    pub fn exited(&self) -> CancellationToken {
        self.exited.clone()
    }

    /// Registers a tool's process group: killed if this process dies before
    /// [`Reaper::unregister`]. One `write(2)`; fails when the reaper is gone.
    pub fn register(&self, pgid: Pid) -> io::Result<()> {
        self.send(pgid.as_raw())
    }

    /// Forgets a process group whose attempt is over, so that a later group reusing its id is
    /// never killed.
    pub fn unregister(&self, pgid: Pid) -> io::Result<()> {
        self.send(-pgid.as_raw())
    }

    fn send(&self, record: i32) -> io::Result<()> {
        if !self.alive() {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the reaper exited",
            ));
        }
        (&self.pipe).write_all(&record.to_le_bytes())
    }
}

/// The `main` of a binary that starts itself again as its reaper (`warpline-worker reap`,
/// `warpline reap`): as the reaper (`reap`), serve standard input on this one thread, with
/// no runtime; otherwise run `run` on a new tokio runtime.
pub fn main_with<F>(reap: bool, run: impl FnOnce() -> F) -> std::process::ExitCode
where
    F: std::future::Future<Output = std::process::ExitCode>,
{
    use std::process::ExitCode;
    if reap {
        return match serve(io::stdin().lock()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: the reaper cannot read its standard input: {e}");
                ExitCode::from(2)
            }
        };
    }
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::from(2)
        }
    }
}

/// The reaper's main: ignores SIGINT, SIGTERM and SIGHUP (a service manager that signals the
/// worker's whole cgroup must not take the reaper away while the worker drains; it stops when
/// the worker is gone), then [`reap`]s `input`.
pub fn serve(input: impl Read) -> io::Result<usize> {
    // SAFETY: setting a signal's disposition to "ignore" installs no handler, so nothing runs
    // in signal context; the reaper has one thread.
    unsafe {
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            signal(sig, SigHandler::SigIgn).map_err(io::Error::from)?;
        }
    }
    reap(input)
}

/// Reads records from `input` until end of file (or a read error), then sends `SIGKILL` to
/// every process group still registered. Returns how many it signalled.
pub fn reap(mut input: impl Read) -> io::Result<usize> {
    let mut groups = HashSet::new();
    let mut buf = [0u8; 1024 * RECORD];
    let mut carry = Vec::new();
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("warpline reaper: cannot read from the worker ({e}); killing its tools");
                break;
            }
        };
        carry.extend_from_slice(&buf[..n]);
        let whole = carry.len() - carry.len() % RECORD;
        for record in carry[..whole].chunks_exact(RECORD) {
            apply(
                &mut groups,
                i32::from_le_bytes(record.try_into().expect("4 bytes")),
            );
        }
        carry.drain(..whole);
    }
    let mut killed = 0;
    for pgid in groups {
        if killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok() {
            killed += 1;
        }
    }
    Ok(killed)
}

/// One record: a positive id registers a group, a negative one forgets it.
fn apply(groups: &mut HashSet<i32>, record: i32) {
    match record {
        0 | i32::MIN => {}
        r if r > 0 => {
            groups.insert(r);
        }
        r => {
            groups.remove(&-r);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    use super::*;

    /// A reader that returns one byte per read.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            buf[0] = *first;
            self.0 = rest;
            Ok(1)
        }
    }

    fn records(ids: &[i32]) -> Vec<u8> {
        ids.iter().flat_map(|r| r.to_le_bytes()).collect()
    }

    #[test]
    fn only_groups_still_registered_at_end_of_file_are_killed() {
        // A group of our own to kill: `sleep` in its own process group.
        let mut sleeper = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = sleeper.id() as i32;
        // 2^30 + 7 is above any pid_max, so signalling that group fails: it is never counted.
        let unused = (1 << 30) + 7;
        let input = records(&[unused, pgid, -unused]);
        // Delivered a byte at a time, as a pipe may.
        let killed = reap(Trickle(&input)).unwrap();
        assert_eq!(killed, 1);
        let status = sleeper.wait().unwrap();
        assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
    }

    #[test]
    fn an_unregistered_group_is_left_alone() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = sleeper.id() as i32;
        assert_eq!(reap(&records(&[pgid, -pgid])[..]).unwrap(), 0);
        assert_eq!(sleeper.try_wait().unwrap(), None, "the sleeper was killed");
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
    }
}
