//! A resource's release policy: an [`AppraisalPolicy`] (every key of it,
//! at the top level) and, optionally, what the guest's attested init-data
//! must say.
//!
//! ```toml
//! allow_simulated = true
//! host_data = "<64 hex digits>"
//!
//! [init_data]                  # release only to a guest that presented
//! [init_data.data]             # init-data bound to its HOST_DATA...
//! "vm.toml" = "name = 'vault'" # ...whose data table holds these entries
//!
//! [single_instance]            # one live launch holds the key at a time:
//! lease_seconds = 30           # it renews this lease, or another may take it
//! ```
//!
//! Unknown keys are refused, in both parts, by name. This module only
//! parses and prints; the broker's verifier applies it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{AppraisalPolicy, PolicyError};

/// The table that holds the init-data requirement.
const INIT_DATA_KEY: &str = "init_data";
/// The table that makes the resource single-instance.
const SINGLE_INSTANCE_KEY: &str = "single_instance";
/// The range of `single_instance.lease_seconds`: long enough for a renewal
/// (a fresh attestation) to come back, short enough that a successor is
/// not kept waiting for an hour.
pub const LEASE_SECONDS_RANGE: std::ops::RangeInclusive<u32> = 2..=3600;

/// What the attested init-data must hold for a release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitDataRequirement {
    /// Entries the init-data's `data` table must hold, each with exactly
    /// this value.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// One live instance at a time: the launch (its report's REPORT_ID, which
/// the firmware picks per launch) that was released the resource holds it
/// for `lease_seconds`, renewed with fresh evidence; until that lease
/// lapses or the tenant ends it, any other launch is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SingleInstance {
    /// How long a release or a renewal holds the resource.
    pub lease_seconds: u32,
}

/// A resource's release policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasePolicy {
    /// What the report must show.
    pub appraisal: AppraisalPolicy,
    /// When set, the guest must have presented init-data (bound to its
    /// HOST_DATA) that satisfies it.
    pub init_data: Option<InitDataRequirement>,
    /// When set, one launch at a time holds the resource.
    pub single_instance: Option<SingleInstance>,
}

impl From<AppraisalPolicy> for ReleasePolicy {
    fn from(appraisal: AppraisalPolicy) -> Self {
        ReleasePolicy {
            appraisal,
            init_data: None,
            single_instance: None,
        }
    }
}

/// Takes the table `key` out of `table` as a `T`; errors name the key.
fn take_table<T: serde::de::DeserializeOwned>(
    table: &mut toml::Table,
    key: &'static str,
) -> Result<Option<T>, PolicyError> {
    table
        .remove(key)
        .map(|value| {
            value.try_into::<T>().map_err(|error| PolicyError::Invalid {
                key,
                problem: error.to_string(),
            })
        })
        .transpose()
}

/// Appends `[key]` holding `value` to `text`.
fn push_table(text: &mut String, key: &str, value: &impl Serialize) {
    let mut wrapper = toml::Table::new();
    if let Ok(value) = toml::Value::try_from(value) {
        wrapper.insert(key.to_owned(), value);
    }
    text.push('\n');
    text.push_str(&toml::to_string(&wrapper).unwrap_or_default());
}

impl ReleasePolicy {
    /// Parses a release policy; errors name the key.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let mut table: toml::Table = toml::from_str(text)?;
        let init_data = take_table::<InitDataRequirement>(&mut table, INIT_DATA_KEY)?;
        let single_instance = take_table::<SingleInstance>(&mut table, SINGLE_INSTANCE_KEY)?;
        if let Some(SingleInstance { lease_seconds }) = single_instance {
            if !LEASE_SECONDS_RANGE.contains(&lease_seconds) {
                return Err(PolicyError::Invalid {
                    key: "single_instance.lease_seconds",
                    problem: format!(
                        "{lease_seconds} is outside {}..={} seconds",
                        LEASE_SECONDS_RANGE.start(),
                        LEASE_SECONDS_RANGE.end()
                    ),
                });
            }
        }
        let appraisal: AppraisalPolicy = toml::Value::Table(table).try_into()?;
        appraisal.validate()?;
        Ok(ReleasePolicy {
            appraisal,
            init_data,
            single_instance,
        })
    }

    /// The policy as TOML ([`ReleasePolicy::from_toml`] reads it back).
    pub fn to_toml(&self) -> String {
        let mut text = self.appraisal.to_toml();
        if let Some(requirement) = &self.init_data {
            push_table(&mut text, INIT_DATA_KEY, requirement);
        }
        if let Some(single_instance) = &self.single_instance {
            push_table(&mut text, SINGLE_INSTANCE_KEY, single_instance);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appraisal_keys_and_init_data_round_trip() {
        let text = "allow_simulated = true\n[init_data.data]\n\"vm.toml\" = \"name = 'vault'\"\n";
        let policy = ReleasePolicy::from_toml(text).expect("parses");
        assert!(policy.appraisal.allow_simulated);
        let requirement = policy.init_data.as_ref().expect("init_data");
        assert_eq!(requirement.data["vm.toml"], "name = 'vault'");
        assert_eq!(
            ReleasePolicy::from_toml(&policy.to_toml()).expect("again"),
            policy
        );
        let plain = ReleasePolicy::from_toml("allow_debug = false").expect("parses");
        assert_eq!(plain.init_data, None);
        // An empty table still requires init-data.
        let bare = ReleasePolicy::from_toml("[init_data]").expect("parses");
        assert_eq!(bare.init_data, Some(InitDataRequirement::default()));
        assert_eq!(
            ReleasePolicy::from_toml(&bare.to_toml()).expect("again"),
            bare
        );
    }

    #[test]
    fn a_single_instance_lease_round_trips_and_its_range_is_checked() {
        let policy = ReleasePolicy::from_toml(
            "allow_simulated = true\n[single_instance]\nlease_seconds = 30\n",
        )
        .expect("parses");
        assert_eq!(
            policy.single_instance,
            Some(SingleInstance { lease_seconds: 30 })
        );
        assert_eq!(
            ReleasePolicy::from_toml(&policy.to_toml()).expect("again"),
            policy
        );
        for bad in [
            "lease_seconds = 1",
            "lease_seconds = 3601",
            "lease = 30",
            "",
        ] {
            let text = format!("[single_instance]\n{bad}\n");
            let error = ReleasePolicy::from_toml(&text).expect_err(&text);
            assert!(
                error.to_string().contains("single_instance"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_named() {
        for (text, word) in [
            ("allow_simulatd = true", "allow_simulatd"),
            ("[init_data]\nrequired = true", "required"),
            ("[init_data.data]\nk = 1", "init_data"),
            ("allowed_vmpls = [7]", "allowed_vmpls"),
        ] {
            let error = ReleasePolicy::from_toml(text).expect_err(text);
            assert!(error.to_string().contains(word), "{word}: {error}");
        }
    }
}
