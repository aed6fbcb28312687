//! What a guest's `hsev-agent` tells its host about the disk-key release,
//! over the virtio-serial port [`PORT_NAME`]: one JSON object per line.
//!
//! The host treats these lines as the guest's word, nothing more: they say
//! where the guest is in the attested boot, never prove anything. Proof of
//! what the guest runs is the key broker's business; the host only shows
//! the state and the reason to the VM's owner.

use serde::{Deserialize, Serialize};

/// The virtio-serial port name the agent writes its status lines to.
pub const PORT_NAME: &str = "org.hypersev.agent.0";

/// The longest status line a host reads; longer lines are cut off there.
pub const MAX_LINE: usize = 4096;

/// Where the guest is in the attested boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentPhase {
    /// The agent runs the RCAR exchange with the key broker.
    Attesting,
    /// The key broker cannot be reached; the agent retries with backoff.
    Unreachable,
    /// The key broker keeps the key for another live instance of this VM
    /// (a single-instance key); the agent retries with backoff, until that
    /// instance's lease lapses.
    Held,
    /// No key: the key broker refused it, or the agent refused a server
    /// that is not the pinned broker; `detail` says which and why.
    Refused,
    /// The key was released, the disk unlocked and mounted.
    Unlocked,
    /// Something in the guest failed after or outside the release (no data
    /// disk, cryptsetup or mount failed); `detail` says what.
    Failed,
}

/// One status line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentStatus {
    /// The phase reached.
    pub phase: AgentPhase,
    /// A human-readable detail: the refusal reason, the error, or what was
    /// unlocked. Never key material.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl AgentStatus {
    /// A status line, newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| {
            // Serialising two strings cannot fail; keep the line well formed anyway.
            r#"{"phase":"failed","detail":"status not serialisable"}"#.to_owned()
        });
        line.push('\n');
        line
    }

    /// Parses one line (without or with its newline).
    pub fn from_line(line: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(line.trim_end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_one_line() {
        let status = AgentStatus {
            phase: AgentPhase::Refused,
            detail: "measurement: 12ab.. is not a reference value".to_owned(),
        };
        let line = status.to_line();
        assert!(line.ends_with('\n') && !line[..line.len() - 1].contains('\n'));
        assert_eq!(AgentStatus::from_line(&line).expect("parses"), status);
        assert_eq!(
            AgentStatus::from_line(r#"{"phase":"unlocked"}"#)
                .expect("parses")
                .detail,
            ""
        );
    }

    #[test]
    fn refuses_unknown_phases_and_fields() {
        assert!(AgentStatus::from_line(r#"{"phase":"owned"}"#).is_err());
        assert!(AgentStatus::from_line(r#"{"phase":"unlocked","key":"00"}"#).is_err());
    }
}
