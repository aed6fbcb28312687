//! Test hosts on one machine: one network namespace per host, each with a
//! veth pair into a bridge in the root namespace and an address of its own
//! on a /24 the test allocates (`10.77.<net>.0/24`, the bridge at `.1`).
//! Made and removed by the test; only these addresses are ever targets. A
//! host's network is cut by setting its link down.

use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::Command;

/// Where allocated networks are recorded, so that tests running at once
/// (and leftovers of a killed run) never share one.
const LOCKS: &str = "/run/hsev-test-nets";

/// A test network.
#[derive(Debug)]
pub struct TestNet {
    net: u8,
    lock: PathBuf,
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

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl TestNet {
    /// A new network with its bridge.
    pub fn new() -> TestNet {
        std::fs::create_dir_all(LOCKS).expect("the lock folder");
        for net in 1..=250u8 {
            let lock = PathBuf::from(LOCKS).join(format!("{net}.lock"));
            // A lock left by a test that is gone is cleaned up first.
            if let Ok(owner) = std::fs::read_to_string(&lock) {
                if owner.trim().parse().is_ok_and(pid_alive) {
                    continue;
                }
                Self::remove_net(net);
                let _ = std::fs::remove_file(&lock);
            }
            let Ok(mut file) = OpenOptions::new().write(true).create_new(true).open(&lock) else {
                continue;
            };
            use std::io::Write;
            let _ = write!(file, "{}", std::process::id());
            let bridge = Self::bridge_name(net);
            Self::remove_net(net);
            must(&["link", "add", &bridge, "type", "bridge"]);
            must(&["addr", "add", &format!("10.77.{net}.1/24"), "dev", &bridge]);
            must(&["link", "set", &bridge, "up"]);
            return TestNet {
                net,
                lock,
                hosts: Vec::new(),
            };
        }
        panic!("no free test network in 10.77.1-250.0/24");
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
        let _ = std::fs::remove_file(&self.lock);
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
