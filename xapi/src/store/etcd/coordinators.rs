//! What the coordinators of one pool on etcd agree on beyond its records:
//! which pool CA they all serve (its certificate's fingerprint, set by the
//! first that serves the pool listener; never the CA's key, which each
//! coordinator keeps in its own state folder), where each one's pool
//! listener is (so that the hosts can look for the next leader), and
//! whether this one leads now.
//!
//! These keys sit outside the serial and the leader guard: a standby
//! coordinator announces itself before it leads, and the CA's fingerprint
//! is set once, by whichever coordinator gets there first.

use super::EtcdStore;
use crate::store::Result;

impl EtcdStore {
    /// The pool CA's fingerprint: the one recorded, or `mine` when none is
    /// yet (then it is recorded).
    ///
    /// # Errors
    ///
    /// [`crate::store::StoreError::Unavailable`].
    pub fn pool_ca_fingerprint(&self, mine: &str) -> Result<String> {
        self.block(self.kv().pool_ca_fingerprint(mine))
    }

    /// The pool CA's fingerprint, if one is recorded.
    ///
    /// # Errors
    ///
    /// [`crate::store::StoreError::Unavailable`].
    pub fn recorded_pool_ca_fingerprint(&self) -> Result<Option<String>> {
        self.block(self.kv().recorded_pool_ca_fingerprint())
    }

    /// Records that coordinator `name`'s pool listener is at `address`.
    ///
    /// # Errors
    ///
    /// [`crate::store::StoreError::Unavailable`].
    pub fn announce_coordinator(&self, name: &str, address: &str) -> Result<()> {
        self.block(self.kv().announce_coordinator(name, address))
    }

    /// Every coordinator's pool listener, by coordinator name.
    ///
    /// # Errors
    ///
    /// [`crate::store::StoreError::Unavailable`].
    pub fn coordinator_addresses(&self) -> Result<Vec<String>> {
        self.block(self.kv().coordinator_addresses())
    }

    /// Whether this coordinator leads the pool now: it holds the election
    /// key, and its own deadline for writing (its last lease renewal plus
    /// the TTL, less the step-down margin) has not passed. Once it has,
    /// another coordinator may lead soon; until then, none can.
    pub fn leads_now(&self) -> bool {
        self.leader_guard().is_some_and(|guard| {
            !guard.key.is_empty()
                && guard
                    .valid_until
                    .is_none_or(|until| std::time::Instant::now() < until)
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests

    use super::super::test_server::EtcdServer;
    use super::super::LeaderGuard;

    #[test]
    fn the_first_fingerprint_recorded_is_the_pools_and_coordinators_are_listed() {
        let server = EtcdServer::shared();
        let store = server.store();
        assert_eq!(store.recorded_pool_ca_fingerprint().unwrap(), None);
        assert_eq!(store.pool_ca_fingerprint("aa:01").unwrap(), "aa:01");
        assert_eq!(store.pool_ca_fingerprint("bb:02").unwrap(), "aa:01");
        assert_eq!(
            store.recorded_pool_ca_fingerprint().unwrap().as_deref(),
            Some("aa:01")
        );
        assert!(store.coordinator_addresses().unwrap().is_empty());
        store.announce_coordinator("c1", "10.0.0.2:7444").unwrap();
        store.announce_coordinator("c0", "10.0.0.1:7444").unwrap();
        store.announce_coordinator("c1", "10.0.0.3:7444").unwrap();
        assert_eq!(
            store.coordinator_addresses().unwrap(),
            ["10.0.0.1:7444", "10.0.0.3:7444"]
        );
    }

    #[test]
    fn a_coordinator_leads_only_with_an_election_key_and_before_its_deadline() {
        let server = EtcdServer::shared();
        let store = server.store();
        assert!(!store.leads_now(), "no guard: a standby");
        store.set_leader_guard(Some(LeaderGuard::not_leading()));
        assert!(!store.leads_now());
        let guard = |valid_until| LeaderGuard {
            key: b"election/leader".to_vec(),
            revision: 7,
            valid_until,
        };
        let later = std::time::Instant::now() + std::time::Duration::from_secs(60);
        store.set_leader_guard(Some(guard(Some(later))));
        assert!(store.leads_now());
        store.set_leader_guard(Some(guard(Some(std::time::Instant::now()))));
        assert!(!store.leads_now(), "its deadline passed");
    }
}
