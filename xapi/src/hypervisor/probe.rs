//! What this host can run, found by trying, not assumed.
//!
//! The accelerator probe ("auto picks KVM only where a guest can really
//! run") needs all of:
//! 1. `/dev/kvm` opens and answers `KVM_GET_API_VERSION` = 12;
//! 2. the CPU advertises hardware virtualisation (`svm` or `vmx` in
//!    `/proc/cpuinfo`). A paravirtualised nested KVM (such as `kvm_pvm`)
//!    has `/dev/kvm` but no such flag, and runs unmodified Linux or OVMF
//!    only until they reach an instruction its emulator lacks;
//! 3. a test guest runs: one vCPU, put straight into 64-bit long mode with
//!    paging, executes an SSE2 `pxor`, an `out` and a `hlt`. On hardware
//!    virtualisation that is native execution; a KVM that only emulates
//!    (as the paravirtualised nested one does) stops at the `pxor` with an
//!    emulation failure, exactly where Linux and OVMF stop. It takes a few
//!    milliseconds.
//!
//! The outcome of each check goes into the reason string, so "why TCG?" is
//! answered in `hsev host show`, not in a debugging session. A
//! configuration can force `kvm` (still needs `/dev/kvm`) or `tcg`.
//!
//! SEV support is read from the kernel (`kvm_amd` parameters,
//! `KVM_CAP_VM_TYPES`), the CPU (CPUID 0x8000001F: SEV bits, C-bit position,
//! reduced physical bits), `/dev/sev`, and the QEMU binary (`-object help`
//! lists `sev-guest` / `sev-snp-guest`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use super::{Accelerator, AcceleratorSetting, DriverError, SevSupport};

/// What the test guest did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "kebab-case")]
pub enum TestGuest {
    /// Not run (no usable `/dev/kvm`).
    NotRun,
    /// It ran to `hlt` with the expected output.
    Ran,
    /// It stopped early; why.
    Failed(String),
}

/// What KVM looked like on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmFacts {
    /// The device probed.
    pub device: PathBuf,
    /// Why it could not be used, when it could not.
    pub open_error: Option<String>,
    /// `KVM_GET_API_VERSION`.
    pub api_version: Option<i32>,
    /// Loaded KVM vendor modules (`kvm_amd`, `kvm_intel`, `kvm_pvm`, ...).
    pub modules: Vec<String>,
    /// `svm` or `vmx`, when `/proc/cpuinfo` lists one.
    pub cpu_flag: Option<String>,
    /// The test guest.
    pub test_guest: TestGuest,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: Option<u32>,
    /// `KVM_CAP_VM_TYPES` (bit n: VM type n is supported; 2 SEV, 3 SEV-ES,
    /// 4 SNP); 0 when the kernel does not report types.
    pub vm_types: u64,
}

impl KvmFacts {
    /// KVM can run ordinary guests here.
    pub fn runs_guests(&self) -> bool {
        self.open_error.is_none()
            && self.api_version == Some(KVM_API_VERSION)
            && self.cpu_flag.is_some()
            && self.test_guest == TestGuest::Ran
    }

    /// One line on what was found.
    pub fn summary(&self) -> String {
        let device = self.device.display();
        if let Some(error) = &self.open_error {
            return format!("no usable {device} ({error})");
        }
        let modules = if self.modules.is_empty() {
            "no kvm_* module listed".to_owned()
        } else {
            self.modules.join(", ")
        };
        let api = self
            .api_version
            .map_or_else(|| "unknown".to_owned(), |v| v.to_string());
        let mut problems = Vec::new();
        if self.api_version != Some(KVM_API_VERSION) {
            problems.push(format!("KVM API version {api}, not {KVM_API_VERSION}"));
        }
        if self.cpu_flag.is_none() {
            problems.push(
                "no svm/vmx flag in /proc/cpuinfo (a paravirtualised nested KVM, which cannot \
                 run Linux guests)"
                    .to_owned(),
            );
        }
        match &self.test_guest {
            TestGuest::Ran => {}
            TestGuest::NotRun => problems.push("the test guest was not run".to_owned()),
            TestGuest::Failed(why) => problems.push(format!("a long-mode test guest {why}")),
        }
        if problems.is_empty() {
            format!(
                "{device} answers (API {api}, {modules}), the CPU has {}, and a long-mode test \
                 guest ran SSE2 code to hlt",
                self.cpu_flag.as_deref().unwrap_or("?")
            )
        } else {
            format!(
                "{device} answers (API {api}, {modules}) but cannot run guests: {}",
                problems.join("; ")
            )
        }
    }
}

/// `KVM_GET_API_VERSION` of every KVM since Linux 2.6.22.
pub const KVM_API_VERSION: i32 = 12;

/// The accelerator for `setting`, and why.
pub fn choose_accelerator(
    setting: AcceleratorSetting,
    kvm: &KvmFacts,
) -> Result<(Accelerator, String), DriverError> {
    let found = kvm.summary();
    match setting {
        AcceleratorSetting::Auto if kvm.runs_guests() => Ok((Accelerator::Kvm, found)),
        AcceleratorSetting::Auto => Ok((Accelerator::Tcg, found)),
        AcceleratorSetting::Tcg => Ok((
            Accelerator::Tcg,
            format!("forced by configuration; the probe found: {found}"),
        )),
        AcceleratorSetting::Kvm => match &kvm.open_error {
            Some(error) => Err(DriverError::Probe(format!(
                "accelerator kvm is forced by configuration but {} cannot be used: {error}",
                kvm.device.display()
            ))),
            None => Ok((
                Accelerator::Kvm,
                format!("forced by configuration; the probe found: {found}"),
            )),
        },
    }
}

/// Gathers [`KvmFacts`] (opens `device`, runs the test guest).
pub fn kvm_facts(device: &Path) -> KvmFacts {
    let mut facts = KvmFacts {
        device: device.to_path_buf(),
        open_error: None,
        api_version: None,
        modules: kvm_modules(Path::new("/sys/module")),
        cpu_flag: fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| virtualisation_flag(&text)),
        test_guest: TestGuest::NotRun,
        max_vcpus: None,
        vm_types: 0,
    };
    kvm::probe(device, &mut facts);
    facts
}

/// `svm` or `vmx` from `/proc/cpuinfo`'s first `flags` line.
pub fn virtualisation_flag(cpuinfo: &str) -> Option<String> {
    let flags = cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))?
        .split_once(':')?
        .1;
    flags
        .split_whitespace()
        .find(|flag| *flag == "svm" || *flag == "vmx")
        .map(str::to_owned)
}

fn kvm_modules(sys_module: &Path) -> Vec<String> {
    let mut modules: Vec<String> = fs::read_dir(sys_module)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| entry.file_name().into_string().ok())
                .filter(|name| name.starts_with("kvm_"))
                .collect()
        })
        .unwrap_or_default();
    modules.sort();
    modules
}

/// What the kernel, CPU and QEMU say about SEV.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SevFacts {
    /// `/dev/sev` exists.
    pub dev_sev: bool,
    /// `kvm_amd` parameters `sev`, `sev_es`, `sev_snp` (None: absent).
    pub kvm_amd: [Option<bool>; 3],
    /// CPUID 0x8000001F: (EAX, EBX), when the leaf exists.
    pub cpuid: Option<(u32, u32)>,
    /// `KVM_CAP_VM_TYPES`.
    pub vm_types: u64,
    /// QEMU has `sev-guest` / `sev-snp-guest` objects.
    pub qemu_objects: [bool; 2],
}

/// Gathers [`SevFacts`].
pub fn sev_facts(sev_device: &Path, vm_types: u64, qemu_objects: [bool; 2]) -> SevFacts {
    let param = |name: &str| {
        fs::read_to_string(format!("/sys/module/kvm_amd/parameters/{name}"))
            .ok()
            .and_then(|text| match text.trim() {
                "Y" | "y" | "1" => Some(true),
                "N" | "n" | "0" => Some(false),
                _ => None,
            })
    };
    SevFacts {
        dev_sev: sev_device.exists(),
        kvm_amd: [param("sev"), param("sev_es"), param("sev_snp")],
        cpuid: sev_cpuid(),
        vm_types,
        qemu_objects,
    }
}

#[cfg(target_arch = "x86_64")]
fn sev_cpuid() -> Option<(u32, u32)> {
    use core::arch::x86_64::__cpuid;
    let max_extended = __cpuid(0x8000_0000).eax;
    (max_extended >= 0x8000_001f).then(|| {
        let leaf = __cpuid(0x8000_001f);
        (leaf.eax, leaf.ebx)
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn sev_cpuid() -> Option<(u32, u32)> {
    None
}

/// What SEV objects can be passed, given the accelerator chosen.
pub fn sev_support(accelerator: Accelerator, facts: &SevFacts) -> SevSupport {
    let mut missing = Vec::new();
    if accelerator != Accelerator::Kvm {
        missing.push(format!("guests run on {accelerator}, SEV needs KVM"));
    }
    if !facts.dev_sev {
        missing.push("/dev/sev is absent".to_owned());
    }
    let (eax, ebx) = facts.cpuid.unwrap_or((0, 0));
    if eax & 0b10 == 0 {
        missing.push("CPUID 0x8000001F reports no SEV".to_owned());
    }
    let base_ok = missing.is_empty();
    let vm_type = |bit: u32| facts.vm_types == 0 || facts.vm_types & (1 << bit) != 0;
    let mode = |index: usize, cpuid_bit: u32, vm_type_bit: u32, object: usize, name: &str| {
        let mut why = Vec::new();
        if eax & (1 << cpuid_bit) == 0 {
            why.push(format!("CPUID has no {name}"));
        }
        if facts.kvm_amd[index] != Some(true) {
            why.push(format!(
                "kvm_amd {} is not Y",
                ["sev", "sev_es", "sev_snp"][index]
            ));
        }
        if !vm_type(vm_type_bit) {
            why.push(format!("KVM offers no {name} VM type"));
        }
        if !facts.qemu_objects[object] {
            why.push(format!(
                "QEMU has no {} object",
                ["sev-guest", "sev-snp-guest"][object]
            ));
        }
        (why.is_empty(), why)
    };
    let (sev, sev_why) = mode(0, 1, 2, 0, "SEV");
    let (sev_es, es_why) = mode(1, 3, 3, 0, "SEV-ES");
    let (sev_snp, snp_why) = mode(2, 4, 4, 1, "SEV-SNP");
    let cbit = (eax & 0b10 != 0).then_some(ebx & 0x3f);
    let reduced = (eax & 0b10 != 0).then_some((ebx >> 6) & 0x3f);
    if !base_ok {
        return SevSupport {
            sev: false,
            sev_es: false,
            sev_snp: false,
            cbitpos: cbit,
            reduced_phys_bits: reduced,
            max_guests: None,
            max_es_guests: None,
            reason: format!("no SEV: {}", missing.join("; ")),
        };
    }
    let mut reason = Vec::new();
    for (name, ok, why) in [
        ("SEV", sev, sev_why),
        ("SEV-ES", sev_es, es_why),
        ("SEV-SNP", sev_snp, snp_why),
    ] {
        if ok {
            reason.push(format!("{name}: yes"));
        } else {
            reason.push(format!("{name}: no ({})", why.join(", ")));
        }
    }
    SevSupport {
        sev,
        sev_es,
        sev_snp,
        cbitpos: cbit,
        reduced_phys_bits: reduced,
        max_guests: None,
        max_es_guests: None,
        reason: reason.join("; "),
    }
}

/// What the QEMU binary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFacts {
    /// The binary, resolved.
    pub binary: PathBuf,
    /// Its `--version` first line.
    pub version: String,
    /// It has `sev-guest` / `sev-snp-guest` objects.
    pub sev_objects: [bool; 2],
}

/// Finds `binary` (a bare name is looked up in `PATH`) and asks its
/// version and objects.
pub fn qemu_facts(binary: &Path) -> Result<QemuFacts, DriverError> {
    let resolved = resolve_binary(binary).ok_or_else(|| DriverError::VmmMissing {
        binary: binary.to_path_buf(),
    })?;
    let run = |args: &[&str]| {
        Command::new(&resolved)
            .args(args)
            .output()
            .map_err(|error| DriverError::io(format!("running {}", resolved.display()), error))
    };
    let version = run(&["--version"])?;
    if !version.status.success() {
        return Err(DriverError::Probe(format!(
            "{} --version: {}",
            resolved.display(),
            String::from_utf8_lossy(&version.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned();
    let objects = run(&["-object", "help"])?;
    let objects = String::from_utf8_lossy(&objects.stdout);
    let has = |name: &str| objects.lines().any(|line| line.trim() == name);
    Ok(QemuFacts {
        binary: resolved,
        version,
        sev_objects: [has("sev-guest"), has("sev-snp-guest")],
    })
}

/// `binary` itself when it has a `/`, else the first match in `PATH`.
pub fn resolve_binary(binary: &Path) -> Option<PathBuf> {
    if binary.components().count() > 1 || binary.is_absolute() {
        return binary.is_file().then(|| binary.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|candidate| candidate.is_file())
    })
}

/// Host CPUs usable by this process.
pub fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |count| u32::try_from(count.get()).unwrap_or(u32::MAX))
}

/// `MemTotal` and `MemAvailable` from `/proc/meminfo`, in MiB.
pub fn host_memory_mib() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    (
        meminfo_mib(&text, "MemTotal").unwrap_or(0),
        meminfo_mib(&text, "MemAvailable").unwrap_or(0),
    )
}

/// One `/proc/meminfo` value (kB) in MiB.
pub fn meminfo_mib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if name.trim() != key {
            return None;
        }
        let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
        Some(kib / 1024)
    })
}

/// The KVM part of the probe: open, API version, capabilities, test guest.
mod kvm {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::{Kvm, VcpuExit};

    use super::{KvmFacts, TestGuest};

    const PAGE: usize = 4096;
    /// Guest pages: 0 unused, 1 PML4, 2 PDPT, 3 PD, 4 code.
    const PAGES: usize = 5;
    const CODE_GPA: u64 = 0x4000;
    const TEST_PORT: u16 = 0x10;
    const TEST_VALUE: u8 = 0x2a;

    /// `pxor xmm0, xmm0; mov al, 0x2a; mov dx, 0x10; out dx, al; hlt`.
    const CODE: [u8; 13] = [
        0x66, 0x0f, 0xef, 0xc0, // pxor xmm0, xmm0 (SSE2)
        0xb0, TEST_VALUE, // mov al, 0x2a
        0x66, 0xba, 0x10, 0x00, // mov dx, 0x10
        0xee, // out dx, al
        0xf4, // hlt
        0xf4, // hlt
    ];

    #[repr(C, align(4096))]
    struct Page([u8; PAGE]);

    pub(super) fn probe(device: &Path, facts: &mut KvmFacts) {
        let Ok(path) = CString::new(device.as_os_str().as_bytes()) else {
            facts.open_error = Some("the path holds a NUL byte".to_owned());
            return;
        };
        let kvm = match Kvm::new_with_path(&path) {
            Ok(kvm) => kvm,
            Err(error) => {
                facts.open_error = Some(error.to_string());
                return;
            }
        };
        facts.api_version = Some(kvm.get_api_version());
        facts.max_vcpus = u32::try_from(kvm.get_max_vcpus()).ok();
        // KVM_CAP_VM_TYPES (Linux 6.10+): a bit mask of VM types.
        facts.vm_types =
            u64::try_from(kvm.check_extension_raw(u64::from(kvm_bindings::KVM_CAP_VM_TYPES)))
                .unwrap_or(0);
        if facts.api_version != Some(super::KVM_API_VERSION) {
            return;
        }
        facts.test_guest = match run_test_guest(&kvm) {
            Ok(()) => TestGuest::Ran,
            Err(why) => TestGuest::Failed(why),
        };
    }

    fn run_test_guest(kvm: &Kvm) -> Result<(), String> {
        let mut memory: Box<[Page; PAGES]> = Box::new(std::array::from_fn(|_| Page([0; PAGE])));
        // 4-level paging: PML4[0] -> PDPT[0] -> PD[0] = a 2 MiB page at 0.
        memory[1].0[..8].copy_from_slice(&(0x2000u64 | 0b11).to_le_bytes());
        memory[2].0[..8].copy_from_slice(&(0x3000u64 | 0b11).to_le_bytes());
        memory[3].0[..8].copy_from_slice(&(0x83u64).to_le_bytes());
        memory[4].0[..CODE.len()].copy_from_slice(&CODE);

        let vm = kvm
            .create_vm()
            .map_err(|error| format!("could not be created: KVM_CREATE_VM: {error}"))?;
        register_memory(&vm, &mut memory)?;
        let mut vcpu = vm
            .create_vcpu(0)
            .map_err(|error| format!("could not be created: KVM_CREATE_VCPU: {error}"))?;
        if let Ok(cpuid) = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES) {
            vcpu.set_cpuid2(&cpuid)
                .map_err(|error| format!("could not be set up: KVM_SET_CPUID2: {error}"))?;
        }
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|error| format!("could not be set up: KVM_GET_SREGS: {error}"))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0b1011,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data = kvm_segment {
            selector: 0x10,
            type_: 0b0011,
            db: 1,
            l: 0,
            ..code
        };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.cr3 = 0x1000;
        // PAE, OSFXSR, OSXMMEXCPT.
        sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);
        // PE, MP, ET, NE, PG.
        sregs.cr0 = 0x8000_0033;
        // LME, LMA.
        sregs.efer = 0x500;
        vcpu.set_sregs(&sregs)
            .map_err(|error| format!("could not be set up: KVM_SET_SREGS: {error}"))?;
        let mut regs = vcpu
            .get_regs()
            .map_err(|error| format!("could not be set up: KVM_GET_REGS: {error}"))?;
        regs.rip = CODE_GPA;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs)
            .map_err(|error| format!("could not be set up: KVM_SET_REGS: {error}"))?;

        let mut wrote = false;
        // Straight-line code, no interrupt controller: a handful of exits.
        for _ in 0..4 {
            match vcpu.run() {
                Ok(VcpuExit::IoOut(TEST_PORT, [TEST_VALUE])) => wrote = true,
                Ok(VcpuExit::Hlt) if wrote => return Ok(()),
                Ok(VcpuExit::InternalError) => {
                    return Err(
                        "stopped with a KVM internal error (emulation failure) at an SSE2 \
                         instruction"
                            .to_owned(),
                    )
                }
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Err(format!(
                        "could not enter long mode (FAIL_ENTRY {reason:#x})"
                    ))
                }
                Ok(VcpuExit::Shutdown) => return Err("triple-faulted".to_owned()),
                Ok(other) => return Err(format!("stopped with an unexpected exit: {other:?}")),
                Err(error) => return Err(format!("stopped: KVM_RUN: {error}")),
            }
        }
        Err("never reached hlt".to_owned())
    }

    #[allow(unsafe_code)]
    fn register_memory(
        vm: &kvm_ioctls::VmFd,
        memory: &mut Box<[Page; PAGES]>,
    ) -> Result<(), String> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: (PAGES * PAGE) as u64,
            userspace_addr: memory.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is one page-aligned heap allocation of exactly
        // `memory_size` bytes, and it outlives the VM: `run_test_guest`
        // declares `memory` before `vm`, so the VM (and its vCPU) is
        // dropped, and the slot gone, before the memory is freed.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|error| format!("could not be set up: KVM_SET_USER_MEMORY_REGION: {error}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flag: Option<&str>, guest: TestGuest, modules: &[&str]) -> KvmFacts {
        KvmFacts {
            device: PathBuf::from("/dev/kvm"),
            open_error: None,
            api_version: Some(12),
            modules: modules.iter().map(|m| (*m).to_owned()).collect(),
            cpu_flag: flag.map(str::to_owned),
            test_guest: guest,
            max_vcpus: Some(1024),
            vm_types: 0b11111,
        }
    }

    #[test]
    fn hypervisor_probe_auto_picks_kvm_on_a_real_host() {
        let host = facts(Some("svm"), TestGuest::Ran, &["kvm_amd"]);
        let (accelerator, reason) =
            choose_accelerator(AcceleratorSetting::Auto, &host).expect("chosen");
        assert_eq!(accelerator, Accelerator::Kvm);
        assert!(reason.contains("the CPU has svm"), "{reason}");
        assert!(reason.contains("kvm_amd"), "{reason}");
    }

    #[test]
    fn hypervisor_probe_auto_refuses_paravirtualised_kvm() {
        let host = facts(
            None,
            TestGuest::Failed(
                "stopped with a KVM internal error (emulation failure) at an SSE2 instruction"
                    .into(),
            ),
            &["kvm_pvm"],
        );
        let (accelerator, reason) =
            choose_accelerator(AcceleratorSetting::Auto, &host).expect("chosen");
        assert_eq!(accelerator, Accelerator::Tcg);
        assert!(
            reason.contains("no svm/vmx flag in /proc/cpuinfo"),
            "{reason}"
        );
        assert!(reason.contains("kvm_pvm"), "{reason}");
        assert!(reason.contains("emulation failure"), "{reason}");
        // A flag without a working test guest is not enough either.
        let host = facts(Some("vmx"), TestGuest::Failed("triple-faulted".into()), &[]);
        let (accelerator, _) = choose_accelerator(AcceleratorSetting::Auto, &host).expect("chosen");
        assert_eq!(accelerator, Accelerator::Tcg);
    }

    #[test]
    fn hypervisor_probe_forced_settings() {
        let pvm = facts(None, TestGuest::Failed("x".into()), &["kvm_pvm"]);
        let (accelerator, reason) =
            choose_accelerator(AcceleratorSetting::Kvm, &pvm).expect("forced");
        assert_eq!(accelerator, Accelerator::Kvm);
        assert!(reason.starts_with("forced by configuration"), "{reason}");
        let real = facts(Some("svm"), TestGuest::Ran, &["kvm_amd"]);
        let (accelerator, _) = choose_accelerator(AcceleratorSetting::Tcg, &real).expect("forced");
        assert_eq!(accelerator, Accelerator::Tcg);

        let mut absent = facts(None, TestGuest::NotRun, &[]);
        absent.open_error = Some("No such file or directory (os error 2)".into());
        absent.api_version = None;
        let (accelerator, reason) =
            choose_accelerator(AcceleratorSetting::Auto, &absent).expect("auto");
        assert_eq!(accelerator, Accelerator::Tcg);
        assert!(reason.starts_with("no usable /dev/kvm"), "{reason}");
        let error = choose_accelerator(AcceleratorSetting::Kvm, &absent).expect_err("forced");
        assert!(
            error.to_string().contains("forced by configuration"),
            "{error}"
        );
    }

    #[test]
    fn hypervisor_probe_parses_cpuinfo_and_meminfo() {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu vme svm_lock sse2 svm npt\n";
        assert_eq!(virtualisation_flag(cpuinfo).as_deref(), Some("svm"));
        assert_eq!(virtualisation_flag("flags : fpu hypervisor\n"), None);
        let meminfo = "MemTotal:       24576000 kB\nMemFree: 1 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(meminfo_mib(meminfo, "MemTotal"), Some(24_000));
        assert_eq!(meminfo_mib(meminfo, "MemAvailable"), Some(20_000));
        assert_eq!(meminfo_mib(meminfo, "SwapTotal"), None);
    }

    #[test]
    fn hypervisor_probe_sev_support() {
        // An SNP host: CPUID SEV|SEV-ES|SNP, C-bit 51, 1 reduced bit.
        let snp_host = SevFacts {
            dev_sev: true,
            kvm_amd: [Some(true), Some(true), Some(true)],
            cpuid: Some((0b1_1010, 51 | (1 << 6))),
            vm_types: 0b1_1101,
            qemu_objects: [true, true],
        };
        let support = sev_support(Accelerator::Kvm, &snp_host);
        assert!(
            support.sev && support.sev_es && support.sev_snp,
            "{support:?}"
        );
        assert_eq!(support.cbitpos, Some(51));
        assert_eq!(support.reduced_phys_bits, Some(1));

        let no_snp = SevFacts {
            kvm_amd: [Some(true), Some(true), Some(false)],
            ..snp_host.clone()
        };
        let support = sev_support(Accelerator::Kvm, &no_snp);
        assert!(support.sev && !support.sev_snp);
        assert!(
            support.reason.contains("kvm_amd sev_snp is not Y"),
            "{}",
            support.reason
        );

        let support = sev_support(Accelerator::Tcg, &SevFacts::default());
        assert!(!support.sev && !support.sev_es && !support.sev_snp);
        assert!(
            support.reason.contains("SEV needs KVM"),
            "{}",
            support.reason
        );
        assert!(
            support.reason.contains("/dev/sev is absent"),
            "{}",
            support.reason
        );
    }

    /// The real probe on this host: fast, and consistent with the CPU flags.
    #[test]
    fn hypervisor_probe_kvm_on_this_host() {
        let started = std::time::Instant::now();
        let kvm = kvm_facts(Path::new("/dev/kvm"));
        let elapsed = started.elapsed();
        let (accelerator, reason) =
            choose_accelerator(AcceleratorSetting::Auto, &kvm).expect("auto never fails");
        println!("KVM probe in {elapsed:?}: {accelerator}: {reason}");
        println!("facts: {kvm:?}");
        if kvm.cpu_flag.is_none() {
            assert_eq!(accelerator, Accelerator::Tcg, "{reason}");
        }
        if Path::new("/dev/kvm").exists() && kvm.open_error.is_none() {
            assert_ne!(kvm.test_guest, TestGuest::NotRun);
        }
    }
}
