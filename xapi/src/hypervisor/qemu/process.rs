//! The VMM process: spawned detached, recognised by pid and start time,
//! signalled through a pidfd.
//!
//! A VM process must outlive the daemon (even `kill -9` of it), so it runs
//! in its own session (`setsid`): no signal sent to the daemon's process
//! group or terminal reaches it. Its stdin is null and its output goes to a
//! log file, so nothing ties it to the daemon's descriptors.
//!
//! A pid alone is not an identity: once a VM ends its pid can be recycled.
//! [`ProcessIdentity`] adds the start time (`/proc/PID/stat` field 22, in
//! clock ticks since boot), and signals go through a pidfd opened *before*
//! that check, so the process checked is the process signalled.

use std::fs::File;
use std::io::{self, ErrorKind};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

/// The fields of `/proc/PID/stat` the driver needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie: ended, not yet reaped), ...
    pub state: char,
    /// Field 6: the session id.
    pub session: u32,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses a `/proc/PID/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3.
    let field = |number: usize| fields.get(number - 3).copied();
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        session: field(6)?.parse().ok()?,
        start_ticks: field(22)?.parse().ok()?,
    })
}

/// Reads `/proc/PID/stat`; `None` when there is no such process.
pub fn read_stat(pid: u32) -> io::Result<Option<ProcStat>> {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(text) => parse_stat(&text).map(Some).ok_or_else(|| {
            io::Error::new(
                ErrorKind::InvalidData,
                format!("/proc/{pid}/stat is malformed"),
            )
        }),
        Err(error) if matches!(error.kind(), ErrorKind::NotFound) => Ok(None),
        // ESRCH: the process went away while being read.
        Err(error) if error.raw_os_error() == Some(3) => Ok(None),
        Err(error) => Err(error),
    }
}

/// What a recorded process is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// It runs.
    Alive,
    /// It ended and waits to be reaped by its parent.
    Zombie,
    /// No process has its pid.
    Gone,
    /// Another, newer process has its pid.
    Recycled,
}

/// A process as recorded: pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    /// The pid.
    pub pid: u32,
    /// Its start time (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

impl ProcessIdentity {
    /// The identity of a live pid.
    pub fn of(pid: u32) -> io::Result<Self> {
        let stat = read_stat(pid)?
            .ok_or_else(|| io::Error::new(ErrorKind::NotFound, format!("no process {pid}")))?;
        Ok(ProcessIdentity {
            pid,
            start_ticks: stat.start_ticks,
        })
    }

    /// Where this process stands.
    pub fn liveness(&self) -> io::Result<Liveness> {
        Ok(match read_stat(self.pid)? {
            None => Liveness::Gone,
            Some(stat) if stat.start_ticks != self.start_ticks => Liveness::Recycled,
            Some(stat) if stat.state == 'Z' || stat.state == 'X' => Liveness::Zombie,
            Some(_) => Liveness::Alive,
        })
    }

    /// A pidfd on this very process, or `None` when it is gone (or its pid
    /// recycled). A zombie still gets one.
    pub fn pidfd(&self) -> io::Result<Option<OwnedFd>> {
        let Some(pid) = i32::try_from(self.pid).ok().and_then(Pid::from_raw) else {
            return Ok(None);
        };
        let fd = match pidfd_open(pid, PidfdFlags::empty()) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::SRCH) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        // The pidfd was opened before this check: if the start time matches
        // now, the fd refers to our process even if the pid is reused later.
        match self.liveness()? {
            Liveness::Alive | Liveness::Zombie => Ok(Some(fd)),
            Liveness::Gone | Liveness::Recycled => Ok(None),
        }
    }

    /// Sends SIGKILL if the process is still this one; `false` if it was
    /// already gone.
    pub fn kill(&self) -> io::Result<bool> {
        let Some(fd) = self.pidfd()? else {
            return Ok(false);
        };
        match pidfd_send_signal(&fd, Signal::KILL) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::SRCH) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Waits until the process has ended (exited, possibly not yet reaped),
    /// at most `timeout`; `true` if it has.
    pub fn wait_exit(&self, timeout: Duration) -> io::Result<bool> {
        let Some(fd) = self.pidfd()? else {
            return Ok(true);
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let timespec = Timespec::try_from(left).unwrap_or(Timespec {
                tv_sec: i64::MAX,
                tv_nsec: 0,
            });
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            match poll(&mut fds, Some(&timespec)) {
                Ok(0) => return Ok(false),
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => {}
                Err(error) => return Err(error.into()),
            }
            if left.is_zero() {
                return Ok(false);
            }
        }
    }
}

/// Spawns `binary` with `args` in its own session, stdin null, stdout and
/// stderr to `log`.
pub fn spawn_detached(binary: &Path, args: &[String], log: File) -> io::Result<Child> {
    let stderr = log.try_clone()?;
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr));
    set_new_session(&mut command);
    command.spawn()
}

#[allow(unsafe_code)]
fn set_new_session(command: &mut Command) {
    // SAFETY: the closure runs in the child between fork and exec, where
    // only async-signal-safe calls are allowed: `setsid` is a single system
    // call (rustix issues it directly, no allocation, no lock), and the
    // closure captures nothing. std's `setsid` on `Command` is unstable.
    unsafe {
        command.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypervisor_parses_stat_with_awkward_names() {
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 3213 0 0 0 12 7 0 0 20 0 5 0 987654 1234567 890 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0\n";
        let stat = parse_stat(line).expect("parses");
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                session: 4242,
                start_ticks: 987_654,
            }
        );
        assert_eq!(parse_stat("12 (short) R 1"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn hypervisor_reads_own_identity() {
        let me = ProcessIdentity::of(std::process::id()).expect("own stat");
        assert_eq!(me.liveness().expect("liveness"), Liveness::Alive);
        let older = ProcessIdentity {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert_eq!(older.liveness().expect("liveness"), Liveness::Recycled);
        assert!(older.pidfd().expect("pidfd").is_none());
        // pid_max is at most 2^22 on Linux.
        let absent = ProcessIdentity {
            pid: 1 << 23,
            start_ticks: 0,
        };
        assert_eq!(absent.liveness().expect("liveness"), Liveness::Gone);
        assert!(!absent.kill().expect("kill of nothing"));
        assert!(absent.wait_exit(Duration::ZERO).expect("wait"));
    }

    #[test]
    fn hypervisor_spawns_detached_and_kills_by_identity() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = File::create(dir.path().join("log")).expect("log");
        let mut child = spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), "echo started; exec sleep 30".into()],
            log,
        )
        .expect("spawn");
        let identity = ProcessIdentity::of(child.id()).expect("identity");
        let log_path = dir.path().join("log");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .is_empty()
        {
            assert!(Instant::now() < deadline, "the child never wrote its log");
            std::thread::sleep(Duration::from_millis(5));
        }
        let stat = read_stat(child.id()).expect("stat").expect("alive");
        assert_eq!(stat.session, child.id(), "runs in its own session");
        assert!(!identity.wait_exit(Duration::from_millis(50)).expect("wait"));
        assert!(identity.kill().expect("kill"));
        assert!(identity.wait_exit(Duration::from_secs(5)).expect("wait"));
        assert_eq!(identity.liveness().expect("liveness"), Liveness::Zombie);
        let status = child.wait().expect("reap");
        assert!(!status.success());
        assert_eq!(identity.liveness().expect("liveness"), Liveness::Gone);
        let log = std::fs::read_to_string(&log_path).expect("log");
        assert_eq!(log, "started\n");
    }
}
