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
//! ```
//!
//! Unknown keys are refused, in both parts, by name. This module only
//! parses and prints; the broker's verifier applies it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::{AppraisalPolicy, PolicyError};

/// The table that holds the init-data requirement.
const INIT_DATA_KEY: &str = "init_data";

/// What the attested init-data must hold for a release.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitDataRequirement {
    /// Entries the init-data's `data` table must hold, each with exactly
    /// this value.
    #[serde(default)]
    pub data: BTreeMap<String, String>,
}

/// A resource's release policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasePolicy {
    /// What the report must show.
    pub appraisal: AppraisalPolicy,
    /// When set, the guest must have presented init-data (bound to its
    /// HOST_DATA) that satisfies it.
    pub init_data: Option<InitDataRequirement>,
}

impl From<AppraisalPolicy> for ReleasePolicy {
    fn from(appraisal: AppraisalPolicy) -> Self {
        ReleasePolicy {
            appraisal,
            init_data: None,
        }
    }
}

impl ReleasePolicy {
    /// Parses a release policy; errors name the key.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        let mut table: toml::Table = toml::from_str(text)?;
        let init_data = table
            .remove(INIT_DATA_KEY)
            .map(|value| {
                value
                    .try_into::<InitDataRequirement>()
                    .map_err(|error| PolicyError::Invalid {
                        key: INIT_DATA_KEY,
                        problem: error.to_string(),
                    })
            })
            .transpose()?;
        let appraisal: AppraisalPolicy = toml::Value::Table(table).try_into()?;
        appraisal.validate()?;
        Ok(ReleasePolicy {
            appraisal,
            init_data,
        })
    }

    /// The policy as TOML ([`ReleasePolicy::from_toml`] reads it back).
    pub fn to_toml(&self) -> String {
        let mut text = self.appraisal.to_toml();
        if let Some(requirement) = &self.init_data {
            let mut wrapper = toml::Table::new();
            if let Ok(value) = toml::Value::try_from(requirement) {
                wrapper.insert(INIT_DATA_KEY.to_owned(), value);
            }
            text.push('\n');
            text.push_str(&toml::to_string(&wrapper).unwrap_or_default());
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
