//! The broker's sessions, in memory: a challenge's nonce (single-use, it
//! expires), the attested session that follows it (the cookie's), and the
//! grant an attestation token names (passport mode: `jti`), each holding
//! what the broker attested, for the same lifetime.
//!
//! The table is bounded: past `max` open sessions a new one is refused,
//! and expired entries are swept then and every [`SWEEP_EVERY`] sessions.
//! A restart forgets everything; a guest simply starts over.
//!
//! This module decides nothing about evidence: it keeps what the broker
//! hands it, and forgets it on time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use uuid::Uuid;

/// Sessions created between two sweeps of the expired ones.
pub const SWEEP_EVERY: u64 = 1024;

/// Why a session cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionProblem {
    /// Never opened, or forgotten (expired and swept, or a restart).
    Unknown,
    /// Its lifetime is over.
    Expired,
    /// Its nonce was already presented.
    Spent,
    /// It has not attested.
    NotAttested,
}

#[derive(Debug)]
enum State<T> {
    /// Waiting for `/attest` with this nonce.
    Challenged { nonce: String },
    /// The nonce was presented once; it cannot be again.
    Used,
    /// Attested: resources may be asked for.
    Attested(Arc<T>),
}

#[derive(Debug)]
struct Session<T> {
    expires: Instant,
    state: State<T>,
}

#[derive(Debug)]
struct Grant<T> {
    expires: Instant,
    attested: Arc<T>,
}

#[derive(Debug)]
struct Table<T> {
    sessions: HashMap<Uuid, Session<T>>,
    grants: HashMap<Uuid, Grant<T>>,
    created: u64,
}

/// The sessions and grants, `T` being what an attestation leaves.
#[derive(Debug)]
pub struct Sessions<T> {
    ttl: Duration,
    max: usize,
    table: Mutex<Table<T>>,
}

impl<T> Sessions<T> {
    /// An empty table whose entries live `ttl`, at most `max` sessions.
    pub fn new(ttl: Duration, max: usize) -> Self {
        Sessions {
            ttl,
            max,
            table: Mutex::new(Table {
                sessions: HashMap::new(),
                grants: HashMap::new(),
                created: 0,
            }),
        }
    }

    /// How long a session or grant lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The most sessions held at once.
    pub fn max(&self) -> usize {
        self.max
    }

    fn table(&self) -> MutexGuard<'_, Table<T>> {
        // Entries are replaced whole under the lock: a panic elsewhere
        // cannot leave one half-changed.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens a session waiting for `nonce`; `None` when the table is full.
    pub fn open(&self, nonce: String) -> Option<Uuid> {
        let now = Instant::now();
        let mut table = self.table();
        table.created += 1;
        if table.created.is_multiple_of(SWEEP_EVERY) || table.sessions.len() >= self.max {
            table.sessions.retain(|_, session| session.expires > now);
            table.grants.retain(|_, grant| grant.expires > now);
        }
        if table.sessions.len() >= self.max {
            return None;
        }
        let id = Uuid::new_v4();
        table.sessions.insert(
            id,
            Session {
                expires: now + self.ttl,
                state: State::Challenged { nonce },
            },
        );
        Some(id)
    }

    /// Takes the nonce of session `id`: whatever follows, it is never
    /// handed out again.
    pub fn take_nonce(&self, id: Uuid) -> Result<String, SessionProblem> {
        let mut table = self.table();
        let Some(session) = table.sessions.get_mut(&id) else {
            return Err(SessionProblem::Unknown);
        };
        if session.expires <= Instant::now() {
            table.sessions.remove(&id);
            return Err(SessionProblem::Expired);
        }
        match std::mem::replace(&mut session.state, State::Used) {
            State::Challenged { nonce } => Ok(nonce),
            State::Used | State::Attested(_) => Err(SessionProblem::Spent),
        }
    }

    /// Marks session `id` attested with `attested`, and grants the same to
    /// the token `grant` names; both live `ttl` from now.
    pub fn attest(&self, id: Uuid, grant: Uuid, attested: Arc<T>) {
        let expires = Instant::now() + self.ttl;
        let mut table = self.table();
        if let Some(session) = table.sessions.get_mut(&id) {
            session.expires = expires;
            session.state = State::Attested(Arc::clone(&attested));
        }
        table.grants.insert(grant, Grant { expires, attested });
    }

    /// What session `id` attested.
    pub fn attested(&self, id: Uuid) -> Result<Arc<T>, SessionProblem> {
        let mut table = self.table();
        let Some(session) = table.sessions.get(&id) else {
            return Err(SessionProblem::Unknown);
        };
        if session.expires <= Instant::now() {
            table.sessions.remove(&id);
            return Err(SessionProblem::Expired);
        }
        match &session.state {
            State::Attested(attested) => Ok(Arc::clone(attested)),
            State::Challenged { .. } | State::Used => Err(SessionProblem::NotAttested),
        }
    }

    /// What the token naming `grant` stands for, while it lives.
    pub fn granted(&self, grant: Uuid) -> Option<Arc<T>> {
        let mut table = self.table();
        let entry = table.grants.get(&grant)?;
        if entry.expires <= Instant::now() {
            table.grants.remove(&grant);
            return None;
        }
        Some(Arc::clone(&entry.attested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_single_use_and_attestations_shared() {
        let sessions: Sessions<&str> = Sessions::new(Duration::from_secs(60), 2);
        let id = sessions.open("n".into()).expect("opens");
        assert_eq!(
            sessions.attested(id).err(),
            Some(SessionProblem::NotAttested)
        );
        assert_eq!(sessions.take_nonce(id).as_deref(), Ok("n"));
        assert_eq!(sessions.take_nonce(id), Err(SessionProblem::Spent));
        let grant = Uuid::new_v4();
        sessions.attest(id, grant, Arc::new("report"));
        assert_eq!(sessions.attested(id).as_deref(), Ok(&"report"));
        assert_eq!(sessions.granted(grant).as_deref(), Some(&"report"));
        assert_eq!(sessions.take_nonce(id), Err(SessionProblem::Spent));
        assert_eq!(sessions.granted(Uuid::new_v4()), None);
        assert_eq!(
            sessions.attested(Uuid::new_v4()).err(),
            Some(SessionProblem::Unknown)
        );
        // Full: a third session is refused.
        assert!(sessions.open("m".into()).is_some());
        assert_eq!(sessions.open("o".into()), None);
    }

    #[test]
    fn everything_expires() {
        let sessions: Sessions<u8> = Sessions::new(Duration::from_millis(50), 1);
        let id = sessions.open("n".into()).expect("opens");
        let grant = Uuid::new_v4();
        sessions.attest(id, grant, Arc::new(1));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(sessions.attested(id).err(), Some(SessionProblem::Expired));
        assert_eq!(sessions.granted(grant), None);
        // The expired session was swept: there is room again.
        let again = sessions.open("m".into()).expect("room after expiry");
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(sessions.take_nonce(again), Err(SessionProblem::Expired));
    }
}
