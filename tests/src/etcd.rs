//! Real etcd clusters for the tests: `n` members of Debian's etcd 3.4 on
//! loopback (or on given addresses, such as test hosts' namespaces), each
//! with its own data folder, that a test can kill and bring back.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Where the tests expect etcd (Debian package etcd-server, `make deps`).
pub const ETCD: &str = "/usr/bin/etcd";

/// One member: its ports and, while it runs, its process.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A cluster of real etcd members. Dropping it kills them.
#[derive(Debug)]
pub struct EtcdCluster {
    host: String,
    members: Vec<Member>,
    dir: TempDir,
}

fn free_port(host: &str) -> u16 {
    TcpListener::bind((host, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl EtcdCluster {
    /// Starts `size` members on 127.0.0.1 and waits until they serve.
    pub fn start(size: usize) -> EtcdCluster {
        Self::start_on(size, "127.0.0.1")
    }

    /// Starts `size` members on `host`'s address (the root namespace's on
    /// a test network, which every test host reaches) and waits until
    /// they serve.
    pub fn start_on(size: usize, host: &str) -> EtcdCluster {
        assert!(
            std::path::Path::new(ETCD).exists(),
            "{ETCD} is missing: run `make deps` (Debian package etcd-server)"
        );
        let host = host.to_owned();
        let dir = tempfile::tempdir().expect("a folder for etcd");
        let members = (0..size)
            .map(|index| Member {
                name: format!("m{index}"),
                client_port: free_port(&host),
                peer_port: free_port(&host),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { host, members, dir };
        for index in 0..size {
            cluster.spawn(index);
        }
        for index in 0..size {
            cluster.wait_serving(index);
        }
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|member| format!("{}=http://{}:{}", member.name, self.host, member.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, index: usize) -> PathBuf {
        self.dir.path().join(&self.members[index].name)
    }

    fn spawn(&mut self, index: usize) {
        let initial_cluster = self.initial_cluster();
        let data_dir = self.data_dir(index);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(
                self.dir
                    .path()
                    .join(format!("{}.log", self.members[index].name)),
            )
            .expect("the member's log");
        let member = &self.members[index];
        let client = format!("http://{}:{}", self.host, member.client_port);
        let peer = format!("http://{}:{}", self.host, member.peer_port);
        let child = Command::new(ETCD)
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-token=hsev-test")
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=100")
            .arg("--election-timeout=1000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.members[index].child = Some(child);
    }

    fn wait_listening(&self, index: usize) {
        let address: SocketAddr = format!("{}:{}", self.host, self.members[index].client_port)
            .parse()
            .expect("an address");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd member {index} did not listen on {address}: {}",
                self.log(index)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until member `index` serves clients, which it does once it
    /// has published itself through the raft leader: the cluster has a
    /// quorum.
    fn wait_serving(&self, index: usize) {
        self.wait_listening(index);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log(index).contains("ready to serve client requests") {
            assert!(
                Instant::now() < deadline,
                "etcd member {index} did not join a quorum: {}",
                self.log(index)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|member| format!("http://{}:{}", self.host, member.client_port))
            .collect()
    }

    /// Kills member `index` (SIGKILL), keeping its data.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `index` again on its data.
    pub fn restart(&mut self, index: usize) {
        assert!(self.members[index].child.is_none(), "member {index} runs");
        self.spawn(index);
        self.wait_listening(index);
    }

    /// Member `index`'s log, for failure messages.
    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[index].name)),
        )
        .unwrap_or_default()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}
