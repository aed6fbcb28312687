//! The guest agent's ports. The status port: the host agent connects to the
//! socket QEMU listens on for the virtio-serial port
//! [`hsev_attestation::agent_status::PORT_NAME`], reads the agent's status
//! lines and reports them to the coordinator as the VM's attestation state
//! and events. The
//! attestation port ([`hsev_attestation::tenant_attest::PORT_NAME`]): one
//! request and its answer per connection, relayed for the VM's tenant.
//!
//! The lines are the guest's word: they tell the owner where the attested
//! boot stands (and the key broker's refusal reason), they prove nothing
//! and never change what the key broker releases.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hsev_attestation::agent_status::{AgentPhase, AgentStatus, MAX_LINE};
use hsev_attestation::tenant_attest;

use crate::model::{Attestation, VmId};
use crate::pool::PoolSink;

/// How long to wait for QEMU's socket to appear.
const CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// Follows `vm`'s agent port at `socket` on a thread of its own, until the
/// VMM closes it.
pub fn follow(sink: Arc<dyn PoolSink>, vm: VmId, socket: PathBuf) {
    std::thread::spawn(move || {
        let Some(stream) = connect(&socket) else {
            tracing::warn!(vm = %vm, socket = %socket.display(), "no guest agent port to follow");
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = Vec::with_capacity(256);
        loop {
            line.clear();
            // One line, at most MAX_LINE bytes of it; the rest is skipped.
            match (&mut reader)
                .take(MAX_LINE as u64)
                .read_until(b'\n', &mut line)
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.last() != Some(&b'\n') {
                let mut rest = Vec::new();
                if reader.read_until(b'\n', &mut rest).unwrap_or(0) == 0 {
                    return;
                }
            }
            record(sink.as_ref(), &vm, &String::from_utf8_lossy(&line));
        }
    });
}

fn connect(socket: &std::path::Path) -> Option<UnixStream> {
    let deadline = Instant::now() + CONNECT_PATIENCE;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Some(stream),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => return None,
        }
    }
}

/// How long the guest may take to answer an attestation request: a report
/// through the simulated Secure Processor under TCG takes a second or two.
const ATTEST_PATIENCE: Duration = Duration::from_secs(30);

/// Asks the guest agent listening behind `socket` for evidence bound to
/// `nonce`, on a connection of its own, and reads its one-line answer.
pub fn ask_attestation(
    socket: &Path,
    nonce: &[u8; tenant_attest::NONCE_LEN],
) -> Result<tenant_attest::AttestAnswer, String> {
    let mut stream = UnixStream::connect(socket)
        .map_err(|error| format!("cannot connect to {}: {error}", socket.display()))?;
    stream
        .set_read_timeout(Some(ATTEST_PATIENCE))
        .and_then(|()| stream.set_write_timeout(Some(ATTEST_PATIENCE)))
        .map_err(|error| error.to_string())?;
    let mut request = serde_json::to_vec(&tenant_attest::AttestRequest::new(nonce))
        .map_err(|error| error.to_string())?;
    request.push(b'\n');
    stream
        .write_all(&request)
        .map_err(|error| format!("cannot send the request: {error}"))?;
    let mut line = Vec::new();
    BufReader::new(stream)
        .take(tenant_attest::MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .map_err(|error| format!("no answer within {}s: {error}", ATTEST_PATIENCE.as_secs()))?;
    if line.last() != Some(&b'\n') {
        return Err(if line.is_empty() {
            "the port closed without an answer".to_owned()
        } else {
            format!("an answer longer than {} bytes", tenant_attest::MAX_LINE)
        });
    }
    serde_json::from_slice(&line).map_err(|error| format!("an unreadable answer: {error}"))
}

/// Records one status line.
fn record(sink: &dyn PoolSink, vm: &VmId, line: &str) {
    let status = match AgentStatus::from_line(line) {
        Ok(status) => status,
        Err(error) => {
            tracing::warn!(vm = %vm, %error, "unreadable line on the guest agent port");
            return;
        }
    };
    if let Some(attestation) = attestation_for(&status) {
        sink.attestation(vm, &attestation);
    }
    let phase = serde_json::to_value(status.phase)
        .ok()
        .and_then(|value| value.as_str().map(str::to_owned))
        .unwrap_or_default();
    let detail = if status.detail.is_empty() {
        phase.clone()
    } else {
        format!("{phase}: {}", status.detail)
    };
    sink.event(vm, "agent", &detail);
    tracing::info!(vm = %vm, phase = %phase, detail = %status.detail, "guest agent");
}

/// The attestation state a status means, if it changes it.
fn attestation_for(status: &AgentStatus) -> Option<Attestation> {
    match status.phase {
        AgentPhase::Attesting | AgentPhase::Unreachable | AgentPhase::Held => {
            Some(Attestation::Pending)
        }
        AgentPhase::Unlocked => Some(Attestation::Released),
        AgentPhase::Refused => Some(Attestation::Refused(if status.detail.is_empty() {
            "the key broker refused (no reason given)".to_owned()
        } else {
            status.detail.clone()
        })),
        // The key was released; what failed after is an event, not a verdict.
        AgentPhase::Failed => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: AgentPhase, detail: &str) -> AgentStatus {
        AgentStatus {
            phase,
            detail: detail.to_owned(),
        }
    }

    #[test]
    fn phases_map_to_attestation_states() {
        assert_eq!(
            attestation_for(&status(AgentPhase::Unlocked, "mounted")),
            Some(Attestation::Released)
        );
        assert_eq!(
            attestation_for(&status(AgentPhase::Refused, "measurement differs")),
            Some(Attestation::Refused("measurement differs".into()))
        );
        assert!(matches!(
            attestation_for(&status(AgentPhase::Refused, "")),
            Some(Attestation::Refused(reason)) if !reason.is_empty()
        ));
        assert_eq!(
            attestation_for(&status(AgentPhase::Attesting, "")),
            Some(Attestation::Pending)
        );
        assert_eq!(attestation_for(&status(AgentPhase::Failed, "mount")), None);
    }
}
