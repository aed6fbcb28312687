//! The QEMU command line: a pure function of a [`LaunchSpec`], the
//! accelerator and the host's SEV parameters.
//!
//! Choices, each measured or forced:
//! - `-machine q35`: needed for SEV (OVMF, PCIe, ACPI power button); on this
//!   kind of host microvm started no faster (QMP `running` in 67-76 ms vs
//!   49-64 ms for q35, TCG) and lacks the ACPI power button and PCI devices
//!   the rest of the driver relies on.
//! - `-no-user-config -nodefaults -display none`: nothing but what is listed
//!   here (no default NIC, VGA, floppy, CD-ROM or monitor).
//! - `-no-shutdown`: a guest power-off leaves QEMU paused in state
//!   `shutdown` (as libvirt does), so "the guest powered off" can be told
//!   apart from "QEMU died" until the daemon stops it; `-action panic=pause`
//!   with a pvpanic device does the same for guest panics.
//! - the console is a `-chardev file` in append mode: reboots and restarts
//!   add to one log.
//! - `romfile=` on the NIC: no iPXE option ROM to load.

use std::path::Path;

use base64::Engine as _;

use super::super::{
    Accelerator, Boot, ConfidentialLaunch, Disk, DriverError, LaunchSpec, SevSupport,
};
use hsev_attestation::agent_status::PORT_NAME as AGENT_PORT_NAME;
use hsev_attestation::firmware::channel::PORT_NAME;
use hsev_attestation::tenant_attest::PORT_NAME as ATTEST_PORT_NAME;

/// The files QEMU uses in a VM's run dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// QMP socket.
    pub qmp_socket: std::path::PathBuf,
    /// Serial console log.
    pub console_log: std::path::PathBuf,
    /// QEMU's own stdout/stderr.
    pub vmm_log: std::path::PathBuf,
}

impl RunPaths {
    /// The files in `run_dir`.
    pub fn new(run_dir: &Path) -> Self {
        RunPaths {
            qmp_socket: run_dir.join("qmp.sock"),
            console_log: run_dir.join("console.log"),
            vmm_log: run_dir.join("qemu.log"),
        }
    }
}

/// What the host offers a launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostParams {
    /// The accelerator.
    pub accelerator: Accelerator,
    /// SEV objects the host can take.
    pub sev: SevSupport,
}

/// The id of the confidential-guest-support object.
const SEV_OBJECT_ID: &str = "sev0";
/// The SEV-ES bit of an SEV guest policy.
const SEV_POLICY_ES: u32 = 0x4;

/// Builds QEMU's arguments (without the binary). Port forwards must be
/// resolved (no host port 0) before.
pub fn build(
    spec: &LaunchSpec,
    host: &HostParams,
    paths: &RunPaths,
) -> Result<Vec<String>, DriverError> {
    validate(spec)?;
    let mut args = Args::default();

    args.push(["-name", &format!("guest={}", escape(&spec.name))]);
    args.push(["-no-user-config", "-nodefaults", "-display", "none"]);

    let confidential = confidential_object(spec, host)?;
    let mut machine = String::from("q35");
    if confidential.is_some() {
        machine.push_str(",confidential-guest-support=");
        machine.push_str(SEV_OBJECT_ID);
    }
    args.push(["-machine", &machine]);
    args.push(["-accel", host.accelerator.as_str()]);
    let cpu = spec
        .cpu_model
        .clone()
        .unwrap_or_else(|| match host.accelerator {
            Accelerator::Kvm => "host".to_owned(),
            Accelerator::Tcg => "max".to_owned(),
        });
    args.push(["-cpu", &cpu]);
    args.push(["-smp", &spec.vcpus.to_string()]);
    args.push(["-m", &format!("{}M", spec.memory_mib)]);
    if let Some(object) = confidential {
        args.push(["-object", &object]);
    }

    // Control and console.
    args.push([
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path_value("run_dir", &paths.qmp_socket)?
        ),
    ]);
    args.push(["-mon", "chardev=qmp,mode=control"]);
    args.push([
        "-chardev",
        &format!(
            "file,id=console,path={},append=on",
            path_value("run_dir", &paths.console_log)?
        ),
    ]);
    args.push(["-serial", "chardev:console"]);
    args.push(["-no-shutdown", "-action", "panic=pause"]);
    args.push(["-device", "pvpanic"]);

    // What boots.
    match &spec.boot {
        Boot::Direct {
            firmware,
            kernel,
            initrd,
            cmdline,
        } => {
            if let Some(firmware) = firmware {
                args.push(["-bios", plain_path("boot.firmware", firmware)?]);
            }
            args.push(["-kernel", plain_path("boot.kernel", kernel)?]);
            if let Some(initrd) = initrd {
                args.push(["-initrd", plain_path("boot.initrd", initrd)?]);
            }
            args.push(["-append", cmdline.as_str()]);
        }
        Boot::Firmware { ovmf, disk } => {
            args.push(["-bios", plain_path("boot.ovmf", ovmf)?]);
            if let Some(disk) = disk {
                push_disk(&mut args, "boot", "boot.disk", disk, Some(0))?;
            }
        }
    }
    for (index, disk) in spec.disks.iter().enumerate() {
        push_disk(&mut args, &format!("disk{index}"), "disks", disk, None)?;
    }

    // Network: one user-mode NIC, with the forwards.
    let mut netdev = String::from("user,id=net0");
    for forward in &spec.port_forwards {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            forward.host_port, forward.guest_port
        ));
    }
    args.push(["-netdev", &netdev]);
    args.push(["-device", "virtio-net-pci,netdev=net0,romfile="]);

    // The simulated Secure Processor's channel.
    if let ConfidentialLaunch::SimulatedSnp {
        channel_socket,
        kernel_hashes_page,
    } = &spec.confidential
    {
        args.push(["-device", "virtio-serial-pci,id=simsp-bus"]);
        args.push([
            "-chardev",
            &format!(
                "socket,id=simsp,path={},server=on,wait=off",
                path_value("confidential.channel_socket", channel_socket)?
            ),
        ]);
        args.push([
            "-device",
            &format!("virtserialport,bus=simsp-bus.0,chardev=simsp,name={PORT_NAME}"),
        ]);
        if let Some(page) = kernel_hashes_page {
            args.push([
                "-device",
                &format!(
                    "loader,file={},addr={:#x},force-raw=on",
                    path_value("confidential.kernel_hashes_page", &page.path)?,
                    page.gpa
                ),
            ]);
        }
    }
    // The guest agent's ports: its status lines, and its answers to the
    // tenant's attestation requests.
    let agent_ports = [
        (
            "agent",
            "agent_channel",
            AGENT_PORT_NAME,
            &spec.agent_channel,
        ),
        (
            "attest",
            "attest_channel",
            ATTEST_PORT_NAME,
            &spec.attest_channel,
        ),
    ];
    if agent_ports.iter().any(|(.., socket)| socket.is_some()) {
        args.push(["-device", "virtio-serial-pci,id=agent-bus"]);
    }
    for (id, field, name, socket) in agent_ports {
        let Some(socket) = socket else { continue };
        args.push([
            "-chardev",
            &format!(
                "socket,id={id},path={},server=on,wait=off",
                path_value(field, socket)?
            ),
        ]);
        args.push([
            "-device",
            &format!("virtserialport,bus=agent-bus.0,chardev={id},name={name}"),
        ]);
    }
    Ok(args.0)
}

/// Checks what every engine needs of a spec; names the bad field.
pub(crate) fn validate(spec: &LaunchSpec) -> Result<(), DriverError> {
    let invalid = |field, reason: &str| DriverError::InvalidSpec {
        field,
        reason: reason.to_owned(),
    };
    if spec.name.is_empty() {
        return Err(invalid("name", "is empty"));
    }
    if spec.vcpus == 0 {
        return Err(invalid("vcpus", "must be at least 1"));
    }
    if spec.memory_mib < 16 {
        return Err(invalid("memory_mib", "must be at least 16"));
    }
    if let Some(cpu) = &spec.cpu_model {
        if cpu.is_empty() || cpu.contains(',') {
            return Err(invalid("cpu_model", "must be a CPU model name (no commas)"));
        }
    }
    if spec.port_forwards.iter().any(|f| f.host_port == 0) {
        return Err(invalid(
            "port_forwards",
            "host port 0 must be resolved to a free port before building the command line",
        ));
    }
    if spec.port_forwards.iter().any(|f| f.guest_port == 0) {
        return Err(invalid("port_forwards", "guest port 0"));
    }
    Ok(())
}

/// The `-object` for SEV / SEV-SNP, checked against what the host offers.
fn confidential_object(
    spec: &LaunchSpec,
    host: &HostParams,
) -> Result<Option<String>, DriverError> {
    let (kind, needed, kernel_hashes) = match &spec.confidential {
        ConfidentialLaunch::None | ConfidentialLaunch::SimulatedSnp { .. } => return Ok(None),
        ConfidentialLaunch::Sev {
            policy,
            kernel_hashes,
        } => {
            let es = policy & SEV_POLICY_ES != 0;
            let (name, offered) = if es {
                ("SEV-ES", host.sev.sev_es)
            } else {
                ("SEV", host.sev.sev)
            };
            (
                "sev-guest",
                offered.then_some(()).ok_or(name),
                *kernel_hashes,
            )
        }
        ConfidentialLaunch::SevSnp { kernel_hashes, .. } => (
            "sev-snp-guest",
            host.sev.sev_snp.then_some(()).ok_or("SEV-SNP"),
            *kernel_hashes,
        ),
    };
    if let Err(mode) = needed {
        return Err(DriverError::Unsupported(format!(
            "this host cannot run {mode} guests: {}",
            host.sev.reason
        )));
    }
    if host.accelerator != Accelerator::Kvm {
        return Err(DriverError::Unsupported(format!(
            "{kind} needs KVM; this host runs guests on {}",
            host.accelerator
        )));
    }
    let (Some(cbitpos), Some(reduced)) = (host.sev.cbitpos, host.sev.reduced_phys_bits) else {
        return Err(DriverError::Unsupported(
            "the host reports no C-bit position (CPUID 0x8000001F)".to_owned(),
        ));
    };
    match &spec.boot {
        Boot::Direct { firmware: None, .. } => {
            return Err(DriverError::InvalidSpec {
                field: "boot.firmware",
                reason: format!("{kind} needs OVMF firmware, not QEMU's default BIOS"),
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
    let mut object = format!("{kind},id={SEV_OBJECT_ID}");
    match &spec.confidential {
        ConfidentialLaunch::Sev { policy, .. } => object.push_str(&format!(",policy={policy:#x}")),
        ConfidentialLaunch::SevSnp {
            policy,
            host_data,
            id_block,
            ..
        } => {
            let base64 = base64::engine::general_purpose::STANDARD;
            object.push_str(&format!(
                ",policy={policy:#x},host-data={}",
                base64.encode(host_data)
            ));
            if let Some(id_block) = id_block {
                object.push_str(&format!(
                    ",id-block={},id-auth={},author-key-enabled={}",
                    base64.encode(id_block.block.to_bytes()),
                    base64.encode(id_block.auth_bytes()),
                    if id_block.author_key_enabled() {
                        "on"
                    } else {
                        "off"
                    }
                ));
            }
        }
        ConfidentialLaunch::None | ConfidentialLaunch::SimulatedSnp { .. } => {}
    }
    object.push_str(&format!(",cbitpos={cbitpos},reduced-phys-bits={reduced}"));
    if kernel_hashes {
        object.push_str(",kernel-hashes=on");
    }
    Ok(Some(object))
}

fn push_disk(
    args: &mut Args,
    id: &str,
    field: &'static str,
    disk: &Disk,
    bootindex: Option<u32>,
) -> Result<(), DriverError> {
    let mut drive = format!(
        "file={},if=none,id={id},format={},discard=unmap",
        path_value(field, &disk.path)?,
        disk.format.as_str()
    );
    if disk.read_only {
        drive.push_str(",readonly=on");
    }
    args.push(["-drive", &drive]);
    let mut device = format!("virtio-blk-pci,drive={id}");
    if let Some(serial) = &disk.serial {
        check_serial(field, serial)?;
        device.push_str(&format!(",serial={serial}"));
    }
    if let Some(index) = bootindex {
        device.push_str(&format!(",bootindex={index}"));
    }
    args.push(["-device", &device]);
    Ok(())
}

/// A disk serial the guest can read back: 1-20 of A-Z, a-z, 0-9, '-', '_'.
pub(crate) fn check_serial(field: &'static str, serial: &str) -> Result<(), DriverError> {
    if serial.is_empty()
        || serial.len() > 20
        || !serial
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(DriverError::InvalidSpec {
            field,
            reason: format!("disk serial {serial:?}: 1-20 of A-Z, a-z, 0-9, '-', '_'"),
        });
    }
    Ok(())
}

/// A path as a value inside a QEMU option list (commas doubled).
fn path_value(field: &'static str, path: &Path) -> Result<String, DriverError> {
    Ok(escape(plain_path(field, path)?))
}

/// A path as a whole argument.
fn plain_path<'a>(field: &'static str, path: &'a Path) -> Result<&'a str, DriverError> {
    path.to_str().ok_or_else(|| DriverError::InvalidSpec {
        field,
        reason: format!("{} is not UTF-8", path.display()),
    })
}

/// QEMU's option-list escaping: a comma in a value is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

#[derive(Default)]
struct Args(Vec<String>);

impl Args {
    fn push<const N: usize>(&mut self, items: [&str; N]) {
        self.0.extend(items.iter().map(|item| (*item).to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::hypervisor::KernelHashesPage;
    use crate::model::{PortForward, VmId};

    fn spec(boot: Boot, confidential: ConfidentialLaunch) -> LaunchSpec {
        LaunchSpec {
            vm_id: VmId("6f1d1f54-57a6-4e0e-9d8a-4b2f4c1f0a01".into()),
            name: "web-1".into(),
            run_dir: PathBuf::from("/run/hsev/vm/web-1"),
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
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
        }
    }

    fn tcg() -> HostParams {
        HostParams {
            accelerator: Accelerator::Tcg,
            sev: SevSupport {
                reason: "no SEV: /dev/sev is absent".into(),
                ..SevSupport::default()
            },
        }
    }

    fn snp_host() -> HostParams {
        HostParams {
            accelerator: Accelerator::Kvm,
            sev: SevSupport {
                sev: true,
                sev_es: true,
                sev_snp: true,
                cbitpos: Some(51),
                reduced_phys_bits: Some(1),
                reason: "kvm_amd sev_snp=Y".into(),
                ..SevSupport::default()
            },
        }
    }

    fn paths() -> RunPaths {
        RunPaths::new(Path::new("/run/hsev/vm/web-1"))
    }

    /// The value following the first occurrence of `flag`, and every value
    /// of that flag.
    fn values<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|pair| pair[0] == flag)
            .map(|pair| pair[1].as_str())
            .collect()
    }

    #[test]
    fn hypervisor_argv_direct_boot_default_bios() {
        let argv = build(
            &spec(direct(None), ConfidentialLaunch::None),
            &tcg(),
            &paths(),
        )
        .expect("builds");
        assert_eq!(values(&argv, "-machine"), ["q35"]);
        assert_eq!(values(&argv, "-accel"), ["tcg"]);
        assert_eq!(values(&argv, "-cpu"), ["max"]);
        assert_eq!(values(&argv, "-smp"), ["2"]);
        assert_eq!(values(&argv, "-m"), ["512M"]);
        assert!(values(&argv, "-bios").is_empty(), "QEMU's default BIOS");
        assert_eq!(values(&argv, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(values(&argv, "-initrd"), ["/img/initrd.img"]);
        assert_eq!(values(&argv, "-append"), ["console=ttyS0 panic=-1 quiet"]);
        for flag in ["-no-user-config", "-nodefaults", "-no-shutdown"] {
            assert!(argv.iter().any(|arg| arg == flag), "{flag}");
        }
        assert_eq!(values(&argv, "-display"), ["none"]);
        assert_eq!(
            values(&argv, "-chardev"),
            [
                "socket,id=qmp,path=/run/hsev/vm/web-1/qmp.sock,server=on,wait=off",
                "file,id=console,path=/run/hsev/vm/web-1/console.log,append=on",
            ]
        );
        assert_eq!(values(&argv, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(values(&argv, "-serial"), ["chardev:console"]);
        assert_eq!(values(&argv, "-netdev"), ["user,id=net0"]);
        assert!(values(&argv, "-object").is_empty(), "no SEV object");
        assert!(!argv.iter().any(|arg| arg.contains("virtserialport")));
        assert_eq!(values(&argv, "-name"), ["guest=web-1"]);
    }

    #[test]
    fn hypervisor_argv_firmware_boot_and_disks() {
        let mut launch = spec(
            Boot::Firmware {
                ovmf: PathBuf::from("/usr/share/ovmf/OVMF.fd"),
                disk: Some(Disk {
                    path: PathBuf::from("/var/lib/hsev/root,1.raw"),
                    format: crate::hypervisor::DiskFormat::Raw,
                    read_only: true,
                    serial: None,
                }),
            },
            ConfidentialLaunch::None,
        );
        launch.disks = vec![Disk::qcow2("/d/a.qcow2"), Disk::qcow2("/d/b.qcow2")];
        launch.cpu_model = Some("EPYC-v4".into());
        let argv = build(&launch, &tcg(), &paths()).expect("builds");
        assert_eq!(values(&argv, "-bios"), ["/usr/share/ovmf/OVMF.fd"]);
        assert!(values(&argv, "-kernel").is_empty());
        assert_eq!(values(&argv, "-cpu"), ["EPYC-v4"]);
        assert_eq!(
            values(&argv, "-drive"),
            [
                "file=/var/lib/hsev/root,,1.raw,if=none,id=boot,format=raw,discard=unmap,readonly=on",
                "file=/d/a.qcow2,if=none,id=disk0,format=qcow2,discard=unmap",
                "file=/d/b.qcow2,if=none,id=disk1,format=qcow2,discard=unmap",
            ]
        );
        let devices = values(&argv, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=boot,bootindex=0"));
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0"));
        assert!(devices.contains(&"virtio-blk-pci,drive=disk1"));
    }

    #[test]
    fn hypervisor_argv_encrypted_disk_serial_and_agent_port() {
        let mut launch = spec(direct(None), ConfidentialLaunch::None);
        launch.disks = vec![Disk {
            path: PathBuf::from("/d/data.luks"),
            format: crate::hypervisor::DiskFormat::Raw,
            read_only: false,
            serial: Some("hsev-data".into()),
        }];
        launch.agent_channel = Some(PathBuf::from("/run/hsev/vm/web-1/agent.sock"));
        let argv = build(&launch, &tcg(), &paths()).expect("builds");
        let devices = values(&argv, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0,serial=hsev-data"));
        assert!(devices.contains(&"virtio-serial-pci,id=agent-bus"));
        assert!(devices
            .contains(&"virtserialport,bus=agent-bus.0,chardev=agent,name=org.hypersev.agent.0"));
        assert!(values(&argv, "-chardev")
            .contains(&"socket,id=agent,path=/run/hsev/vm/web-1/agent.sock,server=on,wait=off"));
        assert!(!devices.iter().any(|device| device.contains("attest")));

        // The attestation port joins it on the same bus.
        launch.attest_channel = Some(PathBuf::from("/run/hsev/vm/web-1/attest.sock"));
        let argv = build(&launch, &tcg(), &paths()).expect("builds");
        let devices = values(&argv, "-device");
        assert_eq!(
            devices
                .iter()
                .filter(|device| device.starts_with("virtio-serial-pci"))
                .count(),
            1
        );
        assert!(devices
            .contains(&"virtserialport,bus=agent-bus.0,chardev=attest,name=org.hypersev.attest.0"));
        assert!(values(&argv, "-chardev")
            .contains(&"socket,id=attest,path=/run/hsev/vm/web-1/attest.sock,server=on,wait=off"));

        launch.disks[0].serial = Some("bad,serial".into());
        assert!(matches!(
            build(&launch, &tcg(), &paths()),
            Err(DriverError::InvalidSpec { field: "disks", .. })
        ));
    }

    #[test]
    fn hypervisor_argv_port_forwards() {
        let mut launch = spec(direct(None), ConfidentialLaunch::None);
        launch.port_forwards = vec![
            PortForward {
                host_port: 2222,
                guest_port: 22,
            },
            PortForward {
                host_port: 8443,
                guest_port: 443,
            },
        ];
        let argv = build(&launch, &tcg(), &paths()).expect("builds");
        assert_eq!(
            values(&argv, "-netdev"),
            ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8443-:443"]
        );
        assert!(values(&argv, "-device").contains(&"virtio-net-pci,netdev=net0,romfile="));

        launch.port_forwards[0].host_port = 0;
        let error = build(&launch, &tcg(), &paths()).expect_err("unresolved");
        assert!(
            matches!(
                error,
                DriverError::InvalidSpec {
                    field: "port_forwards",
                    ..
                }
            ),
            "{error}"
        );
    }

    #[test]
    fn hypervisor_argv_simulated_snp() {
        let launch = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::SimulatedSnp {
                channel_socket: PathBuf::from("/run/hsev/vm/web-1/sim-sp.sock"),
                kernel_hashes_page: Some(KernelHashesPage {
                    path: PathBuf::from("/img/sev-hashes.page"),
                    gpa: 0x81_0000,
                }),
            },
        );
        let argv = build(&launch, &tcg(), &paths()).expect("builds");
        assert_eq!(values(&argv, "-machine"), ["q35"], "no SEV object");
        assert!(!argv.iter().any(|arg| arg.contains("sev-snp-guest")));
        assert_eq!(values(&argv, "-bios"), ["/img/OVMF.fd"]);
        assert_eq!(
            values(&argv, "-chardev")[2],
            "socket,id=simsp,path=/run/hsev/vm/web-1/sim-sp.sock,server=on,wait=off"
        );
        let devices = values(&argv, "-device");
        assert!(devices.contains(&"virtio-serial-pci,id=simsp-bus"));
        assert!(devices
            .contains(&"virtserialport,bus=simsp-bus.0,chardev=simsp,name=org.hypersev.sim-sp.0"));
        assert!(devices.contains(&"loader,file=/img/sev-hashes.page,addr=0x810000,force-raw=on"));
    }

    #[test]
    fn hypervisor_argv_sev_snp_object() {
        let mut host_data = [0u8; 32];
        host_data[0] = 0xab;
        host_data[31] = 0x01;
        let launch = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::SevSnp {
                policy: 0x30000,
                host_data,
                kernel_hashes: true,
                id_block: None,
            },
        );
        let argv = build(&launch, &snp_host(), &paths()).expect("builds");
        assert_eq!(
            values(&argv, "-machine"),
            ["q35,confidential-guest-support=sev0"]
        );
        assert_eq!(values(&argv, "-accel"), ["kvm"]);
        assert_eq!(values(&argv, "-cpu"), ["host"]);
        assert_eq!(
            values(&argv, "-object"),
            ["sev-snp-guest,id=sev0,policy=0x30000,host-data=qwAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE=,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on"]
        );
        assert!(!argv.iter().any(|arg| arg.contains("virtserialport")));
    }

    #[test]
    fn hypervisor_argv_sev_snp_id_block() {
        use base64::Engine;
        use hsev_attestation::id_block::{IdBlock, SignedIdBlock};
        let group =
            openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).expect("P-384");
        let key = openssl::ec::EcKey::generate(&group).expect("key");
        let block = IdBlock {
            launch_digest: [3; 48],
            family_id: [0; 16],
            image_id: [0; 16],
            guest_svn: 1,
            policy: 0x30000,
        };
        let signed = SignedIdBlock::sign(block, &key, Some(&key)).expect("signs");
        let launch = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::SevSnp {
                policy: 0x30000,
                host_data: [0; 32],
                kernel_hashes: true,
                id_block: Some(signed.clone()),
            },
        );
        let argv = build(&launch, &snp_host(), &paths()).expect("builds");
        let object = values(&argv, "-object")[0];
        let field = |name: &str| {
            object
                .split(',')
                .find_map(|part| part.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} in {object}"))
                .to_owned()
        };
        let base64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(
            base64.decode(field("id-block")).expect("base64"),
            block.to_bytes()
        );
        assert_eq!(
            base64.decode(field("id-auth")).expect("base64"),
            signed.auth_bytes()
        );
        assert_eq!(field("author-key-enabled"), "on");
    }

    #[test]
    fn hypervisor_argv_sev_and_sev_es_objects() {
        let launch = spec(
            direct(Some("/img/OVMF.fd")),
            ConfidentialLaunch::Sev {
                policy: 0x5,
                kernel_hashes: false,
            },
        );
        let argv = build(&launch, &snp_host(), &paths()).expect("builds");
        assert_eq!(
            values(&argv, "-object"),
            ["sev-guest,id=sev0,policy=0x5,cbitpos=51,reduced-phys-bits=1"]
        );

        let mut host = snp_host();
        host.sev.sev_es = false;
        host.sev.reason = "kvm_amd sev_es=N".into();
        let error = build(&launch, &host, &paths()).expect_err("no SEV-ES");
        assert!(
            error
                .to_string()
                .contains("SEV-ES guests: kvm_amd sev_es=N"),
            "{error}"
        );
    }

    #[test]
    fn hypervisor_argv_refuses_what_the_host_cannot_run() {
        let snp = ConfidentialLaunch::SevSnp {
            policy: 0x30000,
            host_data: [0; 32],
            kernel_hashes: true,
            id_block: None,
        };
        // No SNP on this host.
        let error = build(
            &spec(direct(Some("/img/OVMF.fd")), snp.clone()),
            &tcg(),
            &paths(),
        )
        .expect_err("refused");
        assert!(matches!(error, DriverError::Unsupported(_)), "{error}");
        assert!(error.to_string().contains("/dev/sev is absent"), "{error}");
        // SNP needs firmware.
        let error =
            build(&spec(direct(None), snp.clone()), &snp_host(), &paths()).expect_err("refused");
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
        // SNP with TCG (a forced accelerator) is refused, not passed to QEMU.
        let mut host = snp_host();
        host.accelerator = Accelerator::Tcg;
        let error =
            build(&spec(direct(Some("/img/OVMF.fd")), snp), &host, &paths()).expect_err("refused");
        assert!(error.to_string().contains("needs KVM"), "{error}");
    }

    #[test]
    fn hypervisor_argv_validates_fields() {
        let mut launch = spec(direct(None), ConfidentialLaunch::None);
        launch.vcpus = 0;
        let error = build(&launch, &tcg(), &paths()).expect_err("0 vCPUs");
        assert!(matches!(
            error,
            DriverError::InvalidSpec { field: "vcpus", .. }
        ));
        let mut launch = spec(direct(None), ConfidentialLaunch::None);
        launch.name = "a,b".into();
        let argv = build(&launch, &tcg(), &paths()).expect("commas are escaped");
        assert_eq!(values(&argv, "-name"), ["guest=a,,b"]);
    }
}
