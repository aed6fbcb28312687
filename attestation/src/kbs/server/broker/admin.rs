//! The broker's admin commands, each scoped by the caller's token: a
//! tenant's token reads and changes the resources, release policies and
//! reference values of its own repository and of no other; a reader's
//! token reads its repository's policies and announcements and changes
//! nothing (a party that checks for the tenant, such as the SlapOS
//! connector); the operator's token may only announce VMs (the id and image it says it runs for a
//! tenant), never set a policy, never read or list a resource. Every call
//! that is refused for its scope answers 403 `AdminAuthAccess`, naming the
//! scope, and is in the audit log, as is every change, before it is
//! applied. The API is HyperSEV's own (the README maps it to Trustee's);
//! its refusals use Trustee's error type names.
//!
//! This module must never put resource data or a token in a log line, an
//! audit entry or an error.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use zeroize::Zeroizing;

use super::{AuditEvent, Broker, BrokerError};
use crate::kbs::protocol::{
    check_name, Announcement, AnnouncementBody, LeaseHolder, ReferenceValuesBody, ResourceBody,
    ResourcePath, ResourceSummary,
};
use crate::kbs::release_policy::ReleasePolicy;
use crate::kbs::server::config::{AdminRole, AdminToken};
use crate::kbs::server::leases::{time_text, Holder};
use crate::kbs::server::store::{Store, StoreError};
use crate::HexBytes;

/// Largest resource accepted (disk keys are 32 to 64 bytes).
pub const MAX_RESOURCE_BYTES: usize = 64 * 1024;

/// What an accepted admin token may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A tenant's own repository.
    Tenant {
        /// The repository.
        repository: String,
    },
    /// A tenant's repository, read only: its policies and announcements.
    Reader {
        /// The repository.
        repository: String,
    },
    /// The operator: announcements only.
    Operator,
}

/// The holder of an accepted admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    /// The token's name.
    pub name: String,
    /// What it may touch.
    pub scope: Scope,
}

impl Admin {
    /// The holder of a configured token; none for a tenant or reader
    /// token without a repository (which the configuration's validation refuses).
    pub fn of_token(token: &AdminToken) -> Option<Admin> {
        let scope = match (token.role, &token.repository) {
            (AdminRole::Tenant, Some(repository)) => Scope::Tenant {
                repository: repository.clone(),
            },
            (AdminRole::Reader, Some(repository)) => Scope::Reader {
                repository: repository.clone(),
            },
            (AdminRole::Operator, _) => Scope::Operator,
            (AdminRole::Tenant | AdminRole::Reader, None) => return None,
        };
        Some(Admin {
            name: token.name.clone(),
            scope,
        })
    }

    fn role(&self) -> &'static str {
        match self.scope {
            Scope::Tenant { .. } => "tenant",
            Scope::Reader { .. } => "reader",
            Scope::Operator => "operator",
        }
    }

    /// An audit event of kind `event` naming this caller.
    fn event(&self, event: &'static str, action: &'static str, target: &str) -> AuditEvent {
        let event = AuditEvent::new(event)
            .field("admin", self.name.clone())
            .field("role", self.role())
            .field(if event == "admin" { "action" } else { "call" }, action)
            .field("target", target.to_owned());
        match &self.scope {
            Scope::Tenant { repository } | Scope::Reader { repository } => {
                event.field("repository", repository.clone())
            }
            Scope::Operator => event,
        }
    }

    /// Whether this caller may read and change `repository`'s resources
    /// and policies: its tenant only.
    fn manage(&self, repository: &str, action: &str) -> Result<(), BrokerError> {
        match &self.scope {
            Scope::Tenant { repository: own } if own == repository => Ok(()),
            Scope::Tenant { repository: own } => Err(BrokerError::Forbidden(format!(
                "{action}: the token of {} is scoped to repository {own:?}, not {repository:?}",
                self.name
            ))),
            Scope::Reader { .. } => Err(BrokerError::Forbidden(format!(
                "{action}: the token of {} has the reader role, which reads its repository's \
                 policies and changes nothing",
                self.name
            ))),
            Scope::Operator => Err(BrokerError::Forbidden(format!(
                "{action}: the token of {} has the operator role, which may only announce VMs: \
                 it never reads a resource or sets a release policy (the tenant's token does)",
                self.name
            ))),
        }
    }

    /// The repository this caller may list, or none for the operator.
    fn listing(&self, action: &str) -> Result<&str, BrokerError> {
        match &self.scope {
            Scope::Tenant { repository } | Scope::Reader { repository } => Ok(repository),
            Scope::Operator => Err(BrokerError::Forbidden(format!(
                "{action}: the token of {} has the operator role, which may only announce VMs",
                self.name
            ))),
        }
    }
}

/// A validated `PUT /admin/v0/resources` body.
struct NewResource {
    data: Option<Zeroizing<Vec<u8>>>,
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
    ) -> Result<Admin, BrokerError> {
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
            .find(|(known, _)| openssl::memcmp::eq(known, &digest));
        match holder {
            Some((_, admin)) => Ok(admin.clone()),
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
        admin: &Admin,
        action: &'static str,
        target: &str,
        apply: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, BrokerError> {
        self.admin_change_recorded(
            admin,
            action,
            target,
            admin.event("admin", action, target),
            apply,
        )
        .await
    }

    /// [`Broker::admin_change`] recording `event`.
    async fn admin_change_recorded<T>(
        &self,
        admin: &Admin,
        action: &'static str,
        target: &str,
        event: AuditEvent,
        apply: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, BrokerError> {
        self.record(event).await?;
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
        admin: &Admin,
        action: &'static str,
        target: &str,
        error: BrokerError,
    ) -> Result<T, BrokerError> {
        self.refuse(admin.event("refusal", action, target), error)
            .await
    }

    /// `<repository>/<name>` of a reference-value route, checked.
    fn set_route(route: &str) -> Result<(&str, &str), BrokerError> {
        let (repository, name) = route.split_once('/').ok_or_else(|| {
            BrokerError::NotFound(format!(
                "reference values {route:?}: expected <repository>/<name>"
            ))
        })?;
        for segment in [repository, name] {
            check_name(segment).map_err(|error| BrokerError::NotFound(error.to_string()))?;
        }
        Ok((repository, name))
    }

    /// `PUT /admin/v0/reference-values/<repository>/<name>`.
    pub async fn put_reference_values(
        &self,
        admin: &Admin,
        route: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_reference_values";
        let parsed = (|| {
            let (repository, name) = Self::set_route(route)?;
            admin.manage(repository, action)?;
            let body: ReferenceValuesBody = serde_json::from_slice(body)
                .map_err(|error| BrokerError::InvalidReferenceValues(format!("body: {error}")))?;
            let measurements = body
                .measurements
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
                .collect::<Result<Vec<[u8; 48]>, BrokerError>>()?;
            Ok((repository, name, measurements))
        })();
        let (repository, name, measurements) = match parsed {
            Ok(parsed) => parsed,
            Err(error) => return self.admin_refused(admin, action, route, error).await,
        };
        self.admin_change(admin, action, route, || {
            self.store
                .put_reference_values(repository, name, measurements)
        })
        .await
    }

    /// `DELETE /admin/v0/reference-values/<repository>/<name>`.
    pub async fn delete_reference_values(
        &self,
        admin: &Admin,
        route: &str,
    ) -> Result<(), BrokerError> {
        let action = "delete_reference_values";
        let checked = Self::set_route(route).and_then(|(repository, name)| {
            admin.manage(repository, action)?;
            if self.store.has_reference_values(repository, name) {
                Ok((repository, name))
            } else {
                Err(BrokerError::NotFound(format!(
                    "no reference-value set {route}"
                )))
            }
        });
        let (repository, name) = match checked {
            Ok(found) => found,
            Err(error) => return self.admin_refused(admin, action, route, error).await,
        };
        self.admin_change(admin, action, route, || {
            self.store.delete_reference_values(repository, name)
        })
        .await
    }

    fn parse_resource(
        store: &Store,
        repository: &str,
        body: &[u8],
    ) -> Result<NewResource, BrokerError> {
        let body: ResourceBody = serde_json::from_slice(body)
            .map_err(|error| BrokerError::InvalidBody(format!("body: {error}")))?;
        let data = body
            .data
            .map(|encoded| {
                let encoded = Zeroizing::new(encoded);
                let data =
                    Zeroizing::new(STANDARD.decode(encoded.as_bytes()).map_err(|error| {
                        BrokerError::InvalidBody(format!("data: not standard base64: {error}"))
                    })?);
                if data.is_empty() {
                    return Err(BrokerError::InvalidBody(
                        "data: empty (leave it out for a secret the broker generates)".into(),
                    ));
                }
                if data.len() > MAX_RESOURCE_BYTES {
                    return Err(BrokerError::InvalidBody(format!(
                        "data: {} bytes, at most {MAX_RESOURCE_BYTES}",
                        data.len()
                    )));
                }
                Ok(data)
            })
            .transpose()?;
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
            if !store.has_reference_values(repository, name) {
                return Err(BrokerError::InvalidReferenceValues(format!(
                    "reference_values[{index}]: repository {repository:?} has no reference-value set named {name:?} (put it first)"
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

    /// `PUT /admin/v0/resources/<path>`: the resource's release policy and
    /// reference-value sets, and its secret if given (else the one it has,
    /// or one the broker generates at its first release).
    pub async fn put_resource(
        &self,
        admin: &Admin,
        path: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "put_resource";
        let parsed = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::NotFound(error.to_string()))
            .and_then(|resource_path| {
                admin.manage(&resource_path.repository, action)?;
                let resource = Self::parse_resource(&self.store, &resource_path.repository, body)?;
                Ok((resource_path, resource))
            });
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
        let target = resource_path.to_string();
        let event = admin.event("admin", action, &target).field(
            "data",
            if data.is_some() {
                "given"
            } else {
                "kept, or generated at the first release"
            },
        );
        self.admin_change_recorded(admin, action, &target, event, || {
            self.store.put_resource(
                &resource_path,
                data.as_ref().map(|data| data.as_slice()),
                policy,
                policy_toml,
                reference_values,
            )
        })
        .await
    }

    /// `DELETE /admin/v0/resources/<path>`.
    pub async fn delete_resource(&self, admin: &Admin, path: &str) -> Result<(), BrokerError> {
        let action = "delete_resource";
        let checked = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::NotFound(error.to_string()))
            .and_then(|resource_path| {
                admin.manage(&resource_path.repository, action)?;
                match self.store.resource(&resource_path) {
                    Some(_) => Ok(resource_path),
                    None => Err(BrokerError::NotFound(format!(
                        "no resource {resource_path}"
                    ))),
                }
            });
        let resource_path = match checked {
            Ok(resource_path) => resource_path,
            Err(error) => return self.admin_refused(admin, action, path, error).await,
        };
        let target = resource_path.to_string();
        self.admin_change(admin, action, &target, || {
            self.store.delete_resource(&resource_path)?;
            self.leases.forget(&target)
        })
        .await
    }

    /// `GET /admin/v0/leases/<path>`: which launch holds a single-instance
    /// resource of the caller's repository (tenant or reader).
    pub async fn lease(&self, admin: &Admin, path: &str) -> Result<LeaseHolder, BrokerError> {
        let action = "show_lease";
        let found = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::NotFound(error.to_string()))
            .and_then(|resource_path| {
                let repository = admin.listing(action)?;
                if repository != resource_path.repository {
                    return Err(BrokerError::Forbidden(format!(
                        "{action}: the token of {} is scoped to repository {repository:?}, not {:?}",
                        admin.name, resource_path.repository
                    )));
                }
                let target = resource_path.to_string();
                self.leases.holder(&target).ok_or_else(|| {
                    BrokerError::NotFound(format!("no launch holds {target}"))
                })
            });
        match found {
            Ok(holder) => Ok(lease_holder(path, &holder)),
            Err(error) => self.admin_refused(admin, action, path, error).await,
        }
    }

    /// `DELETE /admin/v0/leases/<path>`: the tenant ends the lease on its
    /// resource; its holder is retired (refused from now on) and the next
    /// launch that passes the policy takes the resource. Answers the holder
    /// it ended.
    pub async fn end_lease(&self, admin: &Admin, path: &str) -> Result<LeaseHolder, BrokerError> {
        let action = "end_lease";
        let checked = path
            .parse::<ResourcePath>()
            .map_err(|error| BrokerError::NotFound(error.to_string()))
            .and_then(|resource_path| {
                admin.manage(&resource_path.repository, action)?;
                let target = resource_path.to_string();
                match self.leases.holder(&target) {
                    Some(_) => Ok(target),
                    None => Err(BrokerError::NotFound(format!("no launch holds {target}"))),
                }
            });
        let target = match checked {
            Ok(target) => target,
            Err(error) => return self.admin_refused(admin, action, path, error).await,
        };
        let now = time::OffsetDateTime::now_utc();
        let ended = self
            .admin_change(admin, action, &target, || self.leases.end(&target, now))
            .await?;
        match ended {
            Some(holder) => Ok(lease_holder(&target, &holder)),
            None => Err(BrokerError::NotFound(format!("no launch holds {target}"))),
        }
    }

    /// `GET /admin/v0/resources`: the caller's repository's paths and
    /// policies, never data.
    pub async fn list_resources(&self, admin: &Admin) -> Result<Vec<ResourceSummary>, BrokerError> {
        let action = "list_resources";
        match admin.listing(action) {
            Ok(repository) => Ok(self.store.list(Some(repository))),
            Err(error) => self.admin_refused(admin, action, "", error).await,
        }
    }

    /// `PUT /admin/v0/announcements/<repository>/<vm>`: the operator (or
    /// the tenant) says which image a VM of the repository boots, and the
    /// measurement it expects. It changes no release.
    pub async fn announce(
        &self,
        admin: &Admin,
        route: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let action = "announce";
        let parsed = (|| {
            let (repository, vm) = route.split_once('/').ok_or_else(|| {
                BrokerError::NotFound(format!(
                    "announcement {route:?}: expected <repository>/<vm id>"
                ))
            })?;
            for segment in [repository, vm] {
                check_name(segment).map_err(|error| BrokerError::NotFound(error.to_string()))?;
            }
            if let Scope::Tenant { .. } | Scope::Reader { .. } = admin.scope {
                admin.manage(repository, action)?;
            }
            let body: AnnouncementBody = serde_json::from_slice(body)
                .map_err(|error| BrokerError::InvalidBody(format!("body: {error}")))?;
            HexBytes::<32>::parse(&body.image)
                .map_err(|error| BrokerError::InvalidBody(format!("image: {error}")))?;
            if let Some(measurement) = &body.expected_measurement {
                HexBytes::<48>::parse(measurement).map_err(|error| {
                    BrokerError::InvalidBody(format!("expected_measurement: {error}"))
                })?;
            }
            Ok(Announcement {
                repository: repository.to_owned(),
                vm: vm.to_owned(),
                image: body.image.to_ascii_lowercase(),
                expected_measurement: body
                    .expected_measurement
                    .map(|text| text.to_ascii_lowercase()),
                announced_by: admin.name.clone(),
                updated: Store::now(),
            })
        })();
        let announcement = match parsed {
            Ok(announcement) => announcement,
            Err(error) => return self.admin_refused(admin, action, route, error).await,
        };
        let mut event = admin
            .event("admin", action, route)
            .field("image", announcement.image.clone());
        if let Some(measurement) = &announcement.expected_measurement {
            event = event.field("expected_measurement", measurement.clone());
        }
        self.admin_change_recorded(admin, action, route, event, || {
            self.store.put_announcement(&announcement)
        })
        .await
    }

    /// `GET /admin/v0/announcements`: a tenant's repository's, or every
    /// one for the operator.
    pub async fn announcements(&self, admin: &Admin) -> Result<Vec<Announcement>, BrokerError> {
        let repository = match &admin.scope {
            Scope::Tenant { repository } | Scope::Reader { repository } => {
                Some(repository.as_str())
            }
            Scope::Operator => None,
        };
        Ok(Self::blocking(|| self.store.announcements(repository))?)
    }
}

/// The admin API's view of a lease.
fn lease_holder(path: &str, holder: &Holder) -> LeaseHolder {
    LeaseHolder {
        resource: path.to_owned(),
        report_id: holder.report_id.clone(),
        chip_id: holder.chip_id.clone(),
        measurement: holder.measurement.clone(),
        since: time_text(holder.since),
        expires_at: time_text(holder.expires),
        live: holder.expires > time::OffsetDateTime::now_utc(),
    }
}
