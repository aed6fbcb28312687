//! Which of several coordinators on one etcd store leads the pool: etcd's
//! election API on a lease of this coordinator's.
//!
//! What it owns: the lease, its keep-alives, the campaign, the leader
//! guard it hands the store while it leads, and the moment it steps down.
//! What it must never do: let this coordinator write as leader once it
//! cannot show that its lease still lives.
//!
//! The timing argument, enforced here and in the store's guard:
//!
//! * The lease is granted with TTL `T` (`[store] lease_ttl_s`). etcd
//!   deletes the election key when the lease has not been renewed for `T`,
//!   measured by etcd from the last renewal it received; a successor's
//!   campaign returns only after that deletion.
//! * Keep-alives start before the campaign (the campaign blocks while
//!   another coordinator leads, and nothing else would renew the lease),
//!   and are sent every `T / 3`.
//! * Each keep-alive that etcd answers moves this leader's own deadline to
//!   `sent + T - M`, where `sent` is when this process sent it (before etcd
//!   received it, so the deadline is earlier than etcd's expiry) and `M`
//!   is the step-down margin (`T / 4`, at least 500 ms) that covers the
//!   clocks' rates and the time a write is in flight.
//! * Past its deadline the leader refuses its own writes (the store checks
//!   the deadline before each transaction) and campaigns again; every write
//!   also compares, in its transaction, that the election key is still the
//!   one created at this leader's revision. So a leader that cannot renew
//!   stops writing at least `M` before etcd can let a successor in, and
//!   whatever it sends late is refused by etcd itself.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use etcd_client::{Client, LeaderKey, ResignOptions};

use crate::store::{EtcdStore, LeaderGuard};

/// The step-down margin for a lease of `ttl`.
pub fn step_down_margin(ttl: Duration) -> Duration {
    (ttl / 4).max(Duration::from_millis(500))
}

/// Where this coordinator stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// Not leading; the current leader's address, if one leads.
    Follower(Option<String>),
    /// Leading since the given time.
    Leader(Instant),
}

/// One coordinator's candidacy. Dropping it stops campaigning (resigning
/// when it leads).
#[derive(Debug)]
pub struct Candidacy {
    standing: Arc<Mutex<Standing>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Candidacy {
    /// Campaigns, for as long as the candidacy lives, to lead the pool in
    /// `store` as `address` (what the others forward the API to), on
    /// leases of `ttl`.
    ///
    /// A store that is not on etcd (or whose client is shut down) has no
    /// election: the candidacy stays a follower of nobody.
    pub fn start(store: &Arc<crate::store::Store>, address: &str, ttl: Duration) -> Candidacy {
        let standing = Arc::new(Mutex::new(Standing::Follower(None)));
        let Some(etcd) = store.as_etcd() else {
            return Candidacy {
                standing,
                task: None,
            };
        };
        // A candidate writes nothing until it leads.
        etcd.set_leader_guard(Some(LeaderGuard::not_leading()));
        let campaign = Campaign {
            store: Arc::clone(store),
            client: etcd.client(),
            name: format!("{}election", etcd.prefix()),
            address: address.to_owned(),
            ttl,
            standing: Arc::clone(&standing),
        };
        let task = etcd.runtime().map(|runtime| runtime.spawn(campaign.run()));
        Candidacy { standing, task }
    }

    /// Where this coordinator stands now.
    pub fn standing(&self) -> Standing {
        self.standing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether it leads now.
    pub fn is_leader(&self) -> bool {
        matches!(self.standing(), Standing::Leader(_))
    }

    /// A view of where it stands, for what forwards to the leader.
    pub fn view(&self) -> StandingView {
        StandingView(Arc::clone(&self.standing))
    }
}

/// Where a candidacy stands, shared with what forwards to the leader.
#[derive(Debug, Clone)]
pub struct StandingView(Arc<Mutex<Standing>>);

impl StandingView {
    /// The leader's address while this candidacy follows one.
    pub fn leader(&self) -> Option<String> {
        match &*self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Standing::Follower(leader) => leader.clone(),
            Standing::Leader(_) => None,
        }
    }
}

impl Drop for Candidacy {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// What a candidacy's task holds.
struct Campaign {
    store: Arc<crate::store::Store>,
    client: Client,
    name: String,
    address: String,
    ttl: Duration,
    standing: Arc<Mutex<Standing>>,
}

impl Campaign {
    fn etcd(&self) -> Option<&EtcdStore> {
        self.store.as_etcd()
    }

    fn set(&self, standing: Standing) {
        *self.standing.lock().unwrap_or_else(PoisonError::into_inner) = standing;
    }

    /// Campaigns, leads, steps down, and again, until aborted.
    async fn run(self) {
        loop {
            if let Err(error) = self.term().await {
                tracing::warn!(%error, "election: not leading; campaigning again");
            }
            if let Some(etcd) = self.etcd() {
                etcd.set_leader_guard(Some(LeaderGuard::not_leading()));
            }
            self.set(Standing::Follower(self.current_leader().await));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn current_leader(&self) -> Option<String> {
        let mut client = self.client.clone();
        let response = client.leader(self.name.as_str()).await.ok()?;
        response
            .kv()
            .and_then(|kv| kv.value_str().ok())
            .map(str::to_owned)
    }

    /// One term: a lease, its keep-alives, the campaign, and leading until
    /// a renewal fails.
    async fn term(&self) -> Result<(), etcd_client::Error> {
        let mut client = self.client.clone();
        let ttl_s = i64::try_from(self.ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl_s, None).await?.id();
        let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
        let margin = step_down_margin(self.ttl);
        let interval = self.ttl / 3;
        // The deadline moves with each answered keep-alive (see the module
        // documentation); the campaign runs beside the keep-alives.
        let valid_until = Arc::new(Mutex::new(Instant::now() + self.ttl - margin));
        let renew = {
            let valid_until = Arc::clone(&valid_until);
            async move {
                loop {
                    let sent = Instant::now();
                    keeper.keep_alive().await?;
                    match answers.message().await? {
                        Some(answer) if answer.ttl() > 0 => {
                            *valid_until.lock().unwrap_or_else(PoisonError::into_inner) =
                                sent + self.ttl - margin;
                        }
                        _ => {
                            return Err::<(), _>(etcd_client::Error::LeaseKeepAliveError(
                                "the lease expired".to_owned(),
                            ))
                        }
                    }
                    tokio::time::sleep(interval).await;
                }
            }
        };
        tokio::pin!(renew);
        let deadline = || *valid_until.lock().unwrap_or_else(PoisonError::into_inner);

        // Follow until elected; the lease is renewed meanwhile.
        let leader = {
            let mut client = self.client.clone();
            let campaign = client.campaign(self.name.as_str(), self.address.as_str(), lease);
            tokio::pin!(campaign);
            loop {
                tokio::select! {
                    elected = &mut campaign => break elected?,
                    renewed = &mut renew => {
                        renewed?;
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        self.set(Standing::Follower(self.current_leader().await));
                    }
                }
            }
        };
        let Some(key) = leader.leader().cloned() else {
            return Err(etcd_client::Error::ElectError(
                "the campaign answered without a leader key".to_owned(),
            ));
        };
        self.lead(&key, deadline());
        tracing::info!(address = %self.address, revision = key.rev(), "election: leading the pool");

        // Lead while renewals keep the deadline ahead.
        let outcome = loop {
            tokio::select! {
                renewed = &mut renew => break renewed,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    let until = deadline();
                    if Instant::now() >= until {
                        break Err(etcd_client::Error::LeaseKeepAliveError(
                            "renewals failed past the step-down margin".to_owned(),
                        ));
                    }
                    self.lead(&key, until);
                }
            }
        };
        tracing::warn!(address = %self.address, "election: stepping down");
        if let Some(etcd) = self.etcd() {
            etcd.set_leader_guard(Some(LeaderGuard::not_leading()));
        }
        self.set(Standing::Follower(None));
        let mut client = self.client.clone();
        // Best effort, bounded: etcd may be the reason for stepping down.
        let _ = tokio::time::timeout(
            self.ttl,
            client.resign(Some(ResignOptions::new().with_leader(key))),
        )
        .await;
        let _ = tokio::time::timeout(self.ttl, client.lease_revoke(lease)).await;
        outcome
    }

    /// Hands the store the guard of leader `key`, valid until `until`.
    fn lead(&self, key: &LeaderKey, until: Instant) {
        if let Some(etcd) = self.etcd() {
            etcd.set_leader_guard(Some(LeaderGuard {
                key: key.key().to_vec(),
                revision: key.rev(),
                valid_until: Some(until),
            }));
        }
        let mut standing = self.standing.lock().unwrap_or_else(PoisonError::into_inner);
        if !matches!(*standing, Standing::Leader(_)) {
            *standing = Standing::Leader(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests

    use std::io::BufRead;
    use std::process::{Command, Stdio};

    use super::*;
    use crate::store::etcd::test_server::EtcdServer;
    use crate::store::{Store, StoreError};

    const TTL: Duration = Duration::from_secs(3);

    /// Set in the child process of the kill -9 test: `URL PREFIX`.
    const CHILD_ENV: &str = "HSEV_ELECTION_CHILD";

    fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < within, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    }

    fn host(name: &str) -> crate::model::HostRecord {
        crate::store::tests::host(name)
    }

    #[test]
    fn a_killed_leader_is_succeeded_within_the_ttl_and_only_the_leader_writes() {
        if let Ok(child) = std::env::var(CHILD_ENV) {
            // The first coordinator: lead, write, say so, then be killed.
            let (url, prefix) = child.split_once(' ').unwrap();
            let store = Arc::new(Store::from(
                EtcdStore::connect(&crate::store::StoreConfig::etcd([url], prefix)).unwrap(),
            ));
            let candidacy = Candidacy::start(&store, "coordinator-a:7443", TTL);
            wait_for("leading", Duration::from_secs(10), || candidacy.is_leader());
            store.upsert_host(&host("written-by-a")).unwrap();
            println!("LEADING");
            std::thread::sleep(Duration::from_secs(60));
            unreachable!("the parent kills this process");
        }
        let server = EtcdServer::shared();
        let prefix = format!("/election-{}/", uuid::Uuid::new_v4());
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "coordinator::election::tests::a_killed_leader_is_succeeded_within_the_ttl_and_only_the_leader_writes",
                "--exact",
                "--nocapture",
            ])
            .env(CHILD_ENV, format!("{} {prefix}", server.url()))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(
            lines.any(|line| line.is_ok_and(|line| line.contains("LEADING"))),
            "the first coordinator never led"
        );

        let store = Arc::new(Store::from(server.store_at(&prefix)));
        let candidacy = Candidacy::start(&store, "coordinator-b:7443", TTL);
        wait_for("seeing the leader", Duration::from_secs(5), || {
            candidacy.standing() == Standing::Follower(Some("coordinator-a:7443".to_owned()))
        });
        // A follower's writes are refused: only the leader writes.
        assert!(matches!(
            store.upsert_host(&host("written-by-b-too-early")),
            Err(StoreError::NotLeader { .. })
        ));

        child.kill().unwrap();
        child.wait().unwrap();
        let took = wait_for(
            "the successor leading",
            TTL + Duration::from_secs(3),
            || candidacy.is_leader(),
        );
        println!("failover after kill -9: {took:?} (lease TTL {TTL:?})");
        store.upsert_host(&host("written-by-b")).unwrap();
        let names: Vec<String> = store
            .list_hosts()
            .unwrap()
            .into_iter()
            .map(|host| host.name)
            .collect();
        assert_eq!(names, ["written-by-a", "written-by-b"]);
    }

    #[test]
    fn a_leader_that_cannot_renew_steps_down_before_its_lease_ends() {
        let mut server = EtcdServer::start();
        let store = Arc::new(Store::from(server.store()));
        let candidacy = Candidacy::start(&store, "coordinator-a:7443", TTL);
        wait_for("leading", Duration::from_secs(10), || candidacy.is_leader());
        store.upsert_host(&host("h1")).unwrap();

        let cut = Instant::now();
        server.stop();
        let took = wait_for("stepping down", TTL, || !candidacy.is_leader());
        println!("stepped down {took:?} after etcd went away (lease TTL {TTL:?})");
        assert!(
            took <= TTL - step_down_margin(TTL) + Duration::from_millis(300),
            "{took:?}"
        );
        // Refused at once, by its own deadline, not after a timeout.
        let started = Instant::now();
        assert!(matches!(
            store.upsert_host(&host("h2")),
            Err(StoreError::NotLeader { .. })
        ));
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(cut.elapsed() < TTL);
    }
}
