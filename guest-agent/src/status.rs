//! The agent's progress as its host sees it: one
//! [`AgentStatus`] JSON line per phase change on the virtio-serial port
//! [`PORT_NAME`] (`org.hypersev.agent.0`).
//!
//! The port is a courtesy to the VM's owner, never needed: without it (or
//! once a write to it fails) the agent says so once on the console and
//! carries on. This module never sends key material: a status detail is a
//! reason or a mount point.

use std::io::Write;
use std::path::Path;

use hsev_attestation::agent_status::{AgentPhase, AgentStatus, MAX_LINE, PORT_NAME};
use hsev_attestation::firmware::channel::find_port;

/// Where the kernel lists virtio-serial ports by name.
pub const VIRTIO_PORTS: &str = "/sys/class/virtio-ports";

/// Writes status lines to the host, if it listens.
#[derive(Debug)]
pub struct StatusPort {
    port: Option<Box<dyn WriteDebug>>,
    last: Option<AgentStatus>,
}

/// A writer that can be printed (`Box<dyn Write>` cannot derive Debug).
pub trait WriteDebug: Write + std::fmt::Debug + Send {}
impl<T: Write + std::fmt::Debug + Send> WriteDebug for T {}

impl StatusPort {
    /// The port named [`PORT_NAME`] under `class_dir`
    /// (`/sys/class/virtio-ports`), or none, said on the console.
    pub fn open(class_dir: &Path) -> Self {
        let port = find_port(class_dir, PORT_NAME).and_then(|device| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&device)
                .map_err(|error| {
                    hsev_attestation::firmware::FirmwareError::Unavailable(format!(
                        "{}: {error}",
                        device.display()
                    ))
                })
        });
        match port {
            Ok(file) => Self::to_writer(file),
            Err(error) => {
                crate::say(&format!(
                    "no status port for the host ({error}); carrying on without it"
                ));
                Self::none()
            }
        }
    }

    /// Status lines into `writer`.
    pub fn to_writer<W: WriteDebug + 'static>(writer: W) -> Self {
        StatusPort {
            port: Some(Box::new(writer)),
            last: None,
        }
    }

    /// No port: statuses only go to [`StatusPort::last`].
    pub fn none() -> Self {
        StatusPort {
            port: None,
            last: None,
        }
    }

    /// Tells the host `phase` with `detail`, unless it is exactly what was
    /// last told. A detail too long for the host's line limit is cut.
    pub fn report(&mut self, phase: AgentPhase, detail: &str) {
        let status = AgentStatus {
            phase,
            detail: cut(detail, MAX_LINE / 2).to_owned(),
        };
        if self.last.as_ref() == Some(&status) {
            return;
        }
        if let Some(port) = self.port.as_mut() {
            let written = port
                .write_all(status.to_line().as_bytes())
                .and_then(|()| port.flush());
            if let Err(error) = written {
                crate::say(&format!(
                    "the status port {PORT_NAME} failed ({error}); carrying on without it"
                ));
                self.port = None;
            }
        }
        self.last = Some(status);
    }

    /// The last status reported.
    pub fn last(&self) -> Option<&AgentStatus> {
        self.last.as_ref()
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;

    #[test]
    fn writes_one_line_per_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("port");
        let mut port = StatusPort::to_writer(File::create(&path).expect("port"));
        port.report(AgentPhase::Attesting, "");
        port.report(AgentPhase::Unreachable, "connection refused");
        port.report(AgentPhase::Unreachable, "connection refused");
        port.report(AgentPhase::Unreachable, "timed out");
        port.report(
            AgentPhase::Unlocked,
            "mounted /dev/mapper/hsev-data at /mnt/data, boot 1",
        );
        let text = std::fs::read_to_string(&path).expect("read");
        let phases: Vec<AgentPhase> = text
            .lines()
            .map(|line| AgentStatus::from_line(line).expect("a status").phase)
            .collect();
        assert_eq!(
            phases,
            [
                AgentPhase::Attesting,
                AgentPhase::Unreachable,
                AgentPhase::Unreachable,
                AgentPhase::Unlocked
            ]
        );
    }

    #[test]
    fn no_port_is_fine_and_long_details_are_cut() {
        let empty = tempfile::tempdir().expect("tempdir");
        let mut port = StatusPort::open(empty.path());
        let long = "é".repeat(MAX_LINE);
        port.report(AgentPhase::Failed, &long);
        let last = port.last().expect("kept");
        assert!(last.detail.len() <= MAX_LINE / 2);
        assert!(last.to_line().len() < MAX_LINE);
    }

    #[test]
    fn finds_the_port_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (port, name) in [
            ("vport0p1", "org.hypersev.sim-sp.0"),
            ("vport0p2", PORT_NAME),
        ] {
            std::fs::create_dir(dir.path().join(port)).expect("dir");
            std::fs::write(dir.path().join(port).join("name"), format!("{name}\n")).expect("name");
        }
        assert_eq!(
            find_port(dir.path(), PORT_NAME).expect("found"),
            Path::new("/dev/vport0p2")
        );
    }
}
