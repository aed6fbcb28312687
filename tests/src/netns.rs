//! Test hosts on one machine: one network namespace per host, each with a
//! veth pair into a bridge in the root namespace and an address of its own
//! on a /24 the test allocates (`10.77.<net>.0/24`, the bridge at `.1`).
//! Made and removed by the test; only these addresses are ever targets. A
//! host's network is cut by setting its link down.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Command;

/// Where each allocated network's lock file is, so that tests running at
/// once never share a network, and a killed run's leftovers are cleaned up
/// by the next holder.
const LOCKS: &str = "/run/hsev-test-nets";

/// A test network.
#[derive(Debug)]
pub struct TestNet {
    net: u8,
    /// Held for the network's life.
    _lock: std::fs::File,
    hosts: Vec<NetHost>,
}

/// One test host's place on the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetHost {
    /// Its network namespace.
    pub namespace: String,
    /// Its address.
    pub address: String,
    /// Its veth in the root namespace (set down to cut it off).
    link: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| format!("cannot run ip: {error} (iproute2)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    ip(args).unwrap_or_else(|error| panic!("{error}"));
}

impl TestNet {
    /// A new network with its bridge.
    pub fn new() -> TestNet {
        std::fs::create_dir_all(LOCKS).expect("the lock folder");
        for net in 1..=250u8 {
            // The network is ours while we hold the lock on its file; the
            // lock goes with its holder, however it ends. Lock files stay:
            // a file removed while locked would let two holders in.
            let path = PathBuf::from(LOCKS).join(format!("{net}.lock"));
            let Ok(lock) = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
            else {
                continue;
            };
            if lock.try_lock().is_err() || Self::held_by_another(&path) {
                continue;
            }
            // The holder's pid, for whoever looks at the folder.
            use std::io::Write;
            if lock.set_len(0).is_err() || write!(&lock, "{}", std::process::id()).is_err() {
                continue;
            }
            // Whatever a holder that died left on it goes first.
            Self::remove_net(net);
            let bridge = Self::bridge_name(net);
            must(&["link", "add", &bridge, "type", "bridge"]);
            must(&["addr", "add", &format!("10.77.{net}.1/24"), "dev", &bridge]);
            must(&["link", "set", &bridge, "up"]);
            return TestNet {
                net,
                _lock: lock,
                hosts: Vec::new(),
            };
        }
        panic!("no free test network in 10.77.1-250.0/24");
    }

    /// Whether the pid the lock file names is another live process: a
    /// holder from a harness that recorded its pid without locking.
    fn held_by_another(path: &std::path::Path) -> bool {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
    }

    fn bridge_name(net: u8) -> String {
        format!("hsbr{net}")
    }

    fn namespace_name(net: u8, index: usize) -> String {
        format!("hsev-{net}-h{index}")
    }

    /// Removes whatever a network `net` left: its namespaces, the veths of
    /// a host added only half-way (both ends still here), and its bridge.
    fn remove_net(net: u8) {
        for index in 1..=16 {
            let _ = ip(&["netns", "delete", &Self::namespace_name(net, index)]);
            let _ = ip(&["link", "delete", &format!("hs{net}h{index}")]);
        }
        let _ = ip(&["link", "delete", &Self::bridge_name(net)]);
    }

    /// The bridge's address, the root namespace's on this network.
    pub fn gateway(&self) -> String {
        format!("10.77.{}.1", self.net)
    }

    /// Adds a host: a namespace, its veth into the bridge, an address.
    pub fn add_host(&mut self) -> NetHost {
        let index = self.hosts.len() + 1;
        let namespace = Self::namespace_name(self.net, index);
        let link = format!("hs{}h{index}", self.net);
        let peer = format!("hs{}h{index}p", self.net);
        let address = format!("10.77.{}.{}", self.net, 10 + index);
        must(&["netns", "add", &namespace]);
        must(&["link", "add", &link, "type", "veth", "peer", "name", &peer]);
        must(&["link", "set", &link, "master", &Self::bridge_name(self.net)]);
        must(&["link", "set", &link, "up"]);
        must(&["link", "set", &peer, "netns", &namespace]);
        must(&[
            "-n",
            &namespace,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &peer,
        ]);
        must(&["-n", &namespace, "link", "set", &peer, "up"]);
        must(&["-n", &namespace, "link", "set", "lo", "up"]);
        must(&[
            "-n",
            &namespace,
            "route",
            "add",
            "default",
            "via",
            &self.gateway(),
        ]);
        let host = NetHost {
            namespace,
            address,
            link,
        };
        self.hosts.push(host.clone());
        host
    }

    /// Cuts a host off the network (its link down), as a partition does.
    pub fn cut(&self, host: &NetHost) {
        must(&["link", "set", &host.link, "down"]);
    }

    /// Brings a cut host back.
    pub fn heal(&self, host: &NetHost) {
        must(&["link", "set", &host.link, "up"]);
    }
}

impl Default for TestNet {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        Self::remove_net(self.net);
    }
}

impl NetHost {
    /// `command` run inside this host's namespace.
    pub fn command(&self, program: &std::path::Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace])
            .arg(program);
        command
    }
}
