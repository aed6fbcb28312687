//! The pool's membership, as the coordinator keeps it: single-use join
//! tokens, joins (a host's certificate issued from its request), heartbeats
//! and whether each host is heard from, what hosts report, ejection (with
//! its certificate revoked), and hosts' states (up, disabled, maintenance).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{lock, Coordinator};
use crate::daemon::error::{Kind, OpError};
use crate::daemon::host::HostCapabilities;
use crate::model::{HostRecord, VmId};
use crate::pool::pki::{fingerprint, Identity, PoolCa};
use crate::pool::remote_host::RemoteHost;
use crate::pool::tls::Peer;
use crate::pool::wire::PoolReport;
use crate::pool::{HostClient, PoolSink};
use crate::store::{StoreError, TokenRefusal, VmFilter};

/// The prefix of every join token.
const TOKEN_PREFIX: &str = "hsev-join-";

/// What a coordinator with a pool listener holds to let hosts in.
#[derive(Debug)]
pub struct PoolAuthority {
    /// Where hosts reach it (`host:port`), as tokens carry it.
    pub address: String,
    /// The pool's CA.
    pub ca: PoolCa,
    /// The coordinator's own certificate, for its calls to hosts.
    pub identity: Identity,
    /// The runtime remote calls run on.
    pub runtime: tokio::runtime::Handle,
    /// How long a host may be silent, and what fencing waits.
    pub fence: super::ha::FenceTiming,
}

/// What a join token holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct JoinTokenContents {
    /// The coordinator's pool address.
    pub address: String,
    /// The single-use secret, base64.
    pub secret: String,
    /// The pool CA's fingerprint.
    pub ca: String,
}

impl JoinTokenContents {
    /// Reads a token as `hsev pool join-token create` printed it.
    pub fn parse(token: &str) -> Result<Self, String> {
        let body = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            format!("a join token starts with {TOKEN_PREFIX} (`hsev pool join-token create`)")
        })?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| "the join token is damaged (not base64url)".to_owned())?;
        serde_json::from_slice(&json).map_err(|_| "the join token is damaged".to_owned())
    }

    fn encode(&self) -> Result<String, OpError> {
        let json =
            serde_json::to_vec(self).map_err(|error| OpError::internal(error.to_string()))?;
        Ok(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(json)))
    }
}

/// A token made for a new host.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The token.
    pub token: String,
    /// Until when it may be used.
    pub expires_at: OffsetDateTime,
    /// The pool CA's fingerprint.
    pub ca_fingerprint: String,
}

/// What a joined host gets back.
#[derive(Debug, Clone)]
pub struct Joined {
    /// Its certificate.
    pub cert_pem: String,
    /// The pool's CA.
    pub ca_pem: String,
    /// The pool's name.
    pub pool: String,
}

fn secret_digest(secret: &[u8]) -> String {
    hex::encode(openssl::sha::sha256(secret))
}

impl Coordinator {
    /// Lets hosts join through this coordinator's pool listener.
    pub fn set_authority(&self, authority: PoolAuthority) {
        let _ = self.authority.set(authority);
    }

    /// Where hosts reach this coordinator, when it has a pool listener.
    pub fn pool_address(&self) -> Option<String> {
        self.authority
            .get()
            .map(|authority| authority.address.clone())
    }

    pub(super) fn authority(&self) -> Result<&PoolAuthority, OpError> {
        self.authority.get().ok_or_else(|| {
            OpError::precondition(
                "this coordinator has no pool listener ([pool] listen in hsevd.toml): no host \
                 can join it",
            )
        })
    }

    /// A single-use token valid for `ttl`.
    pub fn create_join_token(&self, admin: &str, ttl: Duration) -> Result<IssuedToken, OpError> {
        let authority = self.authority()?;
        let mut secret = [0u8; 32];
        openssl::rand::rand_bytes(&mut secret)
            .map_err(|error| OpError::internal(format!("no random secret: {error}")))?;
        let expires_at = OffsetDateTime::now_utc()
            + time::Duration::try_from(ttl).map_err(|_| OpError::invalid("ttl out of range"))?;
        self.store
            .insert_join_token(&secret_digest(&secret), admin, expires_at)?;
        let ca_fingerprint = authority
            .ca
            .fingerprint()
            .map_err(|error| OpError::internal(error.to_string()))?;
        let token = JoinTokenContents {
            address: authority.address.clone(),
            secret: STANDARD.encode(secret),
            ca: ca_fingerprint.clone(),
        }
        .encode()?;
        Ok(IssuedToken {
            token,
            expires_at,
            ca_fingerprint,
        })
    }

    /// A host joins with a token's secret: its certificate is issued from
    /// its request, and the host and the token's use are recorded as one.
    pub fn join(
        &self,
        secret: &[u8],
        name: &str,
        csr_pem: &str,
        address: &str,
    ) -> Result<Joined, OpError> {
        let authority = self.authority()?;
        if !valid_host_name(name) {
            return Err(OpError::invalid(format!(
                "host name {name:?}: 1-63 of a-z, 0-9, '-' and '.'"
            )));
        }
        let ip: std::net::SocketAddr = address.parse().map_err(|_| {
            OpError::invalid(format!(
                "address {address:?}: the host's IP:port for its agent"
            ))
        })?;
        let cert_pem = authority
            .ca
            .issue_host(csr_pem, name, Some(ip.ip()))
            .map_err(|error| OpError::invalid(error.to_string()))?;
        let record = HostRecord {
            name: name.to_owned(),
            status: "up".to_owned(),
            capabilities_json: "{}".to_owned(),
            probed_at: OffsetDateTime::now_utc(),
            address: address.to_owned(),
            cert_fingerprint: fingerprint(&cert_pem)
                .map_err(|error| OpError::internal(error.to_string()))?,
        };
        let refusal =
            match self
                .store
                .join_host(&secret_digest(secret), &record, OffsetDateTime::now_utc())
            {
                Ok(Ok(())) => None,
                Ok(Err(refusal)) => Some(refusal),
                Err(StoreError::Conflict { .. }) => {
                    return Err(OpError::new(
                        Kind::AlreadyExists,
                        format!("a host named {name} is already in the pool: nothing was recorded"),
                    ))
                }
                Err(error) => return Err(error.into()),
            };
        if let Some(refusal) = refusal {
            return Err(OpError::new(
                Kind::PermissionDenied,
                match refusal {
                    TokenRefusal::Unknown => {
                        "the join token is not one this pool issued: nothing was recorded"
                            .to_owned()
                    }
                    TokenRefusal::Expired(at) => format!(
                        "the join token expired at {at}: nothing was recorded (`hsev pool \
                         join-token create` makes another)"
                    ),
                    TokenRefusal::Used(by) => format!(
                        "the join token was already used (by host {by}): tokens are single-use, \
                         nothing was recorded"
                    ),
                },
            ));
        }
        let client = RemoteHost::new(
            name,
            address,
            &authority.identity,
            authority.ca.cert_pem(),
            authority.runtime.clone(),
        )?;
        self.register(name, Arc::new(client));
        self.remember_host(&record);
        self.event_pool(&format!("host {name} joined from {address}"));
        tracing::info!(host = name, address, "a host joined the pool");
        Ok(Joined {
            cert_pem,
            ca_pem: authority.ca.cert_pem().to_owned(),
            pool: self.store.pool_name()?,
        })
    }

    pub(super) fn event_pool(&self, detail: &str) {
        if let Err(error) = self.store.append_event(None, "pool", detail) {
            tracing::warn!(%error, "cannot record a pool event");
        }
    }

    /// Adds a host's client to the registry (not yet attached).
    fn register(&self, name: &str, client: Arc<dyn HostClient>) {
        self.hosts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), client);
    }

    /// Clients for every remote host the store knows, reached with this
    /// coordinator's identity; each is attached on its first heartbeat.
    pub fn register_remote_hosts(&self) -> Result<(), OpError> {
        let authority = self.authority()?;
        for record in self.store.list_hosts()? {
            if record.address.is_empty() || self.hosts().contains_key(&record.name) {
                continue;
            }
            let client = RemoteHost::new(
                &record.name,
                &record.address,
                &authority.identity,
                authority.ca.cert_pem(),
                authority.runtime.clone(),
            )?;
            self.register(&record.name, Arc::new(client));
        }
        Ok(())
    }

    /// Whether a peer may read the pool's images: a member's certificate.
    pub fn member_may_read(&self, peer: &Peer) -> Result<(), OpError> {
        self.member(peer).map(|_| ())
    }

    /// The host a peer's certificate belongs to, if it is a member.
    fn member(&self, peer: &Peer) -> Result<HostRecord, OpError> {
        let refused = || {
            OpError::new(
                Kind::PermissionDenied,
                format!("{} is not a member of this pool", peer.name),
            )
        };
        let record = self.store.get_host(&peer.name).map_err(|_| refused())?;
        if record.cert_fingerprint != peer.fingerprint {
            return Err(refused());
        }
        Ok(record)
    }

    /// A host's heartbeat: it is heard from; the first one after it (or
    /// the coordinator) started attaches it (its VMs reconciled). Answers
    /// the revoked certificates.
    ///
    /// Refused while this coordinator does not lead (a pool on etcd): an
    /// answered heartbeat keeps the host from fencing its HA VMs, so only
    /// the leader, which alone may declare the host failed, may answer
    /// one. A leader answers only before its own writing deadline, which
    /// passes before the next leader can be elected; and the next leader
    /// counts the host as last heard from at its own start, later still
    /// (the timing argument in `coordinator::ha` holds across leaders).
    pub fn beat(
        &self,
        peer: &Peer,
        capabilities: &HostCapabilities,
        running: &[VmId],
    ) -> Result<Vec<String>, OpError> {
        if self.store.as_etcd().is_some_and(|etcd| !etcd.leads_now()) {
            return Err(OpError::unavailable(
                "this coordinator does not lead the pool now: send heartbeats to the leader",
            ));
        }
        let record = self.member(peer)?;
        let first = lock(&self.liveness)
            .insert(record.name.clone(), Instant::now())
            .is_none();
        let known: Option<HostCapabilities> = serde_json::from_str(&record.capabilities_json).ok();
        if known.as_ref() != Some(capabilities) {
            self.record_host(&record.name, &record.status, capabilities)?;
        }
        if first {
            tracing::info!(host = %record.name, vms = running.len(), "host heard from");
            let client = self.host(&record.name)?;
            self.reconcile(&record.name, client.recover()?)?;
            if record.status == super::ha::FAILED {
                self.store.set_host_status(&record.name, "up")?;
                self.refresh_host(&record.name);
                self.event_pool(&format!(
                    "host {} is back after it failed, reconciled",
                    record.name
                ));
            } else {
                self.event_pool(&format!("host {} is up", record.name));
            }
        }
        Ok(self.store.revoked_certificates()?)
    }

    /// What a host reports on its own, about its own VMs only.
    pub fn report(&self, peer: &Peer, report: PoolReport) -> Result<(), OpError> {
        let host = self.member(peer)?;
        let vm = match &report {
            PoolReport::Exited { vm, .. }
            | PoolReport::Attestation { vm, .. }
            | PoolReport::Event { vm, .. } => vm.clone(),
        };
        let record = self.store.get_vm(&vm.0, None)?;
        if record.host != host.name {
            return Err(OpError::new(
                Kind::PermissionDenied,
                format!("VM {vm} is not on host {}", host.name),
            ));
        }
        match report {
            PoolReport::Exited { vm, clean, reason } => self.vm_exited(&vm, clean, &reason),
            PoolReport::Attestation { vm, attestation } => self.attestation(&vm, &attestation),
            PoolReport::Event { vm, kind, detail } => self.event(&vm, &kind, &detail),
        }
        Ok(())
    }

    /// How long a host may go unheard before it is down.
    pub(super) fn down_after(&self) -> Duration {
        self.authority
            .get()
            .map_or(Duration::from_secs(5), |authority| authority.fence.lease)
    }

    /// Why `host` is down, or `None` while it is heard from (the
    /// coordinator's own host always is).
    pub fn down_reason(&self, host: &str) -> Option<String> {
        let remote = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(host)
            .is_some_and(|known| known.remote);
        if !self.hosts().contains_key(host) {
            return Some(format!(
                "host {host} is down: this coordinator has no connection to it"
            ));
        }
        if !remote {
            return None;
        }
        let down_after = self.down_after();
        match lock(&self.liveness).get(host) {
            Some(last) if last.elapsed() <= down_after => None,
            Some(last) => Some(format!(
                "host {host} is down: not heard from for {:.0} s",
                last.elapsed().as_secs_f64()
            )),
            None => Some(format!(
                "host {host} is down: not heard from since the coordinator started"
            )),
        }
    }

    /// Removes a host from the pool and revokes its certificate; refused
    /// while VMs are placed on it, naming them.
    pub fn eject(&self, name: &str) -> Result<HostRecord, OpError> {
        let record = self.store.get_host(name)?;
        if record.address.is_empty() {
            return Err(OpError::precondition(format!(
                "host {name} runs the coordinator: it cannot be ejected"
            )));
        }
        let vms = self.store.list_vms(VmFilter {
            owner: None,
            state: None,
            host: Some(name),
        })?;
        if !vms.is_empty() {
            let names: Vec<String> = vms
                .iter()
                .map(|vm| format!("{}/{} ({})", vm.owner, vm.spec.name, vm.id))
                .collect();
            return Err(OpError::precondition(format!(
                "host {name} holds {} VMs: {}; migrate or delete them first (`hsev host \
                 maintenance enter {name}` moves them)",
                vms.len(),
                names.join(", ")
            )));
        }
        self.store
            .revoke_certificate(&record.cert_fingerprint, name)?;
        self.store.delete_host(name)?;
        self.refresh_host(name);
        self.hosts
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name);
        lock(&self.liveness).remove(name);
        self.event_pool(&format!("host {name} ejected, its certificate revoked"));
        Ok(record)
    }

    /// Sets a host's state: `up`, `disabled` or `maintenance` (placement
    /// sends it nothing new but in `up`).
    pub fn set_host_status(&self, name: &str, status: &str) -> Result<(), OpError> {
        if !matches!(status, "up" | "disabled" | "maintenance") {
            return Err(OpError::invalid(format!(
                "host state {status:?}: up, disabled or maintenance"
            )));
        }
        self.store.set_host_status(name, status)?;
        self.refresh_host(name);
        self.event_pool(&format!("host {name} is {status}"));
        Ok(())
    }
}

/// A host name: 1-63 of `a-z`, `0-9`, `-` and `.`.
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|byte| {
            byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.'
        })
}
