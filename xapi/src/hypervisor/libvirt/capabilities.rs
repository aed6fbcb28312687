//! What libvirt says a host can run: `virConnectGetDomainCapabilities`
//! (`virsh domcapabilities`) read into [`DomainCapabilities`], and
//! libvirt's packed version numbers. Pure parsing, unit-tested on captured
//! answers.
//!
//! The SEV facts follow Nova's libvirt driver: `<sev supported='yes'>`
//! carries `cbitpos`, `reducedPhysBits`, `maxGuests` and `maxESGuests`;
//! `<launchSecurity>` (libvirt 10.5+) lists the `sectype` values, among
//! them `sev-snp`. SEV-ES has no flag of its own: a host that offers ES
//! guests says so with a non-zero `maxESGuests`.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::super::{DriverError, SevSupport};

/// A libvirt (or QEMU, as libvirt reports it) version: major * 1 000 000 +
/// minor * 1 000 + micro.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LibvirtVersion(pub u32);

impl LibvirtVersion {
    /// `major.minor.micro`.
    pub const fn new(major: u32, minor: u32, micro: u32) -> Self {
        LibvirtVersion(major * 1_000_000 + minor * 1_000 + micro)
    }
}

impl fmt::Display for LibvirtVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.0 / 1_000_000,
            self.0 / 1_000 % 1_000,
            self.0 % 1_000
        )
    }
}

/// The parts of `domcapabilities` the driver uses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainCapabilities {
    /// The emulator libvirt runs (`<path>`).
    pub emulator: String,
    /// `<vcpu max=...>`.
    pub max_vcpus: Option<u32>,
    /// SEV, SEV-ES, SNP as libvirt offers them; `reason` says why (not).
    pub sev: SevSupport,
}

/// Parses a `domcapabilities` document.
pub fn parse(xml: &str) -> Result<DomainCapabilities, DriverError> {
    let document = roxmltree::Document::parse(xml)
        .map_err(|error| DriverError::Probe(format!("libvirt domcapabilities: {error}")))?;
    let root = document.root_element();
    if root.tag_name().name() != "domainCapabilities" {
        return Err(DriverError::Probe(format!(
            "libvirt domcapabilities: the document is <{}>, not <domainCapabilities>",
            root.tag_name().name()
        )));
    }
    let number = |node: Option<roxmltree::Node<'_, '_>>, name: &str| {
        node.and_then(|node| child(node, name))
            .and_then(|node| node.text())
            .and_then(|text| text.trim().parse::<u32>().ok())
    };
    let emulator = child(root, "path")
        .and_then(|node| node.text())
        .unwrap_or_default()
        .trim()
        .to_owned();
    let max_vcpus = child(root, "vcpu")
        .and_then(|node| node.attribute("max"))
        .and_then(|text| text.parse().ok());
    let features = child(root, "features");
    let sev = features.and_then(|features| child(features, "sev"));
    let sev_supported = sev.and_then(|node| node.attribute("supported")) == Some("yes");
    let launch_security = features.and_then(|features| child(features, "launchSecurity"));
    let sectypes: Vec<String> = launch_security
        .filter(|node| node.attribute("supported") == Some("yes"))
        .map(|node| {
            node.descendants()
                .filter(|enumeration| {
                    enumeration.tag_name().name() == "enum"
                        && enumeration.attribute("name") == Some("sectype")
                })
                .flat_map(|enumeration| enumeration.children())
                .filter(|value| value.tag_name().name() == "value")
                .filter_map(|value| value.text().map(|text| text.trim().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let max_guests = number(sev, "maxGuests");
    let max_es_guests = number(sev, "maxESGuests");
    let snp = sectypes.iter().any(|sectype| sectype == "sev-snp");
    // Before <launchSecurity> was listed (libvirt < 10.5), <sev> alone
    // said SEV.
    let plain_sev = sev_supported
        && (launch_security.is_none() || sectypes.iter().any(|sectype| sectype == "sev"));
    let es = plain_sev && max_es_guests.is_some_and(|count| count > 0);
    let reason = if !sev_supported && !snp {
        "libvirt domcapabilities: <sev supported='no'/>".to_owned()
    } else {
        format!(
            "libvirt domcapabilities: SEV {}, SEV-ES {}, SEV-SNP {} (maxGuests {}, maxESGuests {}, \
             launchSecurity sectypes [{}])",
            yes_no(plain_sev),
            yes_no(es),
            yes_no(snp),
            max_guests.map_or_else(|| "-".to_owned(), |count| count.to_string()),
            max_es_guests.map_or_else(|| "-".to_owned(), |count| count.to_string()),
            sectypes.join(", ")
        )
    };
    Ok(DomainCapabilities {
        emulator,
        max_vcpus,
        sev: SevSupport {
            sev: plain_sev,
            sev_es: es,
            sev_snp: snp,
            cbitpos: number(sev, "cbitpos"),
            reduced_phys_bits: number(sev, "reducedPhysBits"),
            max_guests,
            max_es_guests,
            reason,
        },
    })
}

fn child<'a, 'input>(
    node: roxmltree::Node<'a, 'input>,
    name: &str,
) -> Option<roxmltree::Node<'a, 'input>> {
    node.children()
        .find(|child| child.is_element() && child.tag_name().name() == name)
}

fn yes_no(value: bool) -> &'static str {
    if value {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This kind of machine (libvirt 11.3, QEMU 10.0, no SEV), abridged.
    const NO_SEV: &str = "<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>qemu</domain>
  <machine>pc-i440fx-10.0</machine>
  <arch>x86_64</arch>
  <vcpu max='255'/>
  <features>
    <vmcoreinfo supported='yes'/>
    <sev supported='no'/>
    <sgx supported='no'/>
    <launchSecurity supported='no'/>
  </features>
</domainCapabilities>";

    /// An SNP host (the shape libvirt 10.5+ prints on EPYC Genoa).
    const SNP: &str = "<domainCapabilities>
  <path>/usr/bin/qemu-system-x86_64</path>
  <domain>kvm</domain>
  <vcpu max='4096'/>
  <features>
    <sev supported='yes'>
      <cbitpos>51</cbitpos>
      <reducedPhysBits>1</reducedPhysBits>
      <maxGuests>15</maxGuests>
      <maxESGuests>494</maxESGuests>
    </sev>
    <launchSecurity supported='yes'>
      <enum name='sectype'>
        <value>sev</value>
        <value>sev-snp</value>
      </enum>
    </launchSecurity>
  </features>
</domainCapabilities>";

    /// An SEV host on a libvirt before <launchSecurity> was listed.
    const OLD_SEV: &str = "<domainCapabilities><path>/usr/bin/qemu-kvm</path><vcpu max='288'/>
  <features><sev supported='yes'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>
  <maxGuests>509</maxGuests><maxESGuests>0</maxESGuests></sev></features></domainCapabilities>";

    #[test]
    fn libvirt_domcapabilities_without_sev() {
        let capabilities = parse(NO_SEV).expect("parses");
        assert_eq!(capabilities.emulator, "/usr/bin/qemu-system-x86_64");
        assert_eq!(capabilities.max_vcpus, Some(255));
        let sev = &capabilities.sev;
        assert!(!sev.sev && !sev.sev_es && !sev.sev_snp, "{sev:?}");
        assert_eq!(sev.cbitpos, None);
        assert!(
            sev.reason.contains("<sev supported='no'/>"),
            "{}",
            sev.reason
        );
    }

    #[test]
    fn libvirt_domcapabilities_of_an_snp_host() {
        let sev = parse(SNP).expect("parses").sev;
        assert!(sev.sev && sev.sev_es && sev.sev_snp, "{sev:?}");
        assert_eq!(sev.cbitpos, Some(51));
        assert_eq!(sev.reduced_phys_bits, Some(1));
        assert_eq!(sev.max_guests, Some(15));
        assert_eq!(sev.max_es_guests, Some(494));
        assert!(sev.reason.contains("sev-snp"), "{}", sev.reason);
    }

    #[test]
    fn libvirt_domcapabilities_of_an_older_sev_host() {
        let sev = parse(OLD_SEV).expect("parses").sev;
        assert!(sev.sev, "{sev:?}");
        assert!(!sev.sev_es, "maxESGuests 0: no ES guests");
        assert!(!sev.sev_snp, "no launchSecurity sectypes: no SNP");
        assert_eq!(sev.cbitpos, Some(47));
    }

    #[test]
    fn libvirt_domcapabilities_refuses_other_documents() {
        assert!(parse("<capabilities/>").is_err());
        let error = parse("<domainCapabilities>").expect_err("truncated");
        assert!(error.to_string().contains("domcapabilities"), "{error}");
    }

    #[test]
    fn libvirt_versions_read_as_libvirt_prints_them() {
        assert_eq!(LibvirtVersion(11_003_000).to_string(), "11.3.0");
        assert_eq!(LibvirtVersion::new(10, 5, 0), LibvirtVersion(10_005_000));
        assert!(LibvirtVersion::new(9, 10, 0) < LibvirtVersion::new(10, 5, 0));
    }
}
