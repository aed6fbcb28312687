//! A real etcd member on loopback for the store's tests, shared by the
//! tests that run at the same time (each on a key prefix of its own) and
//! stopped when the last of them drops it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::store::{EtcdStore, StoreConfig};

/// One etcd member.
#[derive(Debug)]
pub(crate) struct EtcdServer {
    child: Child,
    client_url: String,
    _data: TempDir,
}

static SHARED: Mutex<Weak<EtcdServer>> = Mutex::new(Weak::new());

/// A free loopback port (the kernel's pick; etcd binds it right after).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .unwrap()
}

impl EtcdServer {
    /// The member the running tests share, started if none runs.
    pub(crate) fn shared() -> Arc<EtcdServer> {
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = Arc::new(EtcdServer::start());
        *shared = Arc::downgrade(&server);
        server
    }

    /// Starts a one-member cluster in a temporary folder.
    pub(crate) fn start() -> EtcdServer {
        let binary = Path::new("/usr/bin/etcd");
        assert!(
            binary.exists(),
            "the store's etcd tests need etcd ({} is missing): run `make deps` \
             (Debian package etcd-server)",
            binary.display()
        );
        let data = tempfile::tempdir().unwrap();
        let client_port = free_port();
        let peer_port = free_port();
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(data.path().join("etcd.log")).unwrap();
        let child = Command::new(binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", data.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--unsafe-no-fsync")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let server = EtcdServer {
            child,
            client_url,
            _data: data,
        };
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, client_port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "etcd did not listen on {address}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// Its client URL.
    pub(crate) fn url(&self) -> &str {
        &self.client_url
    }

    /// A store on a fresh key prefix of this member.
    pub(crate) fn store(&self) -> EtcdStore {
        let prefix = format!("/test-{}/", uuid::Uuid::new_v4());
        self.store_at(&prefix)
    }

    /// A store on `prefix` of this member.
    pub(crate) fn store_at(&self, prefix: &str) -> EtcdStore {
        EtcdStore::connect(&StoreConfig::etcd([self.url()], prefix)).unwrap()
    }
}

impl EtcdServer {
    /// Kills the member (SIGKILL) and waits for it.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
