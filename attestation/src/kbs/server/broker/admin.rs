//! The broker's admin commands: reference-value sets and resources, each
//! change recorded in the audit log before it is applied. The API is
//! HyperSEV's own (the README maps it to Trustee's); its refusals use
//! Trustee's error type names.
//!
//! This module must never put resource data or a token in a log line, an
//! audit entry or an error.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use super::{AuditEvent, Broker, BrokerError};
use crate::kbs::protocol::{
    check_name, ReferenceValuesBody, ResourceBody, ResourcePath, ResourceSummary,
};
use crate::kbs::release_policy::ReleasePolicy;
use crate::kbs::server::store::StoreError;
use crate::HexBytes;

/// Largest resource accepted (disk keys are 32 to 64 bytes).
pub const MAX_RESOURCE_BYTES: usize = 64 * 1024;

/// A validated `PUT /admin/v0/resources` body.
struct NewResource {
    data: Zeroizing<Vec<u8>>,
    policy: ReleasePolicy,
    policy_toml: String,
    reference_values: Vec<String>,
}

impl Broker {
    /// The admin token's holder, from an `Authorization` header value.
    pub async fn authorize_admin(
        &self,
        authorization: Option<&str>,
        call: &str,
    ) -> Result<String, BrokerError> {
        let refusal = AuditEvent::new("refusal").field("call", call.to_owned());
        let Some(token) = authorization
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
        else {
            let error = BrokerError::AdminAuth(
                "the admin API needs an Authorization: Bearer <token> header".into(),
            );
            return self.refuse(refusal, error).await;
        };
        let digest = openssl::sha::sha256(token.as_bytes());
        let holder = self
            .admin_tokens
            .iter()
            .find(|known| openssl::memcmp::eq(&known.sha256.0, &digest))
            .map(|known| known.name.clone());
        match holder {
            Some(name) => Ok(name),
            None => {
                let error = BrokerError::AdminAuth("the admin token is not valid".into());
                self.refuse(refusal, error).await
            }
        }
    }

    /// Runs a store write off the async workers.
    fn blocking<T>(work: impl FnOnce() -> T) -> T {
        tokio::task::block_in_place(work)
    }

    /// Records an admin change, then applies it, so that no change is ever
    /// durable without its entry (a crash in between leaves an entry for a
    /// change not made, never the reverse); a change that fails to apply is
    /// followed by a refusal entry.
    async fn admin_change<T>(
        &self,
        admin: &str,
        action: &'static str,
        target: &str,
        apply: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, BrokerError> {
        self.record(
            AuditEvent::new("admin")
                .field("admin", admin.to_owned())
                .field("action", action)
                .field("target", target.to_owned()),
        )
        .await?;
        match Self::blocking(apply) {
            Ok(value) => Ok(value),
            Err(error) => {
                self.admin_refused(admin, action, target, error.into())
                    .await
            }
        }
    }

    async fn admin_refused<T>(
        &self,
        admin: &str,
        action: &'static str,
        target: &str,
        error: BrokerError,
    ) -> Result<T, BrokerError> {
        let event = AuditEvent::new("refusal")
            .field("call", action)
            .field("admin", admin.to_owned())
            .field("target", target.to_owned());
        self.refuse(event, error).await
    }

    /// `PUT /admin/v0/reference-values/<name>`.
    pub async fn put_reference_values(
        &self,
        admin: &str,
        name: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_reference_values";
        let parsed = (|| {
            check_name(name).map_err(|error| BrokerError::NotFound(error.to_string()))?;
            let body: ReferenceValuesBody = serde_json::from_slice(body)
                .map_err(|error| BrokerError::InvalidReferenceValues(format!("body: {error}")))?;
            body.measurements
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    HexBytes::<48>::parse(text)
                        .map(|bytes| bytes.0)
                        .map_err(|error| {
                            BrokerError::InvalidReferenceValues(format!(
                                "measurements[{index}]: {error}"
                            ))
                        })
                })
                .collect::<Result<Vec<[u8; 48]>, BrokerError>>()
        })();
        let measurements = match parsed {
            Ok(measurements) => measurements,
            Err(error) => return self.admin_refused(admin, action, name, error).await,
        };
        self.admin_change(admin, action, name, || {
            self.store.put_reference_values(name, measurements)
        })
        .await
    }

    /// `DELETE /admin/v0/reference-values/<name>`.
    pub async fn delete_reference_values(
        &self,
        admin: &str,
        name: &str,
    ) -> Result<(), BrokerError> {
        let action = "delete_reference_values";
        if let Err(error) = check_name(name) {
            let error = BrokerError::NotFound(error.to_string());
            return self.admin_refused(admin, action, name, error).await;
        }
        if !self.store.has_reference_values(name) {
            let error = BrokerError::NotFound(format!("no reference-value set {name}"));
            return self.admin_refused(admin, action, name, error).await;
        }
        self.admin_change(admin, action, name, || {
            self.store.delete_reference_values(name)
        })
        .await
    }

    fn parse_resource(&self, body: &[u8]) -> Result<NewResource, BrokerError> {
        let body: ResourceBody = serde_json::from_slice(body)
            .map_err(|error| BrokerError::InvalidBody(format!("body: {error}")))?;
        let encoded = Zeroizing::new(body.data);
        let data = Zeroizing::new(STANDARD.decode(encoded.as_bytes()).map_err(|error| {
            BrokerError::InvalidBody(format!("data: not standard base64: {error}"))
        })?);
        if data.is_empty() {
            return Err(BrokerError::InvalidBody("data: empty".into()));
        }
        if data.len() > MAX_RESOURCE_BYTES {
            return Err(BrokerError::InvalidBody(format!(
                "data: {} bytes, at most {MAX_RESOURCE_BYTES}",
                data.len()
            )));
        }
        let policy = ReleasePolicy::from_toml(&body.policy)
            // PolicyError's message starts with "policy" and names the key.
            .map_err(|error| BrokerError::InvalidPolicy(error.to_string()))?;
        if policy.appraisal.report_data.is_some() {
            return Err(BrokerError::InvalidPolicy(
                "policy.report_data: the broker sets it per session (the runtime-data binding); leave it out".into(),
            ));
        }
        for (index, name) in body.reference_values.iter().enumerate() {
            check_name(name).map_err(|error| {
                BrokerError::InvalidReferenceValues(format!("reference_values[{index}]: {error}"))
            })?;
            if body.reference_values[..index].contains(name) {
                return Err(BrokerError::InvalidReferenceValues(format!(
                    "reference_values[{index}]: {name:?} appears twice"
                )));
            }
            if !self.store.has_reference_values(name) {
                return Err(BrokerError::InvalidReferenceValues(format!(
                    "reference_values[{index}]: no reference-value set named {name:?} (put it first)"
                )));
            }
        }
        Ok(NewResource {
            data,
            policy,
            policy_toml: body.policy,
            reference_values: body.reference_values,
        })
    }

    /// `PUT /admin/v0/resources/<path>`.
    pub async fn put_resource(
        &self,
        admin: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_resource";
        let parsed = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::NotFound(error.to_string()))
            .and_then(|resource_path| Ok((resource_path, self.parse_resource(body)?)));
        let (resource_path, resource) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return self.admin_refused(admin, action, path, error).await,
        };
        let NewResource {
            data,
            policy,
            policy_toml,
            reference_values,
        } = resource;
        self.admin_change(admin, action, &resource_path.to_string(), || {
            self.store
                .put_resource(&resource_path, &data, policy, policy_toml, reference_values)
        })
        .await
    }

    /// `DELETE /admin/v0/resources/<path>`.
    pub async fn delete_resource(&self, admin: &str, path: &str) -> Result<(), BrokerError> {
        let action = "delete_resource";
        let resource_path = match path.parse::<ResourcePath>() {
            Ok(resource_path) => resource_path,
            Err(error) => {
                let error = BrokerError::NotFound(error.to_string());
                return self.admin_refused(admin, action, path, error).await;
            }
        };
        if self.store.resource(&resource_path).is_none() {
            let error = BrokerError::NotFound(format!("no resource {resource_path}"));
            return self.admin_refused(admin, action, path, error).await;
        }
        self.admin_change(admin, action, &resource_path.to_string(), || {
            self.store.delete_resource(&resource_path)
        })
        .await
    }

    /// `GET /admin/v0/resources`: paths and policies, never data.
    pub fn list_resources(&self) -> Vec<ResourceSummary> {
        self.store.list()
    }
}
