//! The partition <-> VM mapping, kept in HyperSEV itself: a VM's name is
//! `<prefix>-<partition>-<instance>`, where `<instance>` is the first 8 hex
//! digits of the SHA-256 of the SlapOS instance's id (opaque to us:
//! `title___requester___0` on slapproxy, `SOFTINST-1234` on the master).
//!
//! Why a name and not a label: hsevd refuses a second VM of one owner with
//! the same name in one transaction of its store, so a connector killed
//! in the middle of a creation and started again finds the VM it was
//! making instead of making a second one, two partitions can never name
//! the same VM, and the mapping survives any restart of either process
//! with nothing else to keep in step. The instance part tells an earlier
//! instance's VM (left on a partition the master freed while the
//! connector was away) from the current one's, so the current requester
//! never inherits another's VM or disks.

/// Partition ids the connector registers: `slappart0`, `slappart1`, ...
pub const PARTITION_PREFIX: &str = "slappart";

/// Longest prefix: with `slappart9999` and the instance digits the name
/// stays within hsevd's 63 characters.
const MAX_PREFIX: usize = 40;

/// The partition id of slot `index`.
pub fn partition_id(index: u32) -> String {
    format!("{PARTITION_PREFIX}{index}")
}

/// The slot of a partition id the connector registered.
pub fn partition_index(partition: &str) -> Option<u32> {
    let digits = partition.strip_prefix(PARTITION_PREFIX)?;
    if digits.is_empty() || (digits.len() > 1 && digits.starts_with('0')) {
        return None;
    }
    digits.parse().ok().filter(|index| *index < 10_000)
}

/// Where a VM name says its VM belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSlot {
    /// The partition.
    pub partition: String,
    /// The instance digest part.
    pub instance: String,
}

/// VM names of one connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNames {
    prefix: String,
}

impl VmNames {
    /// Names starting with `prefix`: 1-40 of [a-z0-9-], starting with a
    /// letter, not ending with '-'.
    pub fn new(prefix: &str) -> Result<Self, String> {
        let valid = prefix.len() <= MAX_PREFIX
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && !prefix.ends_with('-')
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if valid {
            Ok(VmNames {
                prefix: prefix.to_owned(),
            })
        } else {
            Err(format!(
                "{prefix:?}: 1-{MAX_PREFIX} of a-z, 0-9 and '-', starting with a letter, not ending with '-'"
            ))
        }
    }

    /// The name of the VM that serves `instance_guid` on `partition`.
    pub fn vm_name(&self, partition: &str, instance_guid: &str) -> String {
        format!(
            "{}-{partition}-{}",
            self.prefix,
            instance_digest(instance_guid)
        )
    }

    /// Where the VM named `name` belongs, if it is one of this connector's.
    pub fn slot(&self, name: &str) -> Option<VmSlot> {
        let rest = name.strip_prefix(&self.prefix)?.strip_prefix('-')?;
        let (partition, instance) = rest.rsplit_once('-')?;
        let is_digest = instance.len() == 8
            && instance
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
        (is_digest && partition_index(partition).is_some()).then(|| VmSlot {
            partition: partition.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// Whether `name` is the VM of `instance_guid` (given its slot).
    pub fn serves(slot: &VmSlot, instance_guid: &str) -> bool {
        slot.instance == instance_digest(instance_guid)
    }
}

/// The first 8 hex digits of the SHA-256 of an instance id.
fn instance_digest(instance_guid: &str) -> String {
    hex::encode(&openssl::sha::sha256(instance_guid.as_bytes())[..4])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_back_to_their_partition_and_instance() {
        let names = VmNames::new("comp-42").expect("valid");
        let name = names.vm_name("slappart3", "vm1______0");
        assert!(name.starts_with("comp-42-slappart3-"), "{name}");
        assert_eq!(name.len(), "comp-42-slappart3-".len() + 8);
        let slot = names.slot(&name).expect("ours");
        assert_eq!(slot.partition, "slappart3");
        assert!(VmNames::serves(&slot, "vm1______0"));
        assert!(!VmNames::serves(&slot, "vm2______0"));
        // Another instance on the same partition gets another name.
        assert_ne!(name, names.vm_name("slappart3", "vm2______0"));
    }

    #[test]
    fn other_names_are_not_ours() {
        let names = VmNames::new("comp-42").expect("valid");
        for name in [
            "web",
            "comp-42",
            "comp-42-slappart3",
            "comp-421-slappart3-0123abcd",
            "comp-42-slappart03-0123abcd",
            "comp-42-other1-0123abcd",
            "comp-42-slappart3-0123ABCD",
            "comp-42-slappart3-0123abc",
        ] {
            assert_eq!(names.slot(name), None, "{name}");
        }
    }

    #[test]
    fn the_longest_name_fits_hsevd() {
        let prefix = "a".repeat(MAX_PREFIX);
        let names = VmNames::new(&prefix).expect("valid");
        assert!(names.vm_name(&partition_id(9999), "x").len() <= 63);
        for bad in ["", "9a", "a-", "A", "a_b", &"a".repeat(MAX_PREFIX + 1)] {
            assert!(VmNames::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn partition_ids_round_trip() {
        assert_eq!(partition_id(0), "slappart0");
        assert_eq!(partition_index("slappart12"), Some(12));
        for bad in [
            "slappart",
            "slappart01",
            "part1",
            "slappart-1",
            "slappart10000",
        ] {
            assert_eq!(partition_index(bad), None, "{bad}");
        }
    }
}
