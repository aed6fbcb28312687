//! A real SlapOS master for end-to-end tests: slapproxy (`slapos proxy
//! start`, slapos.core 1.26.1 as `make deps` installs it in
//! `.tools/slapos`) on a free loopback port with a database of its own, the
//! real `slapos request` and `slapos supply` CLIs against it, and the
//! connector (`hsev slapos node`) between it and an hsevd. Dropping either
//! kills it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::Daemon;
use crate::{binary, free_port, project_tool, workspace_root};

/// The compute node the tests register.
pub const COMPUTER: &str = "COMP-HSEV";

/// The `slapos` command of slapos.core.
pub fn slapos_cli() -> PathBuf {
    project_tool("slapos/bin/slapos")
}

/// The Python of slapos.core's environment.
fn slapos_python() -> PathBuf {
    project_tool("slapos/bin/python")
}

/// HyperSEV's software release, by the path requesters name it with.
pub fn software_release() -> String {
    workspace_root()
        .join("integrations/slapos/software.cfg")
        .display()
        .to_string()
}

/// The id slapproxy gives the instance a user requests as `title`.
pub fn instance_guid(title: &str) -> String {
    format!("{title}______0")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What `slapos request` printed.
#[derive(Debug, Clone)]
pub struct Requested {
    /// The state it says the instance has.
    pub state: String,
    /// The connection parameters it printed, decoded.
    pub connection: Value,
    /// Everything it printed.
    pub output: String,
}

/// A running slapproxy.
#[derive(Debug)]
pub struct Slapproxy {
    dir: tempfile::TempDir,
    child: Option<Child>,
    port: u16,
}

impl Slapproxy {
    /// Starts one on a free port.
    pub fn start() -> Slapproxy {
        let mut proxy = Slapproxy {
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
            port: free_port(),
        };
        std::fs::write(
            proxy.client_config(),
            format!("[slapos]\nmaster_url = {}\n", proxy.url()),
        )
        .expect("client config");
        proxy.spawn();
        proxy
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("slapos.cfg")
    }

    fn client_config(&self) -> PathBuf {
        self.dir.path().join("client.cfg")
    }

    /// Its database.
    pub fn database(&self) -> PathBuf {
        self.dir.path().join("proxy.db")
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("proxy.log")
    }

    fn spawn(&mut self) {
        std::fs::write(
            self.config(),
            format!(
                "[slapos]\ncomputer_id = {COMPUTER}\nmaster_url = {url}\n\n[slapproxy]\n\
                 host = 127.0.0.1\nport = {port}\ndatabase_uri = {db}\n",
                url = self.url(),
                port = self.port,
                db = self.database().display()
            ),
        )
        .expect("proxy config");
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("proxy.out"))
            .expect("output file");
        let child = Command::new(slapos_cli())
            .arg("--log-file")
            .arg(self.log_file())
            .args(["proxy", "start", "--cfg"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(output.try_clone().expect("output"))
            .stderr(output)
            .spawn()
            .expect("slapos proxy starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self
                .try_rpc(
                    "slapos.allDocs.v0.instance_tree_list",
                    &serde_json::json!({}),
                )
                .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "slapos proxy exited with {status}: {}",
                    std::fs::read_to_string(self.dir.path().join("proxy.out")).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "slapproxy did not answer in 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills it with SIGKILL: the master is down.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and database.
    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }

    /// What it logged (one line per HTTP request among others).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// How many times `method` was POSTed to it.
    pub fn calls(&self, method: &str) -> usize {
        let needle = format!("POST /{method} HTTP");
        self.log()
            .lines()
            .filter(|line| line.contains(&needle))
            .count()
    }

    fn try_rpc(&self, method: &str, body: &Value) -> std::io::Result<(u16, Value)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let body = body.to_string();
        write!(
            stream,
            "POST /{method} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let json = response
            .split_once("\r\n\r\n")
            .and_then(|(_, body)| serde_json::from_str(body).ok())
            .unwrap_or(Value::Null);
        Ok((status, json))
    }

    /// Calls its JSON-RPC API as a node would: the status and the JSON.
    pub fn rpc(&self, method: &str, body: &Value) -> (u16, Value) {
        self.try_rpc(method, body)
            .unwrap_or_else(|error| panic!("{method}: {error}"))
    }

    /// The connection parameters `instance` published, decoded from the
    /// release's json-in-xml serialisation.
    pub fn connection(&self, instance: &str) -> Value {
        let (status, answer) = self.rpc(
            "slapos.get.v0.software_instance",
            &serde_json::json!({ "instance_guid": instance }),
        );
        if status != 200 {
            return Value::Null;
        }
        match answer["connection_parameters"]["_"].as_str() {
            Some(document) => serde_json::from_str(document).unwrap_or(Value::Null),
            None => answer["connection_parameters"].clone(),
        }
    }

    /// Waits until `instance`'s connection parameters satisfy `done`.
    pub fn wait_for(
        &self,
        instance: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let connection = self.connection(instance);
            if done(&connection) {
                return connection;
            }
            assert!(
                Instant::now() < deadline,
                "{instance}: not {what} in {timeout:?}; publishes {connection}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `slapos supply SOFTWARE_RELEASE COMPUTER`.
    pub fn supply(&self, software_release: &str) {
        let output = Command::new(slapos_cli())
            .arg("--log-file")
            .arg(self.dir.path().join("client.log"))
            .args(["supply", software_release, COMPUTER, "--cfg"])
            .arg(self.client_config())
            .output()
            .expect("slapos supply runs");
        assert!(
            output.status.success(),
            "slapos supply: {}",
            text(&output.stderr)
        );
    }

    /// `slapos request TITLE SR --type TYPE --node computer_guid=COMPUTER
    /// --parameters-file P.json [--state STATE]`, and what it printed.
    pub fn request(
        &self,
        title: &str,
        software_type: &str,
        parameters: &Value,
        state: Option<&str>,
    ) -> Requested {
        self.request_release(&software_release(), title, software_type, parameters, state)
    }

    /// [`Slapproxy::request`] of another software release.
    pub fn request_release(
        &self,
        software_release: &str,
        title: &str,
        software_type: &str,
        parameters: &Value,
        state: Option<&str>,
    ) -> Requested {
        let file = self.dir.path().join(format!("{title}.json"));
        std::fs::write(&file, parameters.to_string()).expect("parameters file");
        let mut command = Command::new(slapos_cli());
        command
            .arg("--log-file")
            .arg(self.dir.path().join("client.log"))
            .args(["request", "--cfg"])
            .arg(self.client_config())
            .args([title, software_release, "--type", software_type])
            .args(["--node", &format!("computer_guid={COMPUTER}")])
            .arg("--parameters-file")
            .arg(&file);
        if let Some(state) = state {
            command.args(["--state", state]);
        }
        let output = command.output().expect("slapos request runs");
        let printed = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(output.status.success(), "slapos request {title}: {printed}");
        let state = printed
            .split("State is : ")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .unwrap_or_default()
            .to_owned();
        let connection = printed
            .split("Connection parameters of instance are:\n")
            .nth(1)
            .and_then(|rest| rest.split_once(" INFO "))
            .and_then(|(_, rest)| rest.split("\n20").next())
            .map(python_literal)
            .unwrap_or(Value::Null);
        Requested {
            state,
            connection,
            output: printed,
        }
    }

    /// The partitions of the test's compute node and their slap states,
    /// from slapproxy's database.
    pub fn partitions(&self) -> Vec<(String, String)> {
        let connection = rusqlite::Connection::open(self.database()).expect("the proxy db opens");
        connection
            .busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        let table: String = connection
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'partition%' \
                 AND name NOT LIKE 'partition_network%'",
                [],
                |row| row.get(0),
            )
            .expect("a partition table");
        let mut statement = connection
            .prepare(&format!(
                "SELECT reference, slap_state FROM {table} WHERE computer_reference = ?1 \
                 ORDER BY length(reference), reference"
            ))
            .expect("query");
        statement
            .query_map([COMPUTER], |row| Ok((row.get(0)?, row.get(1)?)))
            .expect("rows")
            .map(|row| row.expect("row"))
            .collect()
    }
}

/// A Python literal as `slapos request` prints it (pprint of a dict),
/// read by Python itself, as JSON.
fn python_literal(literal: &str) -> Value {
    let mut child = Command::new(slapos_python())
        .args([
            "-c",
            "import ast, json, sys; print(json.dumps(ast.literal_eval(sys.stdin.read().strip())))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(literal.as_bytes())
        .expect("written");
    let output = child.wait_with_output().expect("python ends");
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|error| panic!("not a dict ({error}): {literal}"))
}

impl Drop for Slapproxy {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// How a connector is set up.
#[derive(Debug, Clone)]
pub struct ConnectorConfig {
    /// The master's URL.
    pub master_url: String,
    /// Lines added to `[master]`.
    pub master_extra: String,
    /// hsevd's socket.
    pub socket: PathBuf,
    /// The token and the name hsevd knows it by.
    pub token: (String, String),
    /// `node.partitions`, when set.
    pub partitions: Option<u32>,
    /// `node.pass_interval_seconds`.
    pub pass_interval_seconds: u32,
    /// `node.allow_simulated_firmware`.
    pub allow_simulated_firmware: bool,
    /// `[key_broker]`: the requesters' broker, its reader token of
    /// `repository`.
    pub key_broker: Option<ConnectorKeyBroker>,
}

/// The connector's `[key_broker]`.
#[derive(Debug, Clone)]
pub struct ConnectorKeyBroker {
    /// As the guests reach it.
    pub guest_url: String,
    /// As the connector reaches it.
    pub url: String,
    /// Its public key's pin.
    pub pin: String,
    /// The requesters' repository.
    pub repository: String,
    /// The connector's token there.
    pub token_file: PathBuf,
}

impl ConnectorKeyBroker {
    /// `kbs`, for the requesters of `repository`, with its reader token.
    pub fn of(kbs: &crate::kbs::Kbs, repository: &str) -> Self {
        ConnectorKeyBroker {
            guest_url: kbs.guest_url(),
            url: kbs.url(),
            pin: kbs.pin(),
            repository: repository.to_owned(),
            token_file: kbs.reader_token_file(repository),
        }
    }
}

impl ConnectorConfig {
    /// A connector of `master` and `daemon` with its admin token, on a
    /// development pool.
    pub fn new(master: &Slapproxy, daemon: &Daemon) -> Self {
        ConnectorConfig {
            master_url: master.url(),
            master_extra: String::new(),
            socket: daemon.socket(),
            token: (crate::daemon::ADMIN.to_owned(), "ops".to_owned()),
            partitions: None,
            pass_interval_seconds: 1,
            allow_simulated_firmware: true,
            key_broker: None,
        }
    }

    fn render(&self, dir: &Path) -> String {
        let token = dir.join("hsev.token");
        std::fs::write(&token, format!("{}\n", self.token.0)).expect("token");
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
        let mut text = format!(
            "[master]\nurl = {:?}\ncomputer_guid = {COMPUTER:?}\nsoftware_release = {:?}\n{}\n\
             [hsev]\nendpoint = {:?}\ntoken_file = \"hsev.token\"\nowner = {:?}\n\n\
             [node]\npass_interval_seconds = {}\nstop_timeout_seconds = 20\n\
             allow_simulated_firmware = {}\n",
            self.master_url,
            software_release(),
            self.master_extra,
            format!("unix://{}", self.socket.display()),
            self.token.1,
            self.pass_interval_seconds,
            self.allow_simulated_firmware,
        );
        if let Some(partitions) = self.partitions {
            text.push_str(&format!("partitions = {partitions}\n"));
        }
        if let Some(key_broker) = &self.key_broker {
            text.push_str(&format!(
                "\n[key_broker]\nguest_url = {:?}\nurl = {:?}\npin = {:?}\nrepository = {:?}\n\
                 token_file = {:?}\n",
                key_broker.guest_url,
                key_broker.url,
                key_broker.pin,
                key_broker.repository,
                key_broker.token_file.display().to_string()
            ));
        }
        text
    }
}

/// A running connector.
#[derive(Debug)]
pub struct Connector {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Connector {
    /// Starts `hsev slapos node` with `config`.
    pub fn start(config: &ConnectorConfig) -> Connector {
        let mut connector = Self::prepare(config);
        connector.spawn();
        connector
    }

    /// A connector with `config`, not started ([`Connector::once`] runs
    /// passes of it).
    pub fn prepare(config: &ConnectorConfig) -> Connector {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("connector.toml"), config.render(dir.path()))
            .expect("config written");
        Connector { dir, child: None }
    }

    /// Its config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("connector.toml")
    }

    fn command(&self) -> Command {
        let mut command = Command::new(binary("hsev"));
        command
            .args(["slapos", "node", "--config"])
            .arg(self.config_path())
            .env("HSEV_LOG", "info")
            .env("XDG_CONFIG_HOME", self.dir.path())
            .env_remove("HSEV_CONFIG")
            .env_remove("HSEV_TOKEN")
            .env_remove("HSEV_TOKEN_FILE")
            .env_remove("HSEV_ENDPOINT")
            .env_remove("HSEV_CA")
            .stdin(Stdio::null());
        command
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("connector.log"))
            .expect("log file");
        let child = self
            .command()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("hsev slapos node starts");
        self.child = Some(child);
    }

    /// One pass with `--once`, as a process of its own.
    pub fn once(&self) -> Output {
        self.command()
            .arg("--once")
            .output()
            .expect("hsev slapos node runs")
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("connector.log")).unwrap_or_default()
    }

    /// How many of its log lines hold `needle`.
    pub fn logged(&self, needle: &str) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Waits until it logged `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.logged(needle) == 0 {
            assert!(
                Instant::now() < deadline,
                "the connector did not log {needle:?} in {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Kills it with SIGKILL, as a crash would.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again (after [`Connector::kill_9`]).
    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A TLS front before slapproxy that demands a client certificate of
/// `dir/ca.pem`, as the real master does (`tests/src/tls_front.py`, on the
/// system's Python); killed when dropped.
#[derive(Debug)]
pub struct TlsFront {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl TlsFront {
    /// Serves `dir/server.pem` and `dir/server.key` on a free port and
    /// forwards to `backend` on loopback.
    pub fn start(dir: &Path, backend: u16) -> TlsFront {
        let port = free_port();
        let log = dir.join("tls-front.log");
        let child = Command::new("python3")
            .arg(workspace_root().join("tests/src/tls_front.py"))
            .args([port.to_string(), backend.to_string()])
            .arg(dir)
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs (make deps installs it)");
        let mut front = TlsFront { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !front.log().contains("listening") {
            if let Ok(Some(status)) = front.child.try_wait() {
                panic!("the TLS front exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the TLS front did not listen in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        front
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What it printed: one line per refused handshake.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
