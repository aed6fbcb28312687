//! The SlapOS master as a compute node sees it: its JSON-RPC API
//! (`POST <master>/slapos.<verb>.v0.<object>` with a JSON body, as
//! slapos.core's `json_rpc.json` defines it), over HTTP or over HTTPS with
//! the node's client certificate where the master asks for one (the real
//! master does; slapproxy, on plain HTTP, does not).
//!
//! Blocking calls with a timeout each: the connector runs them off its
//! async threads. Instance ids are opaque strings, passed back as given.

use std::path::Path;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};

use super::config::MasterConfig;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A call to the master that did not work.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// Connection refused, reset, timed out, TLS handshake refused.
    #[error("the master at {url} is unreachable: {detail}")]
    Unreachable {
        /// The master.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The master answered with an error status.
    #[error("the master refused {method} (HTTP {status}): {title}")]
    Refused {
        /// The JSON-RPC method.
        method: String,
        /// The HTTP status.
        status: u16,
        /// Its explanation.
        title: String,
    },
    /// The master answered something its API does not define.
    #[error("the master's answer to {method} is not what its API defines: {detail}")]
    Protocol {
        /// The JSON-RPC method.
        method: String,
        /// What is wrong.
        detail: String,
    },
    /// The node's certificate, key or CA files cannot be used.
    #[error("{0}")]
    Setup(String),
}

impl MasterError {
    /// Whether the master itself is away (as opposed to refusing one call).
    pub fn is_outage(&self) -> bool {
        match self {
            MasterError::Unreachable { .. } => true,
            MasterError::Refused { status, .. } => matches!(status, 502..=504),
            MasterError::Protocol { .. } | MasterError::Setup(_) => false,
        }
    }
}

/// What the requester asked an instance to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestedState {
    /// Running.
    Started,
    /// Defined, not running.
    Stopped,
    /// Gone, its partition freed.
    Destroyed,
}

impl RequestedState {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "started" => Some(RequestedState::Started),
            "stopped" => Some(RequestedState::Stopped),
            "destroyed" => Some(RequestedState::Destroyed),
            _ => None,
        }
    }

    /// The name the master uses.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestedState::Started => "started",
            RequestedState::Stopped => "stopped",
            RequestedState::Destroyed => "destroyed",
        }
    }
}

/// An instance placed on one of this node's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSummary {
    /// The instance's id (opaque).
    pub instance_guid: String,
    /// The partition it is on.
    pub partition: String,
    /// What it should be.
    pub state: RequestedState,
    /// Its software release.
    pub software_release: String,
}

/// An instance in full.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    /// Its id (opaque).
    pub instance_guid: String,
    /// Its software release.
    pub software_release: String,
    /// Its software type (`default`, `sev-snp`, ...).
    pub software_type: String,
    /// What it should be.
    pub state: RequestedState,
    /// Its parameters, as serialised by the requester.
    pub parameters: Map<String, Value>,
    /// The partition it is on.
    pub partition: String,
    /// Moves whenever the requester changes something, or asks for the
    /// instance to be processed again (a bang).
    pub processing_timestamp: i64,
}

/// A software release the master wants on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SoftwareInstallation {
    /// Its URL.
    pub software_release: String,
    /// `available` or `destroyed`.
    pub state: String,
}

#[derive(Deserialize)]
struct ResultList<T> {
    result_list: Vec<T>,
}

#[derive(Deserialize)]
struct RawSummary {
    instance_guid: String,
    compute_partition_id: String,
    state: String,
    #[serde(default)]
    software_release_uri: Option<String>,
}

#[derive(Deserialize)]
struct RawInstance {
    instance_guid: String,
    #[serde(default)]
    software_release_uri: Option<String>,
    #[serde(default)]
    software_type: Option<String>,
    state: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    compute_partition_id: String,
    #[serde(default)]
    processing_timestamp: i64,
}

#[derive(Deserialize)]
struct RawInstallation {
    software_release_uri: String,
    state: String,
}

/// The master's JSON-RPC API.
#[derive(Debug)]
pub struct Master {
    agent: ureq::Agent,
    url: String,
}

impl Master {
    /// A client of the master at `url` with `config`'s certificates.
    pub fn new(url: &str, config: &MasterConfig) -> Result<Self, MasterError> {
        let mut tls = TlsConfig::builder();
        if let Some(ca_file) = &config.ca_file {
            let authorities = certificates(ca_file)?;
            tls = tls.root_certs(RootCerts::new_with_certs(&authorities));
        }
        if let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) {
            let chain = certificates(cert_file)?;
            tls = tls.client_cert(Some(ClientCert::new_with_certs(
                &chain,
                private_key(key_file)?,
            )));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .user_agent(concat!("hsev-slapos/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Ok(Master {
            agent,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The master's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn call<T: DeserializeOwned>(&self, method: &str, body: &Value) -> Result<T, MasterError> {
        let protocol = |detail: String| MasterError::Protocol {
            method: method.to_owned(),
            detail,
        };
        let response = self
            .agent
            .post(&format!("{}/{method}", self.url))
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .send(body.to_string())
            .map_err(|error| MasterError::Unreachable {
                url: self.url.clone(),
                detail: error.to_string(),
            })?;
        let status = response.status().as_u16();
        let text = response
            .into_body()
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|error| MasterError::Unreachable {
                url: self.url.clone(),
                detail: format!("reading its answer: {error}"),
            })?;
        if !(200..300).contains(&status) {
            // The API's errors are JSON documents with a title.
            let title = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|value| value.get("title")?.as_str().map(str::to_owned))
                .unwrap_or_else(|| text.chars().take(200).collect());
            return Err(MasterError::Refused {
                method: method.to_owned(),
                status,
                title,
            });
        }
        serde_json::from_str(&text).map_err(|error| {
            protocol(format!(
                "{error} in {:?}",
                text.chars().take(200).collect::<String>()
            ))
        })
    }

    fn command(&self, method: &str, body: &Value) -> Result<(), MasterError> {
        self.call::<Value>(method, body).map(drop)
    }

    /// Registers the compute node with these partitions (the master drops
    /// the others).
    pub fn format(&self, computer: &str, partitions: &[String]) -> Result<(), MasterError> {
        let list: Vec<Value> = partitions
            .iter()
            .map(|partition| json!({ "partition_id": partition, "ip_list": [] }))
            .collect();
        self.command(
            "slapos.put.v0.compute_node_format",
            &json!({ "computer_guid": computer, "compute_partition_list": list }),
        )
    }

    /// The software releases the master wants on this node.
    pub fn software_installations(
        &self,
        computer: &str,
    ) -> Result<Vec<SoftwareInstallation>, MasterError> {
        let list: ResultList<RawInstallation> = self.call(
            "slapos.allDocs.v0.compute_node_software_installation_list",
            &json!({ "computer_guid": computer }),
        )?;
        Ok(list
            .result_list
            .into_iter()
            .map(|raw| SoftwareInstallation {
                software_release: raw.software_release_uri,
                state: raw.state,
            })
            .collect())
    }

    /// Reports a software release `available` or `destroyed` on this node.
    pub fn report_software_installation(
        &self,
        computer: &str,
        software_release: &str,
        state: &str,
    ) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.software_installation_reported_state",
            &json!({
                "computer_guid": computer,
                "software_release_uri": software_release,
                "reported_state": state,
            }),
        )
    }

    /// The instances placed on this node's partitions.
    pub fn instances(&self, computer: &str) -> Result<Vec<InstanceSummary>, MasterError> {
        let method = "slapos.allDocs.v0.compute_node_instance_list";
        let list: ResultList<RawSummary> =
            self.call(method, &json!({ "computer_guid": computer }))?;
        list.result_list
            .into_iter()
            .map(|raw| {
                Ok(InstanceSummary {
                    state: requested_state(method, &raw.state)?,
                    instance_guid: raw.instance_guid,
                    partition: raw.compute_partition_id,
                    software_release: raw.software_release_uri.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// One instance, with its parameters.
    pub fn instance(&self, instance_guid: &str) -> Result<Instance, MasterError> {
        let method = "slapos.get.v0.software_instance";
        let raw: RawInstance = self.call(method, &json!({ "instance_guid": instance_guid }))?;
        Ok(Instance {
            state: requested_state(method, &raw.state)?,
            instance_guid: raw.instance_guid,
            software_release: raw.software_release_uri.unwrap_or_default(),
            software_type: raw.software_type.unwrap_or_default(),
            parameters: raw.parameters,
            partition: raw.compute_partition_id,
            processing_timestamp: raw.processing_timestamp,
        })
    }

    /// Publishes an instance's connection parameters (already serialised).
    pub fn publish(
        &self,
        instance_guid: &str,
        parameters: &Map<String, Value>,
    ) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.software_instance_connection_parameter",
            &json!({ "instance_guid": instance_guid, "connection_parameter_dict": parameters }),
        )
    }

    /// Reports an instance `started`, `stopped` or `destroyed`.
    pub fn report_state(
        &self,
        instance_guid: &str,
        state: RequestedState,
    ) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.software_instance_reported_state",
            &json!({ "instance_guid": instance_guid, "reported_state": state.as_str() }),
        )
    }

    /// Reports that an instance cannot be served as requested.
    pub fn report_error(&self, instance_guid: &str, message: &str) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.software_instance_error",
            &json!({ "instance_guid": instance_guid, "message": message }),
        )
    }

    /// Reports that an instance's VM failed (SlapOS's `bang`).
    pub fn bang(&self, instance_guid: &str, message: &str) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.software_instance_bang",
            &json!({ "instance_guid": instance_guid, "message": message }),
        )
    }

    /// Reports a problem of the whole node.
    pub fn bang_node(&self, computer: &str, message: &str) -> Result<(), MasterError> {
        self.command(
            "slapos.put.v0.compute_node_bang",
            &json!({ "computer_guid": computer, "message": message }),
        )
    }
}

fn requested_state(method: &str, text: &str) -> Result<RequestedState, MasterError> {
    RequestedState::parse(text).ok_or_else(|| MasterError::Protocol {
        method: method.to_owned(),
        detail: format!("instance state {text:?} is none of started, stopped, destroyed"),
    })
}

fn pem_items(path: &Path) -> Result<Vec<PemItem<'static>>, MasterError> {
    let bytes = std::fs::read(path)
        .map_err(|error| MasterError::Setup(format!("cannot read {}: {error}", path.display())))?;
    ureq::tls::parse_pem(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| MasterError::Setup(format!("{}: {error}", path.display())))
}

fn certificates(path: &Path) -> Result<Vec<Certificate<'static>>, MasterError> {
    let found: Vec<Certificate<'static>> = pem_items(path)?
        .into_iter()
        .filter_map(|item| match item {
            PemItem::Certificate(certificate) => Some(certificate),
            _ => None,
        })
        .collect();
    if found.is_empty() {
        return Err(MasterError::Setup(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(found)
}

fn private_key(path: &Path) -> Result<PrivateKey<'static>, MasterError> {
    pem_items(path)?
        .into_iter()
        .find_map(|item| match item {
            PemItem::PrivateKey(key) => Some(key),
            _ => None,
        })
        .ok_or_else(|| MasterError::Setup(format!("{} holds no PEM private key", path.display())))
}
