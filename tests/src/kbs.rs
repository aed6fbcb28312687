//! A real `hsev-kbs` for tests and benches: its own state folder and TLS
//! pair (HTTPS unless a test asks for the development plain-HTTP mode), a
//! token per tenant repository ([`TENANTS`]), a reader token of each, and
//! one for the operator,
//! listening on a free loopback port (the same one again after a restart).
//! [`Kbs::start`] also creates a simulated AMD Secure Processor platform
//! whose roots it trusts in development mode, for an hsevd to launch
//! through. Dropping it kills the broker.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::binary;
use crate::daemon::{image_dir, sha256_hex, Daemon, ALICE};

/// The tenants every test broker knows: each one's admin token is scoped
/// to the repository of its name.
pub const TENANTS: [&str; 5] = ["alice", "bob", "pool", "default", "bench"];

/// The operator's admin token (announces VMs, nothing else).
pub const KBS_OPERATOR: &str = "operator-kbs-token";

/// The admin token of the tenant whose repository is `repository`.
pub fn tenant_token(repository: &str) -> String {
    format!("{repository}-kbs-token")
}

/// The reader token of `repository` (reads its policies, changes nothing).
pub fn reader_token(repository: &str) -> String {
    format!("{repository}-reader-kbs-token")
}

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
    /// Plain HTTP (`insecure_http_dev`) instead of HTTPS.
    plain_http: bool,
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
        Self::start_in(dir, mode, roots, "", false, "127.0.0.1:0")
    }

    /// A development broker of its own (its own state, its own TLS key)
    /// listening on `address` (`127.0.0.1:PORT`, where another one may have
    /// listened), trusting `simulated_roots`.
    pub fn start_at(simulated_roots: &[&Path], address: &str) -> Kbs {
        let roots = simulated_roots
            .iter()
            .map(|root| root.to_path_buf())
            .collect();
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            KbsMode::Development,
            roots,
            "",
            false,
            address,
        )
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
            false,
            "127.0.0.1:0",
        )
    }

    /// A development broker serving plain HTTP (`hsev-kbs serve
    /// --insecure-http-dev`), trusting `simulated_roots`.
    pub fn start_plain_http(simulated_roots: &[&Path]) -> Kbs {
        let roots = simulated_roots
            .iter()
            .map(|root| root.to_path_buf())
            .collect();
        Self::start_in(
            tempfile::tempdir().expect("tempdir"),
            KbsMode::Development,
            roots,
            "",
            true,
            "127.0.0.1:0",
        )
    }

    fn start_in(
        dir: tempfile::TempDir,
        mode: KbsMode,
        simulated_roots: Vec<PathBuf>,
        extra_config: &str,
        plain_http: bool,
        address: &str,
    ) -> Kbs {
        run_ok(
            Command::new(binary("hsev-kbs"))
                .args(["init", "--state-dir"])
                .arg(dir.path().join("state")),
        );
        for repository in TENANTS {
            std::fs::write(
                dir.path().join(format!("{repository}.token")),
                format!("{}\n", tenant_token(repository)),
            )
            .expect("token file");
            std::fs::write(
                dir.path().join(format!("{repository}.reader.token")),
                format!("{}\n", reader_token(repository)),
            )
            .expect("token file");
        }
        std::fs::write(
            dir.path().join("operator.token"),
            format!("{KBS_OPERATOR}\n"),
        )
        .expect("token file");
        let mut kbs = Kbs {
            dir,
            child: None,
            mode,
            simulated_roots,
            extra_config: extra_config.to_owned(),
            plain_http,
            address: address.to_owned(),
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
        let mut tokens: String = TENANTS
            .iter()
            .map(|repository| {
                format!(
                    "[[admin_tokens]]\nname = \"{repository}\"\nrole = \"tenant\"\n\
                     repository = \"{repository}\"\nsha256 = \"{}\"\n\
                     [[admin_tokens]]\nname = \"{repository}-reader\"\nrole = \"reader\"\n\
                     repository = \"{repository}\"\nsha256 = \"{}\"\n",
                    sha256_hex(&tenant_token(repository)),
                    sha256_hex(&reader_token(repository))
                )
            })
            .collect();
        tokens.push_str(&format!(
            "[[admin_tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            sha256_hex(KBS_OPERATOR)
        ));
        std::fs::write(
            &config,
            format!(
                "listen = \"{}\"\nstate_dir = {:?}\nmode = \"{mode}\"\nsimulated_roots = [{}]\n{}\n{tokens}",
                self.address,
                self.state_dir().display().to_string(),
                roots.join(", "),
                self.extra_config,
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
        let mut command = Command::new(binary("hsev-kbs"));
        command.arg("serve").arg("--config").arg(&config);
        if self.plain_http {
            command.arg("--insecure-http-dev");
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("hsev-kbs starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line);
        let scheme = if self.plain_http { "http" } else { "https" };
        let address = line
            .trim()
            .strip_prefix(&format!("hsev-kbs listening on {scheme}://"))
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

    /// The `hsev vm create` arguments of alice's SNP VM `name` (1 vCPU,
    /// 512 MiB) with a 32 MiB encrypted disk whose key lives at this broker
    /// (repository `alice`), which the guest reaches at `guest_url`.
    pub fn encrypted_vm_args(&self, name: &str, guest_url: &str) -> Vec<String> {
        [
            "vm",
            "create",
            name,
            "--image",
            "debian",
            "--vcpus",
            "1",
            "--memory",
            "512",
            "--mode",
            "sev-snp",
            "--encrypted-disk",
            "32",
            "--key-broker",
            guest_url,
            "--key-broker-pin",
            &self.pin(),
            "--key-broker-repository",
            "alice",
        ]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect()
    }

    /// Alice pins the release policy of her VM `vm` at this broker from her
    /// side (`hsev kbs policy set` through `daemon`): the measurement of the
    /// image `make image` built with the guest's broker `guest_url`, a
    /// simulated platform allowed. Panics unless it succeeds.
    pub fn pin_alice_policy(&self, daemon: &Daemon, vm: &str, guest_url: &str) {
        self.pin_alice_policy_with(daemon, vm, guest_url, &[]);
    }

    /// [`Self::pin_alice_policy`] with the further `hsev kbs policy set`
    /// flags `extra`.
    pub fn pin_alice_policy_with(
        &self,
        daemon: &Daemon,
        vm: &str,
        guest_url: &str,
        extra: &[&str],
    ) {
        let manifest = image_dir().join("manifest.json");
        let token = self.tenant_token_file("alice");
        let (url, pin) = (self.url(), self.pin());
        let mut args = vec![
            "kbs",
            "policy",
            "set",
            "--broker",
            &url,
            "--broker-pin",
            &pin,
            "--broker-token-file",
            token.to_str().expect("utf-8"),
            "--repository",
            "alice",
            "--vm",
            vm,
            "--image-manifest",
            manifest.to_str().expect("utf-8"),
            "--key-broker",
            guest_url,
            "--allow-simulated",
        ];
        args.extend_from_slice(extra);
        let output = daemon.hsev(ALICE, args);
        assert!(
            output.status.success(),
            "hsev kbs policy set: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// The `event` entries of its audit log whose `field` is `value`.
    pub fn audited(&self, event: &str, field: &str, value: &str) -> Vec<serde_json::Value> {
        let log =
            std::fs::read_to_string(self.state_dir().join("audit.jsonl")).expect("the audit log");
        log.lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).expect("JSON lines"))
            .filter(|entry| entry["event"] == event && entry[field] == value)
            .collect()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Its base URL, from this machine.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.address)
    }

    /// Its base URL from inside a QEMU guest on the user network (which
    /// reaches the host's loopback at 10.0.2.2).
    pub fn guest_url(&self) -> String {
        let port = self.address.rsplit(':').next().expect("a port");
        format!("{}://10.0.2.2:{port}", self.scheme())
    }

    fn scheme(&self) -> &'static str {
        if self.plain_http {
            "http"
        } else {
            "https"
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The pin of its TLS key, `sha256:<hex>`, as `hsev-kbs fingerprint`
    /// prints it.
    pub fn pin(&self) -> String {
        let output = Command::new(binary("hsev-kbs"))
            .arg("fingerprint")
            .arg("--config")
            .arg(self.config_path())
            .output()
            .expect("hsev-kbs runs");
        assert!(
            output.status.success(),
            "hsev-kbs fingerprint: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// The file holding the admin token of the tenant `repository`.
    pub fn tenant_token_file(&self, repository: &str) -> PathBuf {
        self.dir.path().join(format!("{repository}.token"))
    }

    /// The file holding the reader token of `repository`.
    pub fn reader_token_file(&self, repository: &str) -> PathBuf {
        self.dir.path().join(format!("{repository}.reader.token"))
    }

    /// The file holding the operator's admin token.
    pub fn operator_token_file(&self) -> PathBuf {
        self.dir.path().join("operator.token")
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

    /// One admin call through curl (an independent client: it pins the
    /// broker's key as `--pinnedpubkey` defines it, no CA): the HTTP status
    /// and the body.
    pub fn curl(
        &self,
        token: &str,
        method: &str,
        route: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        let mut command = Command::new("curl");
        command.args(["--silent", "--show-error", "--max-time", "30"]);
        if !self.plain_http {
            let pin = self.pin();
            let digest = hex_to_base64(pin.strip_prefix("sha256:").expect("a sha256 pin"));
            // -k: no CA is asked to vouch for the self-signed certificate;
            // the pin alone decides.
            command.args(["-k", "--pinnedpubkey", &format!("sha256//{digest}")]);
        }
        command
            .args(["-X", method, "-o", "-", "-w", "\n%{http_code}"])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"));
        if let Some(body) = body {
            command
                .args(["-H", "content-type: application/json", "--data-binary"])
                .arg(body);
        }
        let output = command
            .arg(format!("{}{route}", self.url()))
            .output()
            .expect("curl runs (make deps installs it)");
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        let status = status.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {method} {route}: {text}{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (status, body.to_owned())
    }

    /// `GET /admin/v0/resources` as the tenant `repository`: its
    /// resources, as JSON text.
    pub fn resources(&self, repository: &str) -> String {
        let (status, body) = self.curl(
            &tenant_token(repository),
            "GET",
            "/admin/v0/resources",
            None,
        );
        assert_eq!(status, 200, "GET /admin/v0/resources: {body}");
        body
    }

    /// `hsev-kbs resource export` of `resource`: its secret, read offline
    /// from the broker's store by its owner (the broker must be stopped),
    /// or why not.
    pub fn export(&self, resource: &str) -> Result<Vec<u8>, String> {
        let out = self.dir.path().join(format!(
            "export-{}-{}",
            resource.replace('/', "_"),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|elapsed| elapsed.as_nanos())
                .unwrap_or_default()
        ));
        let output = Command::new(binary("hsev-kbs"))
            .args(["resource", "export", "--config"])
            .arg(self.config_path())
            .args(["--resource", resource, "--out"])
            .arg(&out)
            .output()
            .expect("hsev-kbs runs");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let secret = std::fs::read(&out).expect("the exported secret");
        std::fs::remove_file(&out).expect("removed");
        Ok(secret)
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

/// Hex to standard base64, as curl's `--pinnedpubkey sha256//` wants it.
fn hex_to_base64(hex: &str) -> String {
    let bytes = hex::decode(hex).expect("hex");
    let output = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(&bytes)?;
            child.wait_with_output()
        })
        .expect("base64 runs");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

impl Drop for Kbs {
    fn drop(&mut self) {
        self.kill_9();
    }
}
