//! The OpenSVC v2 agent's side of the `app` resource contract, as its
//! source (`opensvc/drivers/resource/app/__init__.py`, branch b2.1) runs a
//! `forking` resource's script, for tests where no agent can be installed:
//!
//! - argv: the script and one action word (`start`, `stop`, `status`,
//!   `info`);
//! - stdin: /dev/null; its own session (the agent's `preexec_fn` calls
//!   `setsid`), here its own process group;
//! - cwd: the agent's tmp folder;
//! - environment: the agent's own, `HOME`, `LOGNAME`, `PWD`, `USER` of the
//!   script's owner, `OPENSVC_RID`, `OPENSVC_NAME`, `OPENSVC_KIND`,
//!   `OPENSVC_ID`, `OPENSVC_SVCNAME`, `OPENSVC_SVC_ID`, `OPENSVC_NAMESPACE`
//!   (when the service has one), then the resource's `environment`
//!   keyword, shell-split, its names upper-cased;
//! - a timeout: SIGTERM when it expires, SIGKILL at twice it (the agent's
//!   `lcall`).
//!
//! Service configs are read with Python's `configparser` and `shlex`, as
//! the agent reads them.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, workspace_root};

/// The folder of the OpenSVC integration.
pub fn integration_dir() -> PathBuf {
    workspace_root().join("integrations/opensvc")
}

/// A service config, section by section, as the agent's
/// `RawConfigParser` reads it (here strict: a repeated key is an error).
pub type ServiceConfig = BTreeMap<String, BTreeMap<String, String>>;

const READ_CONFIG: &str = r#"
import configparser, json, sys
parser = configparser.RawConfigParser(strict=True)
with open(sys.argv[1]) as config:
    parser.read_file(config)
sections = {"DEFAULT": dict(parser.defaults())}
for section in parser.sections():
    sections[section] = {key: parser.get(section, key, raw=True)
                         for key in parser.options(section) if key not in parser.defaults()}
print(json.dumps(sections))
"#;

const SHLEX_SPLIT: &str = r#"
import json, shlex, sys
print(json.dumps(shlex.split(sys.argv[1])))
"#;

fn python3(script: &str, argument: &str) -> serde_json::Value {
    let output = Command::new("python3")
        .args(["-c", script, argument])
        .output()
        .expect("python3 runs (scripts/deps.sh installs it)");
    assert!(
        output.status.success(),
        "python3 on {argument}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python3 printed JSON")
}

/// Reads a service config with the agent's parser.
pub fn read_service_config(path: &Path) -> ServiceConfig {
    let value = python3(READ_CONFIG, path.to_str().expect("utf-8"));
    serde_json::from_value(value).expect("sections of keys")
}

/// The `environment` keyword's variables as the agent passes them: split
/// as a shell would, names upper-cased, `{nodename}` replaced.
pub fn environment_keyword(value: &str, nodename: &str) -> Vec<(String, String)> {
    let words: Vec<String> =
        serde_json::from_value(python3(SHLEX_SPLIT, value)).expect("a list of words");
    words
        .into_iter()
        .filter_map(|word| {
            let (name, value) = word.split_once('=')?;
            Some((name.to_uppercase(), value.replace("{nodename}", nodename)))
        })
        .collect()
}

/// What one run of the script did.
#[derive(Debug)]
pub struct Run {
    /// Its exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// What it printed.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
    /// How long it took.
    pub elapsed: Duration,
}

impl Run {
    /// stdout and stderr together, for messages.
    pub fn output(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// An `app` resource of type `forking` whose script is the launcher.
#[derive(Debug, Clone)]
pub struct AppResource {
    /// The service's name.
    pub service: String,
    /// Its namespace (`None`: root).
    pub namespace: Option<String>,
    /// The resource id.
    pub rid: String,
    /// The `environment` keyword's variables, in order.
    pub environment: Vec<(String, String)>,
    /// The agent's tmp folder, the script's cwd.
    pub tmp: PathBuf,
    /// The script owner's home.
    pub home: PathBuf,
}

impl AppResource {
    /// The variable `name` set to `value` (replaced, or added last).
    pub fn set(&mut self, name: &str, value: &str) {
        match self.environment.iter_mut().find(|(key, _)| key == name) {
            Some((_, old)) => *old = value.to_owned(),
            None => self.environment.push((name.to_owned(), value.to_owned())),
        }
    }

    /// The variable `name` removed.
    pub fn unset(&mut self, name: &str) {
        self.environment.retain(|(key, _)| key != name);
    }

    /// Runs `hsev-opensvc ACTION` as the agent runs the script, killing it
    /// as the agent would after `timeout`.
    pub fn run(&self, action: &str, timeout: Duration) -> Run {
        let launcher = binary("hsev-opensvc");
        let mut command = Command::new(&launcher);
        command
            .arg(action)
            .env_clear()
            // The agent's own environment: a daemon started by the init
            // system has little more than PATH.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", &self.home)
            .env("LOGNAME", "root")
            .env("PWD", &self.tmp)
            .env("USER", "root")
            .env("OPENSVC_RID", &self.rid)
            .env("OPENSVC_NAME", &self.service)
            .env("OPENSVC_KIND", "svc")
            .env("OPENSVC_ID", &self.service)
            .env("OPENSVC_SVCNAME", &self.service)
            .env("OPENSVC_SVC_ID", "0a3c9d7e-5b1f-4c2a-9e8d-7f6b5a4c3d2e")
            .current_dir(&self.tmp)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(namespace) = &self.namespace {
            command.env("OPENSVC_NAMESPACE", namespace);
        }
        for (name, value) in &self.environment {
            command.env(name, value);
        }
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("{}: {error}", launcher.display()));
        let (mut terminated, mut killed) = (false, false);
        loop {
            if child.try_wait().expect("waits").is_some() {
                break;
            }
            let elapsed = started.elapsed();
            if elapsed > timeout * 2 && !killed {
                let _ = child.kill();
                killed = true;
            } else if elapsed > timeout && !terminated {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                terminated = true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let output = child.wait_with_output().expect("output");
        let run = Run {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            elapsed: started.elapsed(),
        };
        assert!(
            run.elapsed <= timeout,
            "hsev-opensvc {action} ran past the agent's timeout ({timeout:?}) and was killed: {}",
            run.output()
        );
        run
    }
}
