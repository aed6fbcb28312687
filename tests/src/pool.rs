//! A pool of real hsevd hosts for end-to-end tests, one network namespace
//! per host ([`crate::netns`]): the first host is the coordinator (it makes
//! the pool and its CA, with its pool listener on its own address); every
//! other host joins it with a token from `hsev pool join-token create`,
//! through `hsevd join`, and then runs. Dropping the pool stops every
//! hsevd and VMM, then removes the namespaces.

use std::time::{Duration, Instant};

use crate::daemon::{Daemon, Driver, ADMIN};
use crate::netns::{NetHost, TestNet};

/// The port every host's pool listener uses on its own address.
pub const POOL_PORT: u16 = 7444;

/// One host of a test pool.
#[derive(Debug, Clone)]
pub struct HostSpec {
    /// Its name in the pool.
    pub name: String,
    /// Its hypervisor driver.
    pub driver: Driver,
    /// A simulated Secure Processor of its own (without one, no SEV).
    pub simulated: bool,
    /// `hsev firmware sim init` flags for it (`--asids 1`, `--tcb ...`).
    pub sim_init: Vec<String>,
    /// Its labels.
    pub labels: Vec<String>,
    /// Top-level TOML keys added to its configuration.
    pub extra: String,
    /// Keys added to its `[pool]` table.
    pub pool_keys: String,
}

impl HostSpec {
    /// A host named `name` on `driver` with a simulated Secure Processor.
    pub fn new(name: &str, driver: Driver) -> HostSpec {
        HostSpec {
            name: name.to_owned(),
            driver,
            simulated: true,
            sim_init: Vec::new(),
            labels: Vec::new(),
            extra: String::new(),
            pool_keys: String::new(),
        }
    }

    /// Without any SEV.
    pub fn without_sev(mut self) -> HostSpec {
        self.simulated = false;
        self
    }

    /// Its simulated platform made with these `hsev firmware sim init`
    /// flags.
    pub fn sim(mut self, flags: &[&str]) -> HostSpec {
        self.sim_init = flags.iter().map(|flag| (*flag).to_owned()).collect();
        self
    }

    /// With these labels.
    pub fn labels(mut self, labels: &[&str]) -> HostSpec {
        self.labels = labels.iter().map(|label| (*label).to_owned()).collect();
        self
    }

    /// With these keys in its `[pool]` table (`storage`, `shared_dir`).
    pub fn pool_keys(mut self, toml: &str) -> HostSpec {
        self.pool_keys = toml.to_owned();
        self
    }

    /// With these top-level configuration keys.
    pub fn extra(mut self, toml: &str) -> HostSpec {
        self.extra = toml.to_owned();
        self
    }
}

/// A running pool.
#[derive(Debug)]
pub struct Pool {
    /// The hosts, the coordinator first.
    pub hosts: Vec<Daemon>,
    /// Their names, in the same order.
    pub names: Vec<String>,
    /// Declared last: the namespaces go once every daemon is gone.
    net: TestNet,
}

/// A join token from `coordinator`.
pub fn join_token(coordinator: &Daemon) -> String {
    let token = coordinator.json(ADMIN, ["pool", "join-token", "create"]);
    token["token"].as_str().expect("a token").to_owned()
}

/// The `[pool]` and `[placement]` tables every host of a test pool gets:
/// quick heartbeats, so that a killed host is down within seconds, and
/// placement on simulated Secure Processors (a development pool).
fn pool_tables(address: &str, pool_keys: &str, coordinator_tables: &str) -> String {
    format!(
        "[pool]\nlisten = \"{address}:{POOL_PORT}\"\nheartbeat_ms = 300\ndown_after_ms = 2500\n\
         {pool_keys}\n{coordinator_tables}"
    )
}

impl Pool {
    /// Starts a pool of `specs` (the first is the coordinator);
    /// `coordinator_tables` is TOML added to the coordinator's
    /// configuration after its `[pool]` table (`[placement]` settings, for
    /// instance; `allow_simulated = true` is always set).
    pub fn start(specs: &[HostSpec], coordinator_tables: &str) -> Pool {
        assert!(!specs.is_empty(), "a pool has a coordinator");
        // Declared first, dropped last: a failed start stops the daemons
        // before the namespaces go.
        let mut net = TestNet::new();
        let mut hosts: Vec<Daemon> = Vec::new();
        let placement = if coordinator_tables.contains("[placement]") {
            coordinator_tables.replacen("[placement]", "[placement]\nallow_simulated = true", 1)
        } else {
            format!("[placement]\nallow_simulated = true\n{coordinator_tables}")
        };
        for (index, spec) in specs.iter().enumerate() {
            let host = net.add_host();
            let tables = if index == 0 { placement.as_str() } else { "" };
            let mut daemon = Self::host_daemon(spec, &host, tables);
            if let Some(coordinator) = hosts.first() {
                let token = join_token(coordinator);
                let joined = daemon.hsevd(["join", &token]);
                assert!(
                    joined.status.success(),
                    "{} could not join: {}",
                    spec.name,
                    String::from_utf8_lossy(&joined.stderr)
                );
            }
            daemon.run();
            hosts.push(daemon);
        }
        let pool = Pool {
            hosts,
            names: specs.iter().map(|spec| spec.name.clone()).collect(),
            net,
        };
        pool.wait_hosts_up(pool.hosts.len());
        pool
    }

    /// A daemon for `spec` on `host`, configured, not running.
    fn host_daemon(spec: &HostSpec, host: &NetHost, tables: &str) -> Daemon {
        let labels: Vec<String> = spec
            .labels
            .iter()
            .map(|label| format!("{label:?}"))
            .collect();
        let extra = format!(
            "host_name = \"{}\"\nlabels = [{}]\n{}\n{}",
            spec.name,
            labels.join(", "),
            spec.extra,
            pool_tables(&host.address, &spec.pool_keys, tables)
        );
        let daemon = Daemon::on_host(spec.driver, host, &extra, spec.simulated);
        if !spec.sim_init.is_empty() {
            let dir = daemon.sim_dir().to_str().expect("utf-8").to_owned();
            let mut args = vec!["firmware", "sim", "init", "--dir", &dir];
            args.extend(spec.sim_init.iter().map(String::as_str));
            let output = crate::hsev(&args);
            assert!(
                output.status.success(),
                "hsev {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        daemon
    }

    /// The address of the machine's root namespace on the pool's network:
    /// what runs there (a key broker) is reachable from every host and
    /// from the guests' user networks.
    pub fn gateway(&self) -> String {
        self.net.gateway()
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Daemon {
        &self.hosts[0]
    }

    /// The host named `name`.
    pub fn host(&self, name: &str) -> &Daemon {
        let index = self.index(name);
        &self.hosts[index]
    }

    /// The host named `name`, to kill or restart.
    pub fn host_mut(&mut self, name: &str) -> &mut Daemon {
        let index = self.index(name);
        &mut self.hosts[index]
    }

    fn index(&self, name: &str) -> usize {
        self.names
            .iter()
            .position(|known| known == name)
            .unwrap_or_else(|| panic!("no host {name} in the pool"))
    }

    /// The test network.
    pub fn net(&self) -> &TestNet {
        &self.net
    }

    /// A new join token from the coordinator.
    pub fn join_token(&self) -> String {
        join_token(self.coordinator())
    }

    /// A new test host on the pool's network, with a daemon for `spec`
    /// configured on it (not joined, not running).
    pub fn new_host(&mut self, spec: &HostSpec) -> Daemon {
        let host = self.net.add_host();
        Self::host_daemon(spec, &host, "")
    }

    /// `hsev host list` on the coordinator.
    pub fn hosts_json(&self) -> Vec<serde_json::Value> {
        self.coordinator()
            .json(ADMIN, ["host", "list"])
            .as_array()
            .cloned()
            .expect("hsev host list prints an array")
    }

    /// Waits until `count` hosts are up.
    pub fn wait_hosts_up(&self, count: usize) {
        self.wait_hosts(|hosts| {
            hosts.iter().filter(|host| host["status"] == "up").count() >= count
        });
    }

    /// Waits until `done` holds of `hsev host list`; answers the list.
    pub fn wait_hosts(
        &self,
        done: impl Fn(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let hosts = self.hosts_json();
            if done(&hosts) {
                return hosts;
            }
            assert!(
                Instant::now() < deadline,
                "the pool's hosts did not settle in 60 s: {hosts:#?}\n{}",
                self.coordinator().log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
