//! The domain XML: a pure function of a [`LaunchSpec`], the domain's name
//! and what the probe found ([`DomainHost`]), unit-tested here and checked
//! against libvirt's own schema (`virt-xml-validate`) by the tests.
//!
//! The machine mirrors the QEMU driver's (q35, ACPI power button, pvpanic,
//! no default devices), in libvirt's vocabulary:
//! - the serial console is a `<serial type='file'>` appending to the VM's
//!   `console.log`, so reboots and restarts add to one log;
//! - the simulated Secure Processor's channel and the guest agent's status
//!   port are `<channel type='unix'>` virtio-serial ports bound to sockets
//!   in the run dir;
//! - SEV, SEV-ES and SNP are `<launchSecurity>` with the policy, the host's
//!   C-bit position and reduced physical bits, `kernelHashes` and (SNP)
//!   `hostData`, each refused with what is missing where this libvirt has
//!   no such element;
//! - `on_poweroff`/`on_crash` destroy the domain: libvirt's lifecycle event
//!   says why it ended, and a transient domain leaves nothing behind.
//!
//! Two things libvirt's vocabulary lacks go through its QEMU namespace
//! (`<qemu:commandline>`, which libvirt marks as tainting the domain):
//! - port forwards: libvirt's user-mode interface takes `<portForward>`
//!   only with its passt backend, whose addressing differs from the
//!   10.0.2.0/24 network (host at 10.0.2.2) that the guests' measured
//!   command lines expect; so a VM with forwards gets its user-mode NIC
//!   with `hostfwd` options on QEMU's command line, one without forwards a
//!   plain `<interface type='user'>`;
//! - the simulated SNP kernel-hashes page, a `loader` device at a fixed
//!   guest address.

use std::fmt::Write as _;
use std::path::Path;

use base64::Engine as _;
use hsev_attestation::agent_status::PORT_NAME as AGENT_PORT_NAME;
use hsev_attestation::firmware::channel::PORT_NAME as SIM_PORT_NAME;
use hsev_attestation::tenant_attest::PORT_NAME as ATTEST_PORT_NAME;

use super::super::qemu::argv;
use super::super::{Accelerator, Boot, ConfidentialLaunch, Disk, DriverError, LaunchSpec};
use super::capabilities::{DomainCapabilities, LibvirtVersion};

/// The XML namespace of hsevd's `<metadata>` element.
pub const METADATA_NAMESPACE: &str = "https://hypersev.org/xmlns/libvirt/vm/1";

/// The SEV-ES bit of an SEV guest policy.
const SEV_POLICY_ES: u32 = 0x4;

/// The first libvirt with `<launchSecurity type='sev-snp'>` (and its
/// `hostData`, `kernelHashes`).
pub const SNP_SINCE: LibvirtVersion = LibvirtVersion::new(10, 5, 0);
/// The first libvirt with `kernelHashes` on `<launchSecurity type='sev'>`.
pub const SEV_KERNEL_HASHES_SINCE: LibvirtVersion = LibvirtVersion::new(8, 0, 0);

/// What the host offers a domain, as probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainHost {
    /// The accelerator: domain type `kvm` or `qemu`.
    pub accelerator: Accelerator,
    /// The libvirt daemon's version.
    pub libvirt: LibvirtVersion,
    /// What `domcapabilities` said.
    pub capabilities: DomainCapabilities,
}

/// The names a VM's domain goes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainIdentity {
    /// Unique on the libvirt host: the prefix and the VM id.
    pub name: String,
    /// The VM id (a UUID).
    pub uuid: String,
}

impl DomainIdentity {
    /// The identity of `spec`'s VM under `prefix`.
    pub fn of(spec: &LaunchSpec, prefix: &str) -> Self {
        DomainIdentity {
            name: format!("{prefix}{}", spec.vm_id),
            uuid: spec.vm_id.0.clone(),
        }
    }
}

/// The files of a VM's run dir the domain uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPaths {
    /// Serial console log.
    pub console_log: std::path::PathBuf,
}

impl DomainPaths {
    /// The files in `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        DomainPaths {
            console_log: run_dir.join("console.log"),
        }
    }
}

/// Builds the domain XML. Port forwards must be resolved (no host port 0).
pub fn build(
    spec: &LaunchSpec,
    identity: &DomainIdentity,
    host: &DomainHost,
) -> Result<String, DriverError> {
    argv::validate(spec)?;
    let paths = DomainPaths::new(&spec.run_dir);
    let launch_security = launch_security(spec, host)?;
    let sev_active = launch_security.is_some();
    let mut qemu_args: Vec<String> = Vec::new();

    let domain_type = match host.accelerator {
        Accelerator::Kvm => "kvm",
        Accelerator::Tcg => "qemu",
    };
    let mut domain = Element::new("domain")
        .attr("type", domain_type)
        .attr("xmlns:qemu", "http://libvirt.org/schemas/domain/qemu/1.0");
    domain.push(Element::new("name").text(&identity.name));
    domain.push(Element::new("uuid").text(&identity.uuid));
    domain.push(Element::new("title").text(&spec.name));
    let mut metadata = Element::new("hsev:vm").attr("xmlns:hsev", METADATA_NAMESPACE);
    metadata.push(Element::new("hsev:name").text(&spec.name));
    metadata.push(Element::new("hsev:run-dir").text(path_text("run_dir", &spec.run_dir)?));
    domain.push(Element::new("metadata").child(metadata));
    domain.push(
        Element::new("memory")
            .attr("unit", "MiB")
            .text(spec.memory_mib.to_string()),
    );
    domain.push(Element::new("vcpu").text(spec.vcpus.to_string()));

    // What boots.
    let mut os = Element::new("os").child(
        Element::new("type")
            .attr("arch", "x86_64")
            .attr("machine", "q35")
            .text("hvm"),
    );
    match &spec.boot {
        Boot::Direct {
            firmware,
            kernel,
            initrd,
            cmdline,
        } => {
            if let Some(firmware) = firmware {
                os.push(rom_loader("boot.firmware", firmware)?);
            }
            os.push(Element::new("kernel").text(path_text("boot.kernel", kernel)?));
            if let Some(initrd) = initrd {
                os.push(Element::new("initrd").text(path_text("boot.initrd", initrd)?));
            }
            os.push(Element::new("cmdline").text(cmdline));
        }
        Boot::Firmware { ovmf, .. } => os.push(rom_loader("boot.ovmf", ovmf)?),
    }
    domain.push(os);
    domain.push(Element::new("features").child(Element::new("acpi")));
    domain.push(cpu(spec, host));
    domain.push(Element::new("on_poweroff").text("destroy"));
    domain.push(Element::new("on_reboot").text("restart"));
    domain.push(Element::new("on_crash").text("destroy"));

    let mut devices = Element::new("devices");
    let mut disk_index = 0usize;
    if let Boot::Firmware {
        disk: Some(disk), ..
    } = &spec.boot
    {
        devices.push(disk_element(
            disk,
            "boot.disk",
            disk_index,
            true,
            sev_active,
        )?);
        disk_index += 1;
    }
    for disk in &spec.disks {
        devices.push(disk_element(disk, "disks", disk_index, false, sev_active)?);
        disk_index += 1;
    }

    // Network: one user-mode NIC; with forwards, QEMU's own (see above).
    if spec.port_forwards.is_empty() {
        let mut interface = Element::new("interface")
            .attr("type", "user")
            .child(Element::new("model").attr("type", "virtio"))
            .child(Element::new("rom").attr("enabled", "no"));
        if sev_active {
            interface.push(Element::new("driver").attr("iommu", "on"));
        }
        devices.push(interface);
    } else {
        let mut netdev = String::from("user,id=hsevnet0");
        for forward in &spec.port_forwards {
            let _ = write!(
                netdev,
                ",hostfwd=tcp:127.0.0.1:{}-:{}",
                forward.host_port, forward.guest_port
            );
        }
        // QEMU creates these before libvirt's devices: a slot of the root
        // bus that libvirt never hands out (it fills slots from 1 with root
        // ports and keeps 0x1f for the ICH9 functions).
        let mut device =
            String::from("virtio-net-pci,netdev=hsevnet0,romfile=,bus=pcie.0,addr=0x1e");
        if sev_active {
            device.push_str(",iommu_platform=on");
        }
        qemu_args.extend(["-netdev".to_owned(), netdev, "-device".to_owned(), device]);
    }

    // The serial console, appended to the VM's log.
    devices.push(
        Element::new("serial")
            .attr("type", "file")
            .child(
                Element::new("source")
                    .attr("path", path_text("run_dir", &paths.console_log)?)
                    .attr("append", "on"),
            )
            .child(Element::new("target").attr("port", "0")),
    );

    // The simulated Secure Processor's channel and its kernel-hashes page.
    if let ConfidentialLaunch::SimulatedSnp {
        channel_socket,
        kernel_hashes_page,
    } = &spec.confidential
    {
        devices.push(unix_channel(
            "confidential.channel_socket",
            channel_socket,
            SIM_PORT_NAME,
        )?);
        if let Some(page) = kernel_hashes_page {
            qemu_args.extend([
                "-device".to_owned(),
                format!(
                    "loader,file={},addr={:#x},force-raw=on",
                    path_text("confidential.kernel_hashes_page", &page.path)?.replace(',', ",,"),
                    page.gpa
                ),
            ]);
        }
    }
    if let Some(socket) = &spec.agent_channel {
        devices.push(unix_channel("agent_channel", socket, AGENT_PORT_NAME)?);
    }
    if let Some(socket) = &spec.attest_channel {
        devices.push(unix_channel("attest_channel", socket, ATTEST_PORT_NAME)?);
    }
    devices.push(Element::new("panic").attr("model", "pvpanic"));
    devices.push(Element::new("memballoon").attr("model", "none"));
    domain.push(devices);

    if let Some(launch_security) = launch_security {
        domain.push(launch_security);
    }
    if !qemu_args.is_empty() {
        let mut commandline = Element::new("qemu:commandline");
        for arg in qemu_args {
            commandline.push(Element::new("qemu:arg").attr("value", arg));
        }
        domain.push(commandline);
    }
    Ok(domain.render())
}

/// `-bios` in libvirt's words: a read-only ROM loader.
fn rom_loader(field: &'static str, path: &Path) -> Result<Element, DriverError> {
    Ok(Element::new("loader")
        .attr("type", "rom")
        .attr("readonly", "yes")
        .text(path_text(field, path)?))
}

fn cpu(spec: &LaunchSpec, host: &DomainHost) -> Element {
    match (&spec.cpu_model, host.accelerator) {
        (Some(model), _) => Element::new("cpu")
            .attr("mode", "custom")
            .attr("match", "exact")
            .attr("check", "none")
            .child(Element::new("model").attr("fallback", "forbid").text(model)),
        (None, Accelerator::Kvm) => Element::new("cpu").attr("mode", "host-passthrough"),
        (None, Accelerator::Tcg) => Element::new("cpu").attr("mode", "maximum"),
    }
}

fn disk_element(
    disk: &Disk,
    field: &'static str,
    index: usize,
    boot: bool,
    sev_active: bool,
) -> Result<Element, DriverError> {
    let mut driver = Element::new("driver")
        .attr("name", "qemu")
        .attr("type", disk.format.as_str())
        .attr("discard", "unmap");
    if sev_active {
        driver = driver.attr("iommu", "on");
    }
    let target = format!("vd{}", disk_letter(index, field)?);
    let mut element = Element::new("disk")
        .attr("type", "file")
        .attr("device", "disk")
        .child(driver)
        .child(Element::new("source").attr("file", path_text(field, &disk.path)?))
        .child(
            Element::new("target")
                .attr("dev", target)
                .attr("bus", "virtio"),
        );
    if disk.read_only {
        element.push(Element::new("readonly"));
    }
    if let Some(serial) = &disk.serial {
        argv::check_serial(field, serial)?;
        element.push(Element::new("serial").text(serial));
    }
    if boot {
        element.push(Element::new("boot").attr("order", "1"));
    }
    Ok(element)
}

/// `a`..`z`: one virtio disk per letter is more than any VM here needs.
fn disk_letter(index: usize, field: &'static str) -> Result<char, DriverError> {
    u8::try_from(index)
        .ok()
        .filter(|index| *index < 26)
        .map(|index| char::from(b'a' + index))
        .ok_or_else(|| DriverError::InvalidSpec {
            field,
            reason: "more than 26 disks".to_owned(),
        })
}

fn unix_channel(field: &'static str, socket: &Path, name: &str) -> Result<Element, DriverError> {
    Ok(Element::new("channel")
        .attr("type", "unix")
        .child(
            Element::new("source")
                .attr("mode", "bind")
                .attr("path", path_text(field, socket)?),
        )
        .child(
            Element::new("target")
                .attr("type", "virtio")
                .attr("name", name),
        ))
}

/// `<launchSecurity>` for SEV, SEV-ES and SNP, checked against what the
/// host and this libvirt offer; `None` for other launches.
fn launch_security(spec: &LaunchSpec, host: &DomainHost) -> Result<Option<Element>, DriverError> {
    let capabilities = &host.capabilities;
    let sev = &capabilities.sev;
    let (mode, kernel_hashes) = match &spec.confidential {
        ConfidentialLaunch::None | ConfidentialLaunch::SimulatedSnp { .. } => return Ok(None),
        ConfidentialLaunch::Sev {
            policy,
            kernel_hashes,
        } if policy & SEV_POLICY_ES != 0 => (("SEV-ES", "sev", sev.sev_es), *kernel_hashes),
        ConfidentialLaunch::Sev { kernel_hashes, .. } => (("SEV", "sev", sev.sev), *kernel_hashes),
        ConfidentialLaunch::SevSnp { kernel_hashes, .. } => {
            (("SEV-SNP", "sev-snp", sev.sev_snp), *kernel_hashes)
        }
    };
    let (name, sectype, offered) = mode;
    if sectype == "sev-snp" && host.libvirt < SNP_SINCE {
        return Err(DriverError::Unsupported(format!(
            "libvirt {} has no <launchSecurity type='sev-snp'> (libvirt {SNP_SINCE} or later has it, \
             with hostData and kernelHashes)",
            host.libvirt
        )));
    }
    if !offered {
        return Err(DriverError::Unsupported(format!(
            "this host cannot run {name} guests through libvirt: {}",
            sev.reason
        )));
    }
    if host.accelerator != Accelerator::Kvm {
        return Err(DriverError::Unsupported(format!(
            "{name} needs KVM; this host runs guests on {}",
            host.accelerator
        )));
    }
    let (Some(cbitpos), Some(reduced)) = (sev.cbitpos, sev.reduced_phys_bits) else {
        return Err(DriverError::Unsupported(
            "libvirt's domcapabilities name no cbitpos/reducedPhysBits".to_owned(),
        ));
    };
    match &spec.boot {
        Boot::Direct { firmware: None, .. } => {
            return Err(DriverError::InvalidSpec {
                field: "boot.firmware",
                reason: format!("{name} needs OVMF firmware, not QEMU's default BIOS"),
            })
        }
        Boot::Firmware { .. } if kernel_hashes => {
            return Err(DriverError::InvalidSpec {
                field: "confidential.kernel_hashes",
                reason: "kernel hashes need a direct kernel boot".to_owned(),
            })
        }
        _ => {}
    }
    if kernel_hashes && sectype == "sev" && host.libvirt < SEV_KERNEL_HASHES_SINCE {
        return Err(DriverError::Unsupported(format!(
            "libvirt {} has no kernelHashes for SEV (libvirt {SEV_KERNEL_HASHES_SINCE} or later)",
            host.libvirt
        )));
    }
    let mut element = Element::new("launchSecurity").attr("type", sectype);
    if kernel_hashes {
        element = element.attr("kernelHashes", "yes");
    }
    element.push(Element::new("cbitpos").text(cbitpos.to_string()));
    element.push(Element::new("reducedPhysBits").text(reduced.to_string()));
    match &spec.confidential {
        ConfidentialLaunch::Sev { policy, .. } => {
            element.push(Element::new("policy").text(format!("{policy:#06x}")));
        }
        ConfidentialLaunch::SevSnp {
            policy,
            host_data,
            id_block,
            ..
        } => {
            let base64 = base64::engine::general_purpose::STANDARD;
            element.push(Element::new("policy").text(format!("{policy:#010x}")));
            if let Some(id_block) = id_block {
                if id_block.author_key_enabled() {
                    element = element.attr("authorKey", "yes");
                }
                element
                    .push(Element::new("idBlock").text(base64.encode(id_block.block.to_bytes())));
                element.push(Element::new("idAuth").text(base64.encode(id_block.auth_bytes())));
            }
            element.push(Element::new("hostData").text(base64.encode(host_data)));
        }
        ConfidentialLaunch::None | ConfidentialLaunch::SimulatedSnp { .. } => {}
    }
    Ok(Some(element))
}

fn path_text<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, DriverError> {
    path.to_str().ok_or_else(|| DriverError::InvalidSpec {
        field,
        reason: format!("{} is not UTF-8", path.display()),
    })
}

/// A minimal XML element tree, rendered with quick-xml's escaping.
#[derive(Debug, Clone)]
struct Element {
    name: &'static str,
    attributes: Vec<(&'static str, String)>,
    text: Option<String>,
    children: Vec<Element>,
}

impl Element {
    fn new(name: &'static str) -> Self {
        Element {
            name,
            attributes: Vec::new(),
            text: None,
            children: Vec::new(),
        }
    }

    fn attr(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.attributes.push((name, value.into()));
        self
    }

    fn text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    fn child(mut self, child: Element) -> Self {
        self.children.push(child);
        self
    }

    fn push(&mut self, child: Element) {
        self.children.push(child);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        self.render_into(&mut out, 0);
        out
    }

    fn render_into(&self, out: &mut String, depth: usize) {
        let indent = "  ".repeat(depth);
        let _ = write!(out, "{indent}<{}", self.name);
        for (name, value) in &self.attributes {
            let _ = write!(
                out,
                " {name}='{}'",
                quick_xml::escape::escape(value.as_str())
            );
        }
        match (&self.text, self.children.is_empty()) {
            (None, true) => out.push_str("/>\n"),
            (Some(text), true) => {
                let _ = writeln!(
                    out,
                    ">{}</{}>",
                    quick_xml::escape::escape(text.as_str()),
                    self.name
                );
            }
            (_, false) => {
                out.push_str(">\n");
                for child in &self.children {
                    child.render_into(out, depth + 1);
                }
                let _ = writeln!(out, "{indent}</{}>", self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::hypervisor::{DiskFormat, KernelHashesPage, SevSupport};
    use crate::model::{PortForward, VmId};

    pub(crate) fn spec(boot: Boot, confidential: ConfidentialLaunch) -> LaunchSpec {
        LaunchSpec {
            vm_id: VmId("6f1d1f54-57a6-4e0e-9d8a-4b2f4c1f0a01".into()),
            name: "web-1".into(),
            run_dir: PathBuf::from("/run/hsev/vm/6f1d"),
            vcpus: 2,
            memory_mib: 512,
            cpu_model: None,
            boot,
            disks: Vec::new(),
            port_forwards: Vec::new(),
            confidential,
            agent_channel: None,
            attest_channel: None,
        }
    }

    fn direct(firmware: Option<&str>) -> Boot {
        Boot::Direct {
            firmware: firmware.map(PathBuf::from),
            kernel: PathBuf::from("/img/vmlinuz"),
            initrd: Some(PathBuf::from("/img/initrd.img")),
            cmdline: "console=ttyS0 hsev.net=user <&'>".into(),
        }
    }

    fn tcg_host() -> DomainHost {
        DomainHost {
            accelerator: Accelerator::Tcg,
            libvirt: LibvirtVersion::new(11, 3, 0),
            capabilities: DomainCapabilities {
                sev: SevSupport {
                    reason: "libvirt domcapabilities: <sev supported='no'/>".into(),
                    ..SevSupport::default()
                },
                ..DomainCapabilities::default()
            },
        }
    }

    fn snp_host(libvirt: LibvirtVersion) -> DomainHost {
        DomainHost {
            accelerator: Accelerator::Kvm,
            libvirt,
            capabilities: DomainCapabilities {
                sev: SevSupport {
                    sev: true,
                    sev_es: true,
                    sev_snp: true,
                    cbitpos: Some(51),
                    reduced_phys_bits: Some(1),
                    max_guests: Some(15),
                    max_es_guests: Some(494),
                    reason: "sev, sev-snp".into(),
                },
                ..DomainCapabilities::default()
            },
        }
    }

    fn identity(spec: &LaunchSpec) -> DomainIdentity {
        DomainIdentity::of(spec, "hsev-")
    }

    fn parse(xml: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(xml).unwrap_or_else(|error| panic!("{error}:\n{xml}"))
    }

    fn texts(document: &roxmltree::Document<'_>, tag: &str) -> Vec<String> {
        document
            .descendants()
            .filter(|node| node.tag_name().name() == tag)
            .map(|node| node.text().unwrap_or_default().to_owned())
            .collect()
    }

    fn find<'a>(document: &'a roxmltree::Document<'a>, tag: &str) -> Vec<roxmltree::Node<'a, 'a>> {
        document
            .descendants()
            .filter(|node| node.tag_name().name() == tag)
            .collect()
    }

    #[test]
    fn libvirt_xml_direct_boot_on_tcg() {
        let launch = spec(direct(None), ConfidentialLaunch::None);
        let xml = build(&launch, &identity(&launch), &tcg_host()).expect("builds");
        let document = parse(&xml);
        let root = document.root_element();
        assert_eq!(root.attribute("type"), Some("qemu"));
        assert_eq!(
            texts(&document, "name"),
            ["hsev-6f1d1f54-57a6-4e0e-9d8a-4b2f4c1f0a01", "web-1"]
        );
        assert_eq!(
            texts(&document, "uuid"),
            ["6f1d1f54-57a6-4e0e-9d8a-4b2f4c1f0a01"]
        );
        assert_eq!(texts(&document, "run-dir"), ["/run/hsev/vm/6f1d"]);
        assert_eq!(texts(&document, "memory"), ["512"]);
        assert_eq!(texts(&document, "vcpu"), ["2"]);
        assert_eq!(texts(&document, "kernel"), ["/img/vmlinuz"]);
        assert_eq!(texts(&document, "initrd"), ["/img/initrd.img"]);
        // Escaped on the way out, intact on the way back.
        assert_eq!(
            texts(&document, "cmdline"),
            ["console=ttyS0 hsev.net=user <&'>"]
        );
        assert!(find(&document, "loader").is_empty(), "QEMU's default BIOS");
        assert_eq!(find(&document, "cpu")[0].attribute("mode"), Some("maximum"));
        assert_eq!(texts(&document, "on_poweroff"), ["destroy"]);
        assert_eq!(texts(&document, "on_crash"), ["destroy"]);
        let serial = &find(&document, "serial")[0];
        assert_eq!(serial.attribute("type"), Some("file"));
        let source = serial.first_element_child().expect("source");
        assert_eq!(
            source.attribute("path"),
            Some("/run/hsev/vm/6f1d/console.log")
        );
        assert_eq!(source.attribute("append"), Some("on"));
        let interface = &find(&document, "interface")[0];
        assert_eq!(interface.attribute("type"), Some("user"));
        assert!(find(&document, "launchSecurity").is_empty());
        assert!(
            find(&document, "commandline").is_empty(),
            "no QEMU passthrough"
        );
        assert!(find(&document, "channel").is_empty());
        assert_eq!(
            find(&document, "panic")[0].attribute("model"),
            Some("pvpanic")
        );
    }

    #[test]
    fn libvirt_xml_firmware_disks_forwards_and_channels() {
        let mut launch = spec(
            Boot::Firmware {
                ovmf: PathBuf::from("/usr/share/ovmf/OVMF.fd"),
                disk: Some(Disk {
                    path: PathBuf::from("/img/root.qcow2"),
                    format: DiskFormat::Qcow2,
                    read_only: true,
                    serial: None,
                }),
            },
            ConfidentialLaunch::SimulatedSnp {
                channel_socket: PathBuf::from("/run/hsev/vm/6f1d/sim-sp.sock"),
                kernel_hashes_page: Some(KernelHashesPage {
                    path: PathBuf::from("/run/hsev/vm/6f1d/hashes,1.bin"),
                    gpa: 0x80_a000,
                }),
            },
        );
        launch.disks = vec![
            Disk::qcow2("/run/hsev/vm/6f1d/disk-data.qcow2"),
            Disk {
                path: PathBuf::from("/run/hsev/vm/6f1d/disk-hsev-data.luks"),
                format: DiskFormat::Raw,
                read_only: false,
                serial: Some("hsev-data".into()),
            },
        ];
        launch.port_forwards = vec![
            PortForward {
                host_port: 2222,
                guest_port: 22,
            },
            PortForward {
                host_port: 8080,
                guest_port: 80,
            },
        ];
        launch.agent_channel = Some(PathBuf::from("/run/hsev/vm/6f1d/agent.sock"));
        launch.attest_channel = Some(PathBuf::from("/run/hsev/vm/6f1d/attest.sock"));
        launch.cpu_model = Some("EPYC-v4".into());
        let xml = build(&launch, &identity(&launch), &tcg_host()).expect("builds");
        let document = parse(&xml);
        let loader = &find(&document, "loader")[0];
        assert_eq!(loader.attribute("type"), Some("rom"));
        assert_eq!(loader.text(), Some("/usr/share/ovmf/OVMF.fd"));
        let cpu = &find(&document, "cpu")[0];
        assert_eq!(cpu.attribute("mode"), Some("custom"));
        assert_eq!(
            texts(&document, "model").first().map(String::as_str),
            Some("EPYC-v4")
        );

        let disks = find(&document, "disk");
        assert_eq!(disks.len(), 3);
        let described: Vec<(String, String, bool, Option<String>, bool)> = disks
            .iter()
            .map(|disk| {
                let child = |tag: &str| disk.children().find(|node| node.tag_name().name() == tag);
                (
                    child("source")
                        .and_then(|node| node.attribute("file"))
                        .unwrap_or_default()
                        .to_owned(),
                    child("driver")
                        .and_then(|node| node.attribute("type"))
                        .unwrap_or_default()
                        .to_owned(),
                    child("readonly").is_some(),
                    child("serial")
                        .and_then(|node| node.text())
                        .map(str::to_owned),
                    child("boot").is_some(),
                )
            })
            .collect();
        assert_eq!(
            described,
            [
                ("/img/root.qcow2".into(), "qcow2".into(), true, None, true),
                (
                    "/run/hsev/vm/6f1d/disk-data.qcow2".into(),
                    "qcow2".into(),
                    false,
                    None,
                    false
                ),
                (
                    "/run/hsev/vm/6f1d/disk-hsev-data.luks".into(),
                    "raw".into(),
                    false,
                    Some("hsev-data".into()),
                    false
                ),
            ]
        );
        let targets: Vec<&str> = find(&document, "target")
            .iter()
            .filter_map(|node| node.attribute("dev"))
            .collect();
        assert_eq!(targets, ["vda", "vdb", "vdc"]);

        // Forwards: QEMU's own user-mode NIC, no libvirt interface.
        assert!(find(&document, "interface").is_empty());
        let args: Vec<&str> = find(&document, "arg")
            .iter()
            .filter_map(|node| node.attribute("value"))
            .collect();
        assert_eq!(
            args,
            [
                "-netdev",
                "user,id=hsevnet0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80",
                "-device",
                "virtio-net-pci,netdev=hsevnet0,romfile=,bus=pcie.0,addr=0x1e",
                "-device",
                "loader,file=/run/hsev/vm/6f1d/hashes,,1.bin,addr=0x80a000,force-raw=on",
            ]
        );
        let channels: Vec<(Option<&str>, Option<&str>)> = find(&document, "channel")
            .iter()
            .map(|channel| {
                let source = channel.children().find(|n| n.tag_name().name() == "source");
                let target = channel.children().find(|n| n.tag_name().name() == "target");
                (
                    source.and_then(|node| node.attribute("path")),
                    target.and_then(|node| node.attribute("name")),
                )
            })
            .collect();
        assert_eq!(
            channels,
            [
                (Some("/run/hsev/vm/6f1d/sim-sp.sock"), Some(SIM_PORT_NAME)),
                (Some("/run/hsev/vm/6f1d/agent.sock"), Some(AGENT_PORT_NAME)),
                (
                    Some("/run/hsev/vm/6f1d/attest.sock"),
                    Some(ATTEST_PORT_NAME)
                ),
            ]
        );
        assert!(
            find(&document, "launchSecurity").is_empty(),
            "simulated: no SEV element"
        );
    }

    #[test]
    fn libvirt_xml_sev_snp_launch_security() {
        let mut launch = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::SevSnp {
                policy: 0x30000,
                host_data: [0xab; 32],
                kernel_hashes: true,
                id_block: None,
            },
        );
        launch.disks = vec![Disk::qcow2("/d.qcow2")];
        let host = snp_host(LibvirtVersion::new(11, 3, 0));
        let xml = build(&launch, &identity(&launch), &host).expect("builds");
        let document = parse(&xml);
        assert_eq!(document.root_element().attribute("type"), Some("kvm"));
        let security = &find(&document, "launchSecurity")[0];
        assert_eq!(security.attribute("type"), Some("sev-snp"));
        assert_eq!(security.attribute("kernelHashes"), Some("yes"));
        assert_eq!(texts(&document, "cbitpos"), ["51"]);
        assert_eq!(texts(&document, "reducedPhysBits"), ["1"]);
        assert_eq!(texts(&document, "policy"), ["0x00030000"]);
        assert_eq!(
            texts(&document, "hostData"),
            [base64::engine::general_purpose::STANDARD.encode([0xab; 32])]
        );
        // Devices that do DMA go through the IOMMU (bounce buffers).
        let iommu: Vec<_> = find(&document, "driver")
            .iter()
            .filter_map(|node| node.attribute("iommu"))
            .collect();
        assert_eq!(iommu, ["on", "on"], "the disk and the NIC");

        // SEV-ES through the ES policy bit; plain SEV.
        launch.confidential = ConfidentialLaunch::Sev {
            policy: 0x5,
            kernel_hashes: false,
        };
        let xml = build(&launch, &identity(&launch), &host).expect("builds");
        let document = parse(&xml);
        let security = &find(&document, "launchSecurity")[0];
        assert_eq!(security.attribute("type"), Some("sev"));
        assert_eq!(security.attribute("kernelHashes"), None);
        assert_eq!(texts(&document, "policy"), ["0x0005"]);
        assert!(texts(&document, "hostData").is_empty());
    }

    #[test]
    fn libvirt_xml_refusals_name_what_is_missing() {
        let snp = ConfidentialLaunch::SevSnp {
            policy: 0x30000,
            host_data: [0; 32],
            kernel_hashes: true,
            id_block: None,
        };
        let launch = spec(direct(Some("/img/OVMF.fd")), snp.clone());
        // An older libvirt: no sev-snp element at all.
        let error = build(
            &launch,
            &identity(&launch),
            &snp_host(LibvirtVersion::new(9, 0, 0)),
        )
        .expect_err("no SNP in libvirt 9");
        assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
        assert!(
            error
                .to_string()
                .contains("libvirt 9.0.0 has no <launchSecurity type='sev-snp'>"),
            "{error}"
        );
        // SEV kernel hashes before libvirt 8.
        let mut sev = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::Sev {
                policy: 0x1,
                kernel_hashes: true,
            },
        );
        let error = build(
            &sev,
            &identity(&sev),
            &snp_host(LibvirtVersion::new(7, 10, 0)),
        )
        .expect_err("no kernelHashes");
        assert!(
            error.to_string().contains("no kernelHashes for SEV"),
            "{error}"
        );
        // A host whose domcapabilities say no SEV: the probe's reason.
        let error = build(&launch, &identity(&launch), &tcg_host()).expect_err("no SEV here");
        assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
        assert!(
            error.to_string().contains("<sev supported='no'/>"),
            "{error}"
        );
        // SEV needs firmware.
        sev.boot = direct(None);
        let error = build(
            &sev,
            &identity(&sev),
            &snp_host(LibvirtVersion::new(11, 3, 0)),
        )
        .expect_err("no firmware");
        assert!(
            matches!(
                error,
                DriverError::InvalidSpec {
                    field: "boot.firmware",
                    ..
                }
            ),
            "{error}"
        );
        // Bad specs are named as for QEMU.
        let mut bad = spec(direct(None), ConfidentialLaunch::None);
        bad.vcpus = 0;
        let error = build(&bad, &identity(&bad), &tcg_host()).expect_err("no vCPU");
        assert!(
            matches!(error, DriverError::InvalidSpec { field: "vcpus", .. }),
            "{error}"
        );
        let mut bad = spec(direct(None), ConfidentialLaunch::None);
        bad.disks = vec![Disk {
            serial: Some("no spaces".into()),
            ..Disk::qcow2("/d")
        }];
        let error = build(&bad, &identity(&bad), &tcg_host()).expect_err("bad serial");
        assert!(error.to_string().contains("disk serial"), "{error}");
    }

    #[test]
    fn libvirt_xml_is_deterministic() {
        let launch = spec(direct(None), ConfidentialLaunch::None);
        let first = build(&launch, &identity(&launch), &tcg_host()).expect("builds");
        let second = build(&launch, &identity(&launch), &tcg_host()).expect("builds");
        assert_eq!(first, second);
    }
}
