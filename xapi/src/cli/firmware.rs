//! `hsev firmware`: the SEV firmware of this host, real or simulated.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use hsev_attestation::firmware::launcher::{launch_snp_guest, GuestArtifacts};
use hsev_attestation::firmware::sev_device::SevDevice;
use hsev_attestation::firmware::simulated::{SimInit, SimulatedFirmware};
use hsev_attestation::firmware::{
    FirmwareError, GuestRequest, GuestResponse, LaunchFinish, LaunchedGuest, PlatformStatus,
    SevFirmware,
};
use hsev_attestation::measurement::{vcpu_sig_for_type, DirectBoot};
use hsev_attestation::report::{AttestationReport, TcbVersion};
use hsev_attestation::{HexBytes, Product};

use super::output::{print_json, InputError, OutputFormat};

/// Firmware commands.
#[derive(Debug, Subcommand)]
pub enum FirmwareCommand {
    /// Show the platform status: SEV/SEV-ES/SNP, firmware version, TCBs,
    /// ASIDs and chip id.
    Status(StatusArgs),
    /// The simulated AMD Secure Processor (hosts without SEV; gives NO
    /// confidentiality).
    #[command(subcommand)]
    Sim(Box<SimCommand>),
}

/// `hsev firmware status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// A simulated platform's folder; without it, the real `/dev/sev`.
    #[arg(long, value_name = "DIR")]
    sim_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev firmware sim ...`.
#[derive(Debug, Subcommand)]
pub enum SimCommand {
    /// Create a simulated platform (chip id, chip secret, its own ARK ->
    /// ASK -> VCEK chain), or change the TCB or ASIDs of an existing one (a
    /// TCB change rotates the VCEK).
    Init(InitArgs),
    /// Launch a guest through the simulated firmware and write the signed
    /// report it gets, with its certificate chain.
    Report(Box<ReportArgs>),
}

/// `hsev firmware sim init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The platform's state folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The product to simulate (default genoa; fixed once created).
    #[arg(long, value_name = "PRODUCT")]
    product: Option<Product>,
    /// The TCB, e.g. `bl=10,tee=0,snp=23,ucode=25` (Turin adds `fmc=N`).
    #[arg(long, value_name = "TCB", value_parser = parse_tcb)]
    tcb: Option<TcbVersion>,
    /// Number of SEV-ES/SNP ASIDs (default 16).
    #[arg(long, value_name = "N")]
    asids: Option<u32>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev firmware sim report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The platform's state folder.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// 64 bytes (128 hex digits) the report binds.
    #[arg(long, value_name = "HEX")]
    report_data: HexBytes<64>,
    /// Take this launch digest as given instead of launching artifacts.
    #[arg(long, value_name = "HEX", conflicts_with_all = ["ovmf", "kernel", "initrd", "append", "vcpus", "vcpu_type"])]
    measurement: Option<HexBytes<48>>,
    /// The OVMF firmware to launch.
    #[arg(long, value_name = "FILE", required_unless_present = "measurement")]
    ovmf: Option<PathBuf>,
    /// A kernel to boot directly (measured through the kernel-hashes page).
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Its initrd.
    #[arg(long, value_name = "FILE", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Its command line.
    #[arg(long, value_name = "CMDLINE", requires = "kernel")]
    append: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", required_unless_present = "measurement")]
    vcpus: Option<usize>,
    /// vCPU type (sev-snp-measure's names, e.g. EPYC-v4).
    #[arg(long, value_name = "TYPE", required_unless_present = "measurement")]
    vcpu_type: Option<String>,
    /// Guest policy (default 0x30000: SMT allowed, no debug, no migration agent).
    #[arg(long, value_name = "HEX", value_parser = parse_hex_u64, default_value = "0x30000")]
    policy: u64,
    /// 32 bytes (64 hex digits) of host data bound at launch.
    #[arg(long, value_name = "HEX")]
    host_data: Option<HexBytes<32>>,
    /// Where to write the raw report.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Where to write vcek.der, ask.pem, ark.pem and sim_roots.pem (the
    /// bundle `hsev attest verify --sim-root` trusts).
    #[arg(long, value_name = "DIR")]
    certs_out: Option<PathBuf>,
}

/// Parses `bl=..,tee=..,snp=..,ucode=..[,fmc=..]`.
fn parse_tcb(text: &str) -> Result<TcbVersion, String> {
    let mut tcb = TcbVersion::default();
    let mut seen = Vec::new();
    for part in text.split(',') {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not NAME=VALUE"))?;
        let value: u8 = value
            .trim()
            .parse()
            .map_err(|_| format!("{name}: {value:?} is not a number 0-255"))?;
        match name.trim() {
            "bl" | "bootloader" => tcb.bootloader = value,
            "tee" => tcb.tee = value,
            "snp" => tcb.snp = value,
            "ucode" | "microcode" => tcb.microcode = value,
            "fmc" => tcb.fmc = Some(value),
            other => {
                return Err(format!(
                    "unknown TCB component {other:?} (bl, tee, snp, ucode, fmc)"
                ))
            }
        }
        seen.push(name.trim().to_owned());
    }
    for required in ["bl", "tee", "snp", "ucode"] {
        let aliases = [
            required,
            if required == "bl" {
                "bootloader"
            } else if required == "ucode" {
                "microcode"
            } else {
                required
            },
        ];
        if !seen.iter().any(|name| aliases.contains(&name.as_str())) {
            return Err(format!("the TCB needs {required}=N"));
        }
    }
    Ok(tcb)
}

fn parse_hex_u64(text: &str) -> Result<u64, String> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    u64::from_str_radix(digits, 16).map_err(|_| format!("{text:?} is not a hexadecimal number"))
}

/// Runs a firmware command.
pub fn run(command: &FirmwareCommand) -> Result<ExitCode, InputError> {
    match command {
        FirmwareCommand::Status(args) => status(args),
        FirmwareCommand::Sim(command) => match command.as_ref() {
            SimCommand::Init(args) => init(args),
            SimCommand::Report(args) => report(args),
        },
    }
}

fn status(args: &StatusArgs) -> Result<ExitCode, InputError> {
    let status = match &args.sim_dir {
        Some(dir) => SimulatedFirmware::open(dir)?.status()?,
        None => SevDevice::open()
            .map_err(|error| {
                InputError(format!(
                    "{error} (for the simulated firmware pass --sim-dir DIR)"
                ))
            })?
            .status()?,
    };
    print_status(&status, args.output)
}

fn print_status(status: &PlatformStatus, output: OutputFormat) -> Result<ExitCode, InputError> {
    match output {
        OutputFormat::Json => print_json(status)?,
        OutputFormat::Text => {
            if status.simulated {
                println!(
                    "SIMULATED AMD Secure Processor: no confidentiality, for development only"
                );
            }
            let on = |enabled: bool| if enabled { "enabled" } else { "disabled" };
            let product = status
                .product
                .map_or_else(|| "unknown".to_owned(), |product| product.to_string());
            println!("product:          {product}");
            println!(
                "SEV / SEV-ES / SNP: {} / {} / {}",
                on(status.sev_enabled),
                on(status.sev_es_enabled),
                on(status.snp_enabled)
            );
            let version = status.firmware_version;
            println!(
                "firmware:         {}.{} build {}",
                version.major, version.minor, version.build
            );
            println!("current TCB:      {}", status.current_tcb);
            println!("reported TCB:     {}", status.reported_tcb);
            println!("committed TCB:    {}", status.committed_tcb);
            let asids = status.asids;
            println!(
                "ASIDs:            {} total, {} SEV, {} SEV-ES/SNP, {} free",
                asids.total, asids.sev_pool, asids.sev_es_snp_pool, asids.free
            );
            if let Some(chip_id) = &status.chip_id {
                println!("chip id:          {}", hex::encode(chip_id));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn init(args: &InitArgs) -> Result<ExitCode, InputError> {
    let existed = args.dir.join("platform.toml").is_file();
    if !existed {
        eprintln!("hsev: generating the simulated platform's RSA-4096 roots (a few seconds)...");
    }
    let options = SimInit {
        product: args.product,
        tcb: args.tcb,
        asids: args.asids,
        rsa_bits: None,
    };
    let firmware = SimulatedFirmware::init(&args.dir, &options)?;
    if args.output == OutputFormat::Text {
        println!(
            "{} simulated platform in {}",
            if existed { "updated" } else { "created" },
            args.dir.display()
        );
    }
    print_status(&firmware.status()?, args.output)
}

fn read(path: &Path) -> Result<Vec<u8>, InputError> {
    std::fs::read(path)
        .map_err(|error| InputError(format!("cannot read {}: {error}", path.display())))
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), InputError> {
    std::fs::write(path, bytes)
        .map_err(|error| InputError(format!("cannot write {}: {error}", path.display())))
}

fn launch(
    args: &ReportArgs,
    firmware: &Arc<SimulatedFirmware>,
    finish: &LaunchFinish,
) -> Result<LaunchedGuest, InputError> {
    if let Some(measurement) = args.measurement {
        return Ok(SimulatedFirmware::launch_with_digest(
            firmware,
            args.policy,
            measurement.0,
            finish,
        )?);
    }
    let missing = |flag: &str| InputError(format!("{flag} is required without --measurement"));
    let ovmf = read(args.ovmf.as_deref().ok_or_else(|| missing("--ovmf"))?)?;
    let kernel = args.kernel.as_deref().map(read).transpose()?;
    let initrd = args.initrd.as_deref().map(read).transpose()?;
    let vcpu_type = args
        .vcpu_type
        .as_deref()
        .ok_or_else(|| missing("--vcpu-type"))?;
    let vcpu_sig = vcpu_sig_for_type(vcpu_type)
        .ok_or_else(|| InputError(format!("unknown vCPU type {vcpu_type:?}")))?;
    let artifacts = GuestArtifacts {
        ovmf: &ovmf,
        direct_boot: kernel.as_deref().map(|kernel| DirectBoot {
            kernel,
            initrd: initrd.as_deref(),
            append: args.append.as_deref(),
        }),
        vcpus: args.vcpus.ok_or_else(|| missing("--vcpus"))?,
        vcpu_sig: u64::from(vcpu_sig),
        guest_features: 1,
    };
    let shared: Arc<dyn SevFirmware> = Arc::clone(firmware) as Arc<dyn SevFirmware>;
    Ok(launch_snp_guest(shared, &artifacts, args.policy, finish)?)
}

fn report(args: &ReportArgs) -> Result<ExitCode, InputError> {
    let firmware = Arc::new(SimulatedFirmware::open(&args.dir)?);
    let finish = LaunchFinish {
        id_block: None,
        host_data: args.host_data.map_or([0; 32], |data| data.0),
    };
    let guest = launch(args, &firmware, &finish)?;
    let request = GuestRequest::ExtendedReport {
        report_data: args.report_data.0,
        vmpl: 0,
    };
    let GuestResponse::ExtendedReport { report, .. } = guest.request(&request)? else {
        return Err(FirmwareError::Device(
            "the firmware answered an extended report request with something else".into(),
        )
        .into());
    };
    let parsed = AttestationReport::from_bytes(&report)?;
    write(&args.out, &report)?;
    if let Some(dir) = &args.certs_out {
        std::fs::create_dir_all(dir)
            .map_err(|error| InputError(format!("cannot create {}: {error}", dir.display())))?;
        let roots = firmware.roots();
        write(&dir.join("vcek.der"), firmware.vcek_der())?;
        let pem = |der: Vec<u8>| {
            openssl::x509::X509::from_der(&der).and_then(|certificate| certificate.to_pem())
        };
        write(&dir.join("ask.pem"), &pem(roots.ask_der()?)?)?;
        write(&dir.join("ark.pem"), &pem(roots.ark_der()?)?)?;
        write(&dir.join("sim_roots.pem"), &roots.bundle_pem()?)?;
    }
    println!(
        "SIMULATED report (no confidentiality): {}",
        args.out.display()
    );
    println!("  launch digest: {}", hex::encode(guest.launch_digest()));
    println!("  report_data:   {}", hex::encode(parsed.report_data));
    println!("  host_data:     {}", hex::encode(parsed.host_data));
    println!("  policy:        {:#x}", parsed.policy.raw());
    println!("  reported TCB:  {}", parsed.reported_tcb);
    if let Some(dir) = &args.certs_out {
        println!(
            "  certificates:  {} (trust sim_roots.pem with `hsev attest verify --sim-root`)",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
