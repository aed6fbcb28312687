//! What the pool's hosts say, as the connector needs it: how many VM slots
//! the pool has (one SlapOS partition each), and whether a host's reported
//! TCB meets a request's `minimum-tcb`.

use hsev_attestation::policy::MinimumTcb;
use hsev_proto::v1::Host;

/// The smallest VM a request can ask for, MiB (`ram-size`'s minimum).
const SMALLEST_VM_MIB: u64 = 1024;

/// The most partitions the connector registers.
pub const MAX_SLOTS: u32 = 10_000;

/// VM slots of the hosts that are up: per host, as many of the smallest
/// VMs as its memory holds, and on an SEV-SNP host no more than its ASIDs
/// (each confidential guest takes one).
pub fn slots(hosts: &[Host]) -> u32 {
    let total: u64 = hosts
        .iter()
        .filter(|host| host.status == "up")
        .filter_map(|host| host.capabilities.as_ref())
        .map(|capabilities| {
            let by_memory = capabilities.memory_mib / SMALLEST_VM_MIB;
            match capabilities.sev.as_ref() {
                Some(sev) if sev.snp => by_memory.min(sev.asids_total.into()),
                _ => by_memory,
            }
        })
        .sum();
    u32::try_from(total.min(MAX_SLOTS.into())).unwrap_or(MAX_SLOTS)
}

/// Checks a host's reported TCB (`bootloader=10 tee=0 snp=23
/// microcode=25`, with `fmc=` on Turin) against `minimum`; the error
/// names each component below its floor.
pub fn check_tcb(reported: &str, minimum: &MinimumTcb) -> Result<(), String> {
    let level = |name: &str| -> Option<u8> {
        reported.split_whitespace().find_map(|part| {
            let (component, value) = part.split_once('=')?;
            (component == name).then(|| value.parse().ok())?
        })
    };
    let mut below = Vec::new();
    for (name, floor) in [
        ("fmc", minimum.fmc),
        ("bootloader", minimum.bootloader),
        ("tee", minimum.tee),
        ("snp", minimum.snp),
        ("microcode", minimum.microcode),
    ] {
        let Some(floor) = floor else { continue };
        match level(name) {
            Some(found) if found >= floor => {}
            Some(found) => below.push(format!("{name} {found} < {floor}")),
            // Products without an FMC have nothing to compare.
            None if name == "fmc" => {}
            None => below.push(format!("{name} not reported (wanted >= {floor})")),
        }
    }
    if below.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the host reports TCB [{reported}]: {}",
            below.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hsev_proto::v1::{HostCapabilities, SevCapabilities};

    fn host(status: &str, memory_mib: u64, snp: bool, asids: u32) -> Host {
        Host {
            name: "h".into(),
            status: status.into(),
            capabilities: Some(HostCapabilities {
                memory_mib,
                sev: Some(SevCapabilities {
                    snp,
                    asids_total: asids,
                    ..SevCapabilities::default()
                }),
                ..HostCapabilities::default()
            }),
            ..Host::default()
        }
    }

    #[test]
    fn slots_count_memory_and_asids_of_the_hosts_that_are_up() {
        assert_eq!(slots(&[host("up", 256 * 1024, true, 16)]), 16);
        assert_eq!(slots(&[host("up", 8 * 1024, true, 16)]), 8);
        assert_eq!(slots(&[host("up", 8 * 1024, false, 0)]), 8);
        assert_eq!(
            slots(&[
                host("up", 256 * 1024, true, 16),
                host("down", 1 << 20, true, 99)
            ]),
            16
        );
        assert_eq!(slots(&[]), 0);
    }

    #[test]
    fn a_tcb_below_its_floor_is_named() {
        let reported = "bootloader=10 tee=0 snp=23 microcode=25";
        let ok = MinimumTcb {
            snp: Some(23),
            microcode: Some(25),
            fmc: Some(1),
            ..MinimumTcb::default()
        };
        assert_eq!(check_tcb(reported, &ok), Ok(()));
        let high = MinimumTcb {
            snp: Some(24),
            bootloader: Some(11),
            ..MinimumTcb::default()
        };
        let error = check_tcb(reported, &high).expect_err("below");
        assert!(
            error.contains("bootloader 10 < 11") && error.contains("snp 23 < 24"),
            "{error}"
        );
        let error = check_tcb("", &high).expect_err("nothing reported");
        assert!(error.contains("snp not reported"), "{error}");
    }
}
