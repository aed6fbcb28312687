//! A real `hsev-kbs` for tests and benches: its own state folder, an admin
//! token, listening on a free loopback port (the same one again after a
//! restart). [`Kbs::start`] also creates a simulated AMD Secure Processor
//! platform whose roots it trusts in development mode, for an hsevd to
//! launch through. Dropping it kills the broker.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::binary;
use crate::daemon::sha256_hex;

/// The admin API's bearer token.
pub const KBS_ADMIN: &str = "kbs-admin-token";

/// Which simulated evidence the broker accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KbsMode {
    /// Trusts the simulated platform's roots (a development pool).
    Development,
    /// Trusts AMD's roots only: simulated evidence is always refused.
    Production,
}

/// A running key broker.
#[derive(Debug)]
pub struct Kbs {
    dir: tempfile::TempDir,
    child: Option<Child>,
    mode: KbsMode,
    simulated_roots: Vec<PathBuf>,
    extra_config: String,
    /// `127.0.0.1:PORT` once known; a restart listens there again.
    address: String,
}

fn run_ok(command: &mut Command) {
    let output = command.output().expect("runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Kbs {
    /// Creates a simulated platform (see [`Kbs::sim_dir`]) and a broker in
    /// `mode` that trusts it in development.
    pub fn start(mode: KbsMode) -> Kbs {
        let dir = tempfile::tempdir().expect("tempdir");
        let sim_dir = dir.path().join("sim");
        run_ok(
            Command::new(binary("hsev"))
                .args(["firmware", "sim", "init", "--dir"])
                .arg(&sim_dir),
        );
        let roots = match mode {
            KbsMode::Development => vec![sim_dir],
            KbsMode::Production => Vec::new(),
        };
        Self::start_in(dir, mode, roots, "")
    }

    /// A broker in `mode` trusting `simulated_roots` (platform folders or
    /// PEM bundles), with `extra_config` TOML lines.
    pub fn start_with(mode: KbsMode, simulated_roots: &[&Path], extra_config: &str) -> Kbs {
        let roots = simulated_roots
            .iter()
            .map(|root| root.to_path_buf())
            .collect();
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            mode,
            roots,
            extra_config,
        )
    }

    fn start_in(
        dir: tempfile::TempDir,
        mode: KbsMode,
        simulated_roots: Vec<PathBuf>,
        extra_config: &str,
    ) -> Kbs {
        run_ok(
            Command::new(binary("hsev-kbs"))
                .args(["init", "--state-dir"])
                .arg(dir.path().join("state")),
        );
        std::fs::write(dir.path().join("admin.token"), format!("{KBS_ADMIN}\n"))
            .expect("token file");
        let mut kbs = Kbs {
            dir,
            child: None,
            mode,
            simulated_roots,
            extra_config: extra_config.to_owned(),
            address: "127.0.0.1:0".to_owned(),
        };
        kbs.spawn();
        kbs
    }

    /// Its configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("kbs.toml")
    }

    fn write_config(&self) -> PathBuf {
        let mode = match self.mode {
            KbsMode::Development => "development",
            KbsMode::Production => "production",
        };
        let roots: Vec<String> = self
            .simulated_roots
            .iter()
            .map(|root| format!("{:?}", root.display().to_string()))
            .collect();
        let config = self.config_path();
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\nstate_dir = {:?}\nmode = \"{mode}\"\nsimulated_roots = [{}]\n{}\n\
                 [[admin_tokens]]\nname = \"hsevd\"\nsha256 = \"{}\"\n",
                self.address,
                self.state_dir().display().to_string(),
                roots.join(", "),
                self.extra_config,
                sha256_hex(KBS_ADMIN),
            ),
        )
        .expect("config written");
        config
    }

    fn spawn(&mut self) {
        let config = self.write_config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("kbs.log"))
            .expect("log file");
        let mut child = Command::new(binary("hsev-kbs"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("hsev-kbs starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let address = line
            .trim()
            .strip_prefix("hsev-kbs listening on http://")
            .map(str::to_owned);
        match (read, address) {
            (Ok(_), Some(address)) => self.address = address,
            _ => panic!(
                "hsev-kbs did not say where it listens ({line:?}): {}",
                self.log()
            ),
        }
        self.child = Some(child);
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The file holding the admin token.
    pub fn admin_token_file(&self) -> PathBuf {
        self.dir.path().join("admin.token")
    }

    /// The simulated Secure Processor platform [`Kbs::start`] created.
    pub fn sim_dir(&self) -> PathBuf {
        self.dir.path().join("sim")
    }

    /// Its state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kbs.log")).unwrap_or_default()
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same state and port.
    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }

    /// `GET /admin/v0/resources` as the admin: the registered resources.
    pub fn resources(&self) -> String {
        let mut stream = TcpStream::connect(&self.address).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /admin/v0/resources HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KBS_ADMIN}\r\n\
             Connection: close\r\n\r\n",
            self.address
        )
        .expect("request sent");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "GET /admin/v0/resources: {response}"
        );
        response
    }

    /// `hsev-kbs audit verify` of its state folder.
    pub fn audit_verify(&self) -> Output {
        Command::new(binary("hsev-kbs"))
            .args(["audit", "verify", "--state-dir"])
            .arg(self.state_dir())
            .output()
            .expect("hsev-kbs runs")
    }

    /// Checks its audit log's hash chain.
    pub fn verify_audit(&self) {
        let output = self.audit_verify();
        assert!(
            output.status.success(),
            "audit verify: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Kbs {
    fn drop(&mut self) {
        self.kill_9();
    }
}
