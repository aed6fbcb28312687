//! What the connector last told the master about each instance, so that
//! each state, error, bang and set of connection parameters is said once
//! and not once per pass. It lives in memory only: a restarted connector
//! says each thing once more, which the master takes as a repetition.

use std::collections::{HashMap, HashSet};

use super::master::RequestedState;
use super::publish::ConnectionParameters;

#[derive(Debug, Default)]
struct Said {
    connection: Option<ConnectionParameters>,
    state: Option<RequestedState>,
    error: Option<String>,
    bang: Option<String>,
}

/// What was said, by instance id.
#[derive(Debug, Default)]
pub struct Ledger {
    instances: HashMap<String, Said>,
    software: HashSet<(String, String)>,
}

impl Ledger {
    fn said(&mut self, instance: &str) -> &mut Said {
        self.instances.entry(instance.to_owned()).or_default()
    }

    /// Whether `parameters` differ from what `instance` last published.
    pub fn connection_is_new(&self, instance: &str, parameters: &ConnectionParameters) -> bool {
        self.instances
            .get(instance)
            .and_then(|said| said.connection.as_ref())
            != Some(parameters)
    }

    /// `instance` published `parameters`.
    pub fn published(&mut self, instance: &str, parameters: ConnectionParameters) {
        self.said(instance).connection = Some(parameters);
    }

    /// Whether `state` is not what was last reported for `instance`.
    pub fn state_is_new(&self, instance: &str, state: RequestedState) -> bool {
        self.instances.get(instance).and_then(|said| said.state) != Some(state)
    }

    /// `state` was reported for `instance`; an error said before no longer holds.
    pub fn reported(&mut self, instance: &str, state: RequestedState) {
        let said = self.said(instance);
        said.state = Some(state);
        said.error = None;
    }

    /// Whether `message` is not the error last reported for `instance`.
    pub fn error_is_new(&self, instance: &str, message: &str) -> bool {
        self.instances
            .get(instance)
            .and_then(|said| said.error.as_deref())
            != Some(message)
    }

    /// `message` was reported as `instance`'s error.
    pub fn errored(&mut self, instance: &str, message: &str) {
        let said = self.said(instance);
        said.error = Some(message.to_owned());
        said.state = None;
    }

    /// Whether `reason` is not the bang last reported for `instance`.
    pub fn bang_is_new(&self, instance: &str, reason: &str) -> bool {
        self.instances
            .get(instance)
            .and_then(|said| said.bang.as_deref())
            != Some(reason)
    }

    /// `instance` was banged for `reason`.
    pub fn banged(&mut self, instance: &str, reason: &str) {
        self.said(instance).bang = Some(reason.to_owned());
    }

    /// Whether the software release `url` was not yet reported `state`.
    pub fn software_is_new(&self, url: &str, state: &str) -> bool {
        !self.software.contains(&(url.to_owned(), state.to_owned()))
    }

    /// `url` was reported `state`.
    pub fn software_reported(&mut self, url: &str, state: &str) {
        self.software.retain(|(known, _)| known != url);
        self.software.insert((url.to_owned(), state.to_owned()));
    }

    /// Forgets the instances not in `listed` (gone from the master).
    pub fn keep_only(&mut self, listed: &HashSet<String>) {
        self.instances
            .retain(|instance, _| listed.contains(instance));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thing_is_new_once() {
        let mut ledger = Ledger::default();
        let parameters = ConnectionParameters::from([("vm-id".to_owned(), "1".to_owned())]);
        assert!(ledger.connection_is_new("i", &parameters));
        ledger.published("i", parameters.clone());
        assert!(!ledger.connection_is_new("i", &parameters));

        assert!(ledger.error_is_new("i", "ram-size: too small"));
        ledger.errored("i", "ram-size: too small");
        assert!(!ledger.error_is_new("i", "ram-size: too small"));
        assert!(ledger.state_is_new("i", RequestedState::Started));
        ledger.reported("i", RequestedState::Started);
        assert!(!ledger.state_is_new("i", RequestedState::Started));
        assert!(
            ledger.error_is_new("i", "ram-size: too small"),
            "an error said again after a recovery"
        );

        assert!(ledger.bang_is_new("i", "QEMU died"));
        ledger.banged("i", "QEMU died");
        assert!(!ledger.bang_is_new("i", "QEMU died"));

        ledger.keep_only(&HashSet::new());
        assert!(ledger.connection_is_new("i", &parameters));
        assert!(ledger.software_is_new("sr", "available"));
        ledger.software_reported("sr", "available");
        assert!(!ledger.software_is_new("sr", "available"));
        assert!(ledger.software_is_new("sr", "destroyed"));
    }
}
