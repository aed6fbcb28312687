//! A small, blocking QMP client over a Unix socket.
//!
//! Hand-written on purpose: the protocol the driver needs is a handful of
//! JSON lines (a greeting, `qmp_capabilities`, commands with an `id`,
//! asynchronous events in between), and the QMP crates on crates.io are
//! either async (tokio) or unmaintained; the driver stays synchronous.
//!
//! Every read has a deadline; events that arrive while a command is in
//! flight are kept and can be drained ([`QmpClient::take_events`]) or
//! awaited ([`QmpClient::wait_event`]). A reply whose `id` is not the one
//! awaited (left over from a command that timed out) is dropped.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

/// Longest message accepted (`query-*` replies are far smaller).
const MAX_LINE: usize = 8 << 20;

/// A QMP operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected (absent, or nobody listening).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(std::io::Error),
    /// The peer closed the connection (the VMM ended).
    #[error("the connection was closed")]
    Closed,
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The VMM refused the command.
    #[error("{command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QMP's description.
        desc: String,
    },
}

impl QmpError {
    /// The socket is absent or not (yet, or any more) listening.
    pub fn is_not_listening(&self) -> bool {
        matches!(self, QmpError::Connect(error)
            if matches!(error.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused))
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    /// Its name (`SHUTDOWN`, `RESET`, `STOP`, ...).
    pub name: String,
    /// Its data (`{}` when it has none).
    pub data: Value,
}

/// One QMP session, in command mode.
#[derive(Debug)]
pub struct QmpClient {
    stream: UnixStream,
    pending: Vec<u8>,
    next_id: u64,
    events: Vec<QmpEvent>,
    greeting: Value,
    timeout: Duration,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates command mode. `timeout`
    /// bounds each exchange (and is the default for [`QmpClient::execute`]).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(QmpError::Connect)?;
        Self::handshake(stream, timeout)
    }

    /// Runs the handshake on an already connected stream.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<Self, QmpError> {
        stream
            .set_write_timeout(Some(timeout))
            .map_err(QmpError::Io)?;
        let mut client = QmpClient {
            stream,
            pending: Vec::new(),
            next_id: 1,
            events: Vec::new(),
            greeting: Value::Null,
            timeout,
        };
        let deadline = Instant::now() + timeout;
        let greeting = loop {
            let message = client.read_message(deadline)?;
            if message.get("QMP").is_some() {
                break message;
            }
            client.keep_if_event(message)?;
        };
        client.greeting = greeting;
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// The greeting's `QMP` member (version and capabilities).
    pub fn greeting(&self) -> &Value {
        &self.greeting["QMP"]
    }

    /// The underlying socket (for its peer credentials).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, self.timeout)
    }

    /// [`QmpClient::execute`] with its own deadline.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = Map::new();
        request.insert("execute".into(), Value::from(command));
        if let Some(arguments) = arguments {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), json!(id));
        let mut line = Value::Object(request).to_string();
        line.push('\n');
        self.stream.write_all(line.as_bytes()).map_err(|error| {
            if matches!(
                error.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset
            ) {
                QmpError::Closed
            } else {
                QmpError::Io(error)
            }
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.read_message(deadline)?;
            if message.get("event").is_some() {
                self.keep_if_event(message)?;
                continue;
            }
            if message.get("id") != Some(&json!(id)) {
                // A late reply to an earlier command that timed out.
                continue;
            }
            if let Some(result) = message.get("return") {
                return Ok(result.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: error["class"].as_str().unwrap_or("unknown").to_owned(),
                    desc: error["desc"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Err(QmpError::Protocol(format!(
                "reply to {command} has neither return nor error: {message}"
            )));
        }
    }

    /// `query-status`: QEMU's run state (`running`, `paused`, `shutdown`,
    /// `guest-panicked`, `internal-error`, ...).
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None)?;
        status["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(format!("query-status without status: {status}")))
    }

    /// The events received so far, oldest first; clears them.
    pub fn take_events(&mut self) -> Vec<QmpEvent> {
        std::mem::take(&mut self.events)
    }

    /// Waits for an event named `name` (one already received counts) and
    /// returns it; other events are kept.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent, QmpError> {
        if let Some(index) = self.events.iter().position(|event| event.name == name) {
            return Ok(self.events.remove(index));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let message = self.read_message(deadline)?;
            if message["event"].as_str() == Some(name) {
                return Ok(to_event(&message));
            }
            self.keep_if_event(message)?;
        }
    }

    fn keep_if_event(&mut self, message: Value) -> Result<(), QmpError> {
        if message.get("event").is_some() {
            self.events.push(to_event(&message));
            Ok(())
        } else if message.get("id").is_some() {
            // A late reply.
            Ok(())
        } else {
            Err(QmpError::Protocol(format!("unexpected message: {message}")))
        }
    }

    /// Reads one JSON line, waiting at most until `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            if let Some(end) = self.pending.iter().position(|byte| *byte == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                return serde_json::from_slice(line).map_err(|error| {
                    QmpError::Protocol(format!(
                        "not JSON ({error}): {}",
                        String::from_utf8_lossy(line)
                    ))
                });
            }
            if self.pending.len() > MAX_LINE {
                return Err(QmpError::Protocol(format!(
                    "a message longer than {MAX_LINE} bytes"
                )));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout(self.timeout));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(QmpError::Io)?;
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(read) => self.pending.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == ErrorKind::Interrupted => {}
                Err(error)
                    if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                {
                    return Err(QmpError::Timeout(self.timeout));
                }
                Err(error) if error.kind() == ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed);
                }
                Err(error) => return Err(QmpError::Io(error)),
            }
        }
    }
}

fn to_event(message: &Value) -> QmpEvent {
    QmpEvent {
        name: message["event"].as_str().unwrap_or_default().to_owned(),
        data: message.get("data").cloned().unwrap_or_else(|| json!({})),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::thread;

    use super::*;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

    /// A scripted QMP peer: for each request line it reads, it writes the
    /// lines `answer` returns.
    fn fake_server(
        answer: impl Fn(&Value) -> Vec<String> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        thread::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let server = thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut writer = stream.try_clone().expect("clone");
            writeln!(writer, "{GREETING}").expect("greeting");
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let request: Value = serde_json::from_str(&line).expect("request is JSON");
                for reply in answer(&request) {
                    if writeln!(writer, "{reply}").is_err() {
                        return;
                    }
                }
            }
        });
        (dir, path, server)
    }

    fn id(request: &Value) -> Value {
        request["id"].clone()
    }

    #[test]
    fn hypervisor_qmp_negotiates_and_matches_ids_past_events() {
        let (_dir, path, server) = fake_server(|request| {
            match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![json!({"return": {}, "id": id(request)}).to_string()],
            Some("query-status") => vec![
                // A stale reply, then an event, then the answer.
                json!({"return": {"status": "paused"}, "id": 999}).to_string(),
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESET", "data": {"guest": true}}"#.to_owned(),
                json!({"return": {"status": "running", "running": true}, "id": id(request)})
                    .to_string(),
            ],
            _ => vec![json!({"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": id(request)}).to_string()],
        }
        });
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        assert_eq!(client.greeting()["version"]["qemu"]["major"], 10);
        assert_eq!(client.query_status().expect("status"), "running");
        let events = client.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "RESET");
        assert_eq!(events[0].data["guest"], true);
        match client.execute("nope", None) {
            Err(QmpError::Command { class, desc, .. }) => {
                assert_eq!(class, "CommandNotFound");
                assert!(desc.contains("nope"));
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        drop(client);
        server.join().expect("server");
    }

    #[test]
    fn hypervisor_qmp_times_out_and_reports_close() {
        let (_dir, path, server) = fake_server(|request| match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![json!({"return": {}, "id": id(request)}).to_string()],
            // Never answers query-status; closes on quit.
            Some("quit") => vec!["\u{0}".to_owned()],
            _ => Vec::new(),
        });
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        let started = Instant::now();
        let error = client
            .execute_within("query-status", None, Duration::from_millis(100))
            .expect_err("no answer");
        assert!(matches!(error, QmpError::Timeout(_)), "{error}");
        assert!(started.elapsed() < Duration::from_secs(2));
        // The malformed line the server sends on quit is a protocol error.
        let error = client.execute("quit", None).expect_err("garbage");
        assert!(matches!(error, QmpError::Protocol(_)), "{error}");
        drop(client);
        server.join().expect("server");
    }

    #[test]
    fn hypervisor_qmp_waits_for_events() {
        let (_dir, path, server) = fake_server(|request| match request["execute"].as_str() {
            Some("qmp_capabilities") => vec![json!({"return": {}, "id": id(request)}).to_string()],
            Some("system_powerdown") => vec![
                json!({"return": {}, "id": id(request)}).to_string(),
                r#"{"event": "POWERDOWN", "data": {}}"#.to_owned(),
                r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#
                    .to_owned(),
            ],
            _ => Vec::new(),
        });
        let mut client = QmpClient::connect(&path, Duration::from_secs(5)).expect("connect");
        client.execute("system_powerdown", None).expect("powerdown");
        let event = client
            .wait_event("SHUTDOWN", Duration::from_secs(5))
            .expect("shutdown event");
        assert_eq!(event.data["reason"], "guest-shutdown");
        let kept = client.take_events();
        assert_eq!(
            kept.iter()
                .map(|event| event.name.as_str())
                .collect::<Vec<_>>(),
            ["POWERDOWN"]
        );
        drop(client);
        server.join().expect("server");
    }

    /// Kills the QEMU it holds when dropped, even if the test panicked.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The client against a real QEMU (no guest: `-S`, then `cont` on an
    /// empty machine with QEMU's default BIOS).
    #[test]
    fn hypervisor_qmp_against_real_qemu() {
        let binary = Path::new("/usr/bin/qemu-system-x86_64");
        assert!(
            binary.is_file(),
            "{} is missing: run `make deps`",
            binary.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("qmp.sock");
        let log = std::fs::File::create(dir.path().join("qemu.log")).expect("log");
        let args: Vec<String> = [
            "-no-user-config",
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "64M",
            "-S",
            "-qmp",
            &format!("unix:{},server=on,wait=off", socket.display()),
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
        let child = super::super::process::spawn_detached(binary, &args, log).expect("spawn");
        let mut guard = KillOnDrop(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = loop {
            match QmpClient::connect(&socket, Duration::from_secs(10)) {
                Ok(client) => break client,
                Err(error) if error.is_not_listening() && Instant::now() < deadline => {
                    assert!(
                        guard.0.try_wait().expect("try_wait").is_none(),
                        "QEMU exited: {}",
                        std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default()
                    );
                    thread::sleep(Duration::from_millis(2));
                }
                Err(error) => panic!("QMP: {error}"),
            }
        };
        assert_eq!(client.greeting()["version"]["qemu"]["major"], 10);
        assert_eq!(client.query_status().expect("status"), "prelaunch");
        client.execute("cont", None).expect("cont");
        client
            .wait_event("RESUME", Duration::from_secs(10))
            .expect("RESUME event");
        assert_eq!(client.query_status().expect("status"), "running");
        let sev = client.execute("query-sev", None);
        match sev {
            // Without SEV QEMU refuses the query ("SEV feature is not available").
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
            Ok(info) => assert_eq!(info["enabled"], false),
            Err(error) => panic!("query-sev: {error}"),
        }
        match client.execute("no-such-command", None) {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("expected CommandNotFound, got {other:?}"),
        }
        // quit answers, then QEMU ends and closes the socket.
        match client.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => {}
            Err(error) => panic!("quit: {error}"),
        }
        let status = guard.0.wait().expect("wait");
        assert!(status.success(), "{status}");
    }

    #[test]
    fn hypervisor_qmp_connect_to_nothing_is_not_listening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let error = QmpClient::connect(&dir.path().join("absent.sock"), Duration::from_secs(1))
            .expect_err("no socket");
        assert!(error.is_not_listening(), "{error}");
    }
}
