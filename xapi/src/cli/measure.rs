//! `hsev measure`: the launch measurement of an SEV, SEV-ES or SEV-SNP guest,
//! with the flags, defaults, output and exit codes of sev-snp-measure 0.0.13.
//!
//! This module only translates: it reads the files, checks the flags in the
//! reference's order, calls [`hsev_attestation::measurement`] on the bytes,
//! and prints. Usage errors exit 2 (like argparse), failed calculations
//! print `Error: ...` and exit 1 (like the reference's `cli.py`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use clap::builder::PossibleValuesParser;
use clap::error::ErrorKind;
use clap::{Args, ValueEnum};
use hsev_attestation::measurement::{
    self, cpu_sig, vcpu_sig_for_type, DirectBoot, MeasurementError, OvmfImage, SevEsLaunch,
    SnpLaunch, SvsmImage, SvsmLaunch, VmmType, VmsaPages, CPU_SIGS, LAUNCH_DIGEST_SIZE,
};

const AFTER_HELP: &str = "\
snp:svsm mode: AMD SEV-SNP with Coconut-SVSM; additionally requires --svsm and either \
--vars-file or --vars-size.

Flags, defaults and output follow sev-snp-measure 0.0.13. One deliberate divergence: in the \
snp, snp:ovmf-hash and snp:svsm modes, firmware without the OVMF footer table or without SEV \
metadata (e.g. Debian's OVMF_CODE_4M.fd) is refused, where sev-snp-measure prints a digest that \
no SEV-SNP launch of that firmware can produce. Where sev-snp-measure stops with a Python \
traceback (exit 1), hsev prints 'Error: ...' and exits 1.";

/// Arguments of `hsev measure` (those of sev-snp-measure).
#[derive(Debug, Args)]
// Like argparse: a repeated flag overrides, and a long flag may be shortened
// to any unambiguous prefix.
#[command(args_override_self = true, infer_long_args = true, after_help = AFTER_HELP)]
pub struct MeasureArgs {
    /// Print the mode name with the measurement
    #[arg(short, long)]
    verbose: bool,

    /// Guest mode
    #[arg(long, value_enum, required = true)]
    mode: Mode,

    /// Number of guest vcpus
    #[arg(long, value_name = "N", value_parser = parse_int, allow_negative_numbers = true)]
    vcpus: Option<i64>,

    /// Type of guest vcpu
    #[arg(long, value_name = "CPUTYPE", value_parser = vcpu_type_parser())]
    vcpu_type: Option<String>,

    /// Guest vcpu signature value (decimal, 0x hex, 0o octal or 0b binary)
    #[arg(long, value_name = "VALUE", value_parser = parse_auto_base_int, allow_negative_numbers = true)]
    vcpu_sig: Option<AutoInt>,

    /// Guest vcpu family
    #[arg(long, value_name = "FAMILY", value_parser = parse_int, allow_negative_numbers = true)]
    vcpu_family: Option<i64>,

    /// Guest vcpu model
    #[arg(long, value_name = "MODEL", value_parser = parse_int, allow_negative_numbers = true)]
    vcpu_model: Option<i64>,

    /// Guest vcpu stepping
    #[arg(long, value_name = "STEPPING", value_parser = parse_int, allow_negative_numbers = true)]
    vcpu_stepping: Option<i64>,

    /// Type of guest vmm (QEMU, ec2, gce)
    #[arg(long, value_name = "VMMTYPE", default_value = "QEMU")]
    vmm_type: String,

    /// OVMF file to calculate hash from
    #[arg(long, value_name = "PATH", required = true)]
    ovmf: PathBuf,

    /// Kernel file to calculate hash from
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,

    /// Initrd file to calculate hash from (use with --kernel)
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,

    /// Kernel command line to calculate hash from (use with --kernel)
    #[arg(long, value_name = "CMDLINE", allow_hyphen_values = true)]
    append: Option<String>,

    /// Hex representation of the guest kernel features expected to be
    /// included (defaults to 0x1)
    #[arg(
        long,
        value_name = "VALUE",
        default_value = "0x1",
        value_parser = parse_auto_base_int,
        allow_negative_numbers = true
    )]
    guest_features: AutoInt,

    /// Measurement output format
    #[arg(long, value_enum, default_value_t = OutputFormat::Hex)]
    output_format: OutputFormat,

    /// Precalculated hash of the OVMF binary (hex string)
    #[arg(long, value_name = "HASH")]
    snp_ovmf_hash: Option<String>,

    /// Write measured VMSAs to vmsa<N>.bin (seves, snp, and snp:svsm modes only)
    #[arg(long)]
    dump_vmsa: bool,

    /// SVSM binary
    #[arg(long, value_name = "PATH", help_heading = "snp:svsm Mode")]
    svsm: Option<PathBuf>,

    /// Size of the OVMF_VARS file in bytes (conflicts with --vars-file)
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_int,
        allow_negative_numbers = true,
        conflicts_with = "vars_file",
        help_heading = "snp:svsm Mode"
    )]
    vars_size: Option<i64>,

    /// OVMF_VARS file (conflicts with --vars-size)
    #[arg(long, value_name = "PATH", help_heading = "snp:svsm Mode")]
    vars_file: Option<PathBuf>,
}

/// The guest modes, named as on the reference's command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// AMD SEV
    Sev,
    /// AMD SEV-ES
    Seves,
    /// AMD SEV-SNP
    Snp,
    /// The SEV-SNP launch digest after the OVMF pages alone
    #[value(name = "snp:ovmf-hash")]
    SnpOvmfHash,
    /// AMD SEV-SNP with Coconut-SVSM
    #[value(name = "snp:svsm")]
    SnpSvsm,
}

impl Mode {
    /// The `--mode` value.
    fn flag(self) -> &'static str {
        match self {
            Mode::Sev => "sev",
            Mode::Seves => "seves",
            Mode::Snp => "snp",
            Mode::SnpOvmfHash => "snp:ovmf-hash",
            Mode::SnpSvsm => "snp:svsm",
        }
    }

    /// The reference's `SevMode` name, printed by `--verbose`.
    fn sev_mode_name(self) -> &'static str {
        match self {
            Mode::Sev => "SEV",
            Mode::Seves => "SEV_ES",
            Mode::Snp | Mode::SnpOvmfHash => "SEV_SNP",
            Mode::SnpSvsm => "SEV_SNP_SVSM",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Hex,
    Base64,
}

/// A Python `int` parsed from the command line: its value modulo 2^64,
/// whether it is non-zero (Python's truthiness), and its exact value when
/// it fits an `i64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PyInt {
    wrapped: u64,
    nonzero: bool,
    exact: Option<i64>,
}

/// An `int(text, 0)` flag stored in a `c_uint64` VMSA field: its value
/// modulo 2^64, and whether it was non-zero (a value of 2^64 is "set").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AutoInt {
    wrapped: u64,
    nonzero: bool,
}

/// `int(text)`: decimal, with optional sign, surrounding whitespace and
/// single underscores between digits; limited to 64 bits (beyond, the
/// reference would loop for ages or overflow anyway).
fn parse_int(text: &str) -> Result<i64, String> {
    let value =
        parse_python_int(text, false).ok_or_else(|| format!("invalid int value: '{text}'"))?;
    value
        .exact
        .ok_or_else(|| format!("int value out of the 64-bit range: '{text}'"))
}

/// `int(text, 0)`: like [`parse_int`], plus the `0x`, `0o` and `0b`
/// prefixes; a decimal other than zero cannot start with 0.
fn parse_auto_base_int(text: &str) -> Result<AutoInt, String> {
    let value =
        parse_python_int(text, true).ok_or_else(|| format!("invalid int value: '{text}'"))?;
    Ok(AutoInt {
        wrapped: value.wrapped,
        nonzero: value.nonzero,
    })
}

fn parse_python_int(text: &str, auto_base: bool) -> Option<PyInt> {
    let text = text.trim();
    let (negative, text) = match text.as_bytes().first() {
        Some(b'-') => (true, text.get(1..)?),
        Some(b'+') => (false, text.get(1..)?),
        _ => (false, text),
    };
    let lower_prefix = text.get(..2).map(str::to_ascii_lowercase);
    let (radix, digits, prefixed) = match lower_prefix.as_deref() {
        Some("0x") if auto_base => (16, text.get(2..)?, true),
        Some("0o") if auto_base => (8, text.get(2..)?, true),
        Some("0b") if auto_base => (2, text.get(2..)?, true),
        _ => (10, text, false),
    };
    // After a prefix one underscore may lead; otherwise they only separate.
    let digits = match digits.strip_prefix('_') {
        Some(rest) if prefixed => rest,
        _ => digits,
    };
    let mut wrapped = 0u64;
    let mut magnitude = Some(0u128);
    let mut nonzero = false;
    let mut previous_underscore = true; // no leading underscore
    let mut first_digit = None;
    for c in digits.chars() {
        if c == '_' {
            if previous_underscore {
                return None;
            }
            previous_underscore = true;
            continue;
        }
        previous_underscore = false;
        let digit = c.to_digit(radix)?;
        first_digit.get_or_insert(digit);
        nonzero |= digit != 0;
        wrapped = wrapped
            .wrapping_mul(u64::from(radix))
            .wrapping_add(u64::from(digit));
        magnitude = magnitude
            .and_then(|m| m.checked_mul(u128::from(radix)))
            .and_then(|m| m.checked_add(u128::from(digit)));
    }
    if previous_underscore || first_digit.is_none() {
        return None;
    }
    // int(s, 0) refuses decimal literals with leading zeros ("010").
    if auto_base && !prefixed && first_digit == Some(0) && nonzero {
        return None;
    }
    let exact = magnitude
        .and_then(|m| i128::try_from(m).ok())
        .map(|m| if negative { -m } else { m })
        .and_then(|value| i64::try_from(value).ok());
    Some(PyInt {
        wrapped: if negative {
            wrapped.wrapping_neg()
        } else {
            wrapped
        },
        nonzero,
        exact,
    })
}

fn vcpu_type_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(CPU_SIGS.map(|(name, _)| name))
}

/// How `hsev measure` fails.
enum Failure {
    /// A usage error, reported like clap's own (exit 2).
    Usage(String),
    /// A failed calculation (exit 1).
    Error(String),
}

impl From<MeasurementError> for Failure {
    fn from(error: MeasurementError) -> Self {
        Failure::Error(error.to_string())
    }
}

/// Runs `hsev measure`: prints the measurement and exits 0, or reports a
/// usage error (exit 2) or a calculation error (exit 1).
pub fn run(args: &MeasureArgs) -> ExitCode {
    match measure(args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(Failure::Usage(message)) => {
            let mut command =
                MeasureArgs::augment_args(clap::Command::new("measure")).bin_name("hsev measure");
            // A failure to write to stderr leaves nothing else to report.
            let _ = command.error(ErrorKind::ArgumentConflict, message).print();
            ExitCode::from(2)
        }
        Err(Failure::Error(message)) => {
            eprintln!("Error: {message}");
            ExitCode::from(1)
        }
    }
}

/// The reference's `main()`: checks in its order, then calculates.
fn measure(args: &MeasureArgs) -> Result<String, Failure> {
    let ovmf_path = args.ovmf.as_path();
    if args.mode == Mode::SnpOvmfHash {
        let data = read_file("OVMF", ovmf_path)?;
        let ovmf = OvmfImage::parse(&data)?;
        // Always hex and never verbose, as in the reference.
        return Ok(hex::encode(measurement::snp_ovmf_hash(&ovmf)?));
    }
    if is_set(args.initrd.as_deref()) && args.kernel.is_none() {
        return Err(Failure::Usage(
            "--kernel required when using --initrd".into(),
        ));
    }
    if args.append.as_deref().is_some_and(|a| !a.is_empty()) && args.kernel.is_none() {
        return Err(Failure::Usage(
            "--kernel required when using --append".into(),
        ));
    }
    if args.mode != Mode::Sev && args.vcpus.is_none() {
        return Err(Failure::Usage(format!(
            "missing --vcpus N in guest mode '{}'",
            args.mode.flag()
        )));
    }
    let vmm = VmmType::from_name(&args.vmm_type)
        .ok_or_else(|| Failure::Usage(format!("unknown VMM type '{}'", args.vmm_type)))?;
    // None only outside QEMU, whose VMSAs do not carry the signature.
    let vcpu_sig = vcpu_sig(args, vmm)?.unwrap_or(0);
    let vars_size = if args.mode == Mode::SnpSvsm {
        svsm_vars_size(args)?
    } else {
        0
    };
    if args.dump_vmsa && args.mode == Mode::Sev {
        return Err(Failure::Usage(
            "--dump-vmsa is not available in the selected mode".into(),
        ));
    }
    let ovmf_hash = args
        .snp_ovmf_hash
        .as_deref()
        .filter(|hash| !hash.is_empty());
    if ovmf_hash.is_some() && args.mode != Mode::Snp {
        return Err(Failure::Error("SNP OVMF hash only works with SNP".into()));
    }
    // range(negative) is empty.
    let vcpus = args.vcpus.map_or(0, |vcpus| {
        usize::try_from(vcpus.max(0)).unwrap_or(usize::MAX)
    });

    if args.mode == Mode::SnpSvsm && vmm != VmmType::Qemu {
        return Err(Failure::Error(
            "SVSM mode is only implemented for QEMU".into(),
        ));
    }

    let ovmf_data = read_file("OVMF", ovmf_path)?;
    let ovmf = OvmfImage::parse(&ovmf_data)?;
    let (digest, vmsas): (Vec<u8>, Option<VmsaPages>) = match args.mode {
        Mode::Snp => {
            let ovmf_hash = ovmf_hash.map(parse_ovmf_hash).transpose()?;
            let boot = DirectBootFiles::read(args)?;
            let measured = measurement::snp_launch_digest(&SnpLaunch {
                ovmf: &ovmf,
                vcpus,
                vcpu_sig,
                guest_features: args.guest_features.wrapped,
                vmm,
                direct_boot: boot.as_ref().map(DirectBootFiles::direct_boot),
                ovmf_hash,
            })?;
            (measured.launch_digest.to_vec(), Some(measured.vmsas))
        }
        Mode::Seves => {
            let boot = DirectBootFiles::read(args)?;
            let measured = measurement::seves_launch_digest(&SevEsLaunch {
                ovmf: &ovmf,
                vcpus,
                vcpu_sig,
                vmm,
                direct_boot: boot.as_ref().map(DirectBootFiles::direct_boot),
            })?;
            (measured.launch_digest.to_vec(), Some(measured.vmsas))
        }
        Mode::Sev => {
            let boot = DirectBootFiles::read(args)?;
            let direct_boot = boot.as_ref().map(DirectBootFiles::direct_boot);
            let digest = measurement::sev_launch_digest(&ovmf, direct_boot.as_ref())?;
            (digest.to_vec(), None)
        }
        Mode::SnpSvsm => {
            let svsm_path = args
                .svsm
                .as_deref()
                .ok_or_else(|| Failure::Error("snp:svsm mode requires --svsm PATH".into()))?;
            let svsm_data = read_file("SVSM", svsm_path)?;
            let svsm = SvsmImage::parse(&svsm_data, &ovmf, vars_size)?;
            let measured = measurement::svsm_launch_digest(&SvsmLaunch {
                ovmf: &ovmf,
                svsm: &svsm,
                vcpus,
                vcpu_sig,
            })?;
            (measured.launch_digest.to_vec(), Some(measured.vmsas))
        }
        // Handled first, as in the reference; measured the same way here.
        Mode::SnpOvmfHash => (measurement::snp_ovmf_hash(&ovmf)?.to_vec(), None),
    };
    if args.dump_vmsa {
        if let Some(vmsas) = &vmsas {
            dump_vmsas(vmsas)?;
        }
    }
    let text = match args.output_format {
        OutputFormat::Hex => hex::encode(&digest),
        OutputFormat::Base64 => base64::engine::general_purpose::STANDARD.encode(&digest),
    };
    Ok(if args.verbose {
        format!(
            "Calculated {} guest measurement: {text}",
            args.mode.sev_mode_name()
        )
    } else {
        text
    })
}

/// The reference's `get_vcpu_sig`: the first of family/model/stepping,
/// `--vcpu-sig`, `--vcpu-type` that is set (zero counts as unset).
fn vcpu_sig(args: &MeasureArgs, vmm: VmmType) -> Result<Option<u64>, Failure> {
    if args.mode == Mode::Sev {
        return Ok(Some(0));
    }
    if let Some(family) = args.vcpu_family.filter(|family| *family != 0) {
        let (Some(model), Some(stepping)) = (args.vcpu_model, args.vcpu_stepping) else {
            // The reference stops with a TypeError here.
            return Err(Failure::Error(
                "--vcpu-family requires --vcpu-model and --vcpu-stepping".into(),
            ));
        };
        return Ok(Some(cpu_sig(family, model, stepping)));
    }
    if let Some(sig) = args.vcpu_sig.filter(|sig| sig.nonzero) {
        return Ok(Some(sig.wrapped));
    }
    if let Some(name) = &args.vcpu_type {
        return vcpu_sig_for_type(name)
            .map(|sig| Some(u64::from(sig)))
            .ok_or_else(|| Failure::Usage(format!("unknown vcpu type '{name}'")));
    }
    if vmm == VmmType::Qemu {
        return Err(Failure::Usage(format!(
            "missing --vcpu-type or --vcpu-sig or --vcpu-family in guest mode '{}'",
            args.mode.flag()
        )));
    }
    Ok(None)
}

/// The OVMF variable store size of `snp:svsm` mode.
fn svsm_vars_size(args: &MeasureArgs) -> Result<u64, Failure> {
    if let Some(path) = args.vars_file.as_deref().filter(|path| is_set(Some(path))) {
        return std::fs::metadata(path)
            .map(|metadata| metadata.len())
            .map_err(|error| {
                Failure::Error(format!(
                    "cannot read OVMF_VARS file '{}': {error}",
                    path.display()
                ))
            });
    }
    match args.vars_size.filter(|size| *size != 0) {
        Some(size) => u64::try_from(size)
            .map_err(|_| Failure::Usage("--vars-size must not be negative".into())),
        None => Err(Failure::Usage(
            "snp:svsm mode requires --vars-size or --vars-file".into(),
        )),
    }
}

/// `bytes.fromhex`: pairs of hex digits, ASCII whitespace allowed between
/// pairs; then the 48 bytes of a launch digest.
fn parse_ovmf_hash(text: &str) -> Result<[u8; LAUNCH_DIGEST_SIZE], Failure> {
    let invalid = || Failure::Error(format!("--snp-ovmf-hash '{text}' is not a hex string"));
    let mut bytes = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c.is_ascii_whitespace() {
            continue;
        }
        let high = c.to_digit(16).ok_or_else(invalid)?;
        let low = chars
            .next()
            .and_then(|c| c.to_digit(16))
            .ok_or_else(invalid)?;
        bytes.push(u8::try_from(high * 16 + low).map_err(|_| invalid())?);
    }
    let count = bytes.len();
    <[u8; LAUNCH_DIGEST_SIZE]>::try_from(bytes).map_err(|_| {
        Failure::Error(format!(
            "--snp-ovmf-hash must be {LAUNCH_DIGEST_SIZE} bytes ({} hex digits), got {count} bytes",
            2 * LAUNCH_DIGEST_SIZE
        ))
    })
}

/// The files of a direct boot, read when `--kernel` names one.
struct DirectBootFiles {
    kernel: Vec<u8>,
    initrd: Option<Vec<u8>>,
    append: Option<String>,
}

impl DirectBootFiles {
    fn read(args: &MeasureArgs) -> Result<Option<Self>, Failure> {
        // An empty --kernel counts as absent, as in the reference.
        let Some(kernel) = args.kernel.as_deref().filter(|path| is_set(Some(path))) else {
            return Ok(None);
        };
        let kernel = read_file("kernel", kernel)?;
        let initrd = match args.initrd.as_deref().filter(|path| is_set(Some(path))) {
            Some(path) => Some(read_file("initrd", path)?),
            None => None,
        };
        Ok(Some(DirectBootFiles {
            kernel,
            initrd,
            append: args.append.clone(),
        }))
    }

    fn direct_boot(&self) -> DirectBoot<'_> {
        DirectBoot {
            kernel: &self.kernel,
            initrd: self.initrd.as_deref(),
            append: self.append.as_deref(),
        }
    }
}

/// Writes the measured VMSAs to `vmsa<N>.bin` in the working directory.
fn dump_vmsas(vmsas: &VmsaPages) -> Result<(), Failure> {
    for (index, page) in vmsas.iter().enumerate() {
        let name = format!("vmsa{index}.bin");
        std::fs::write(&name, page)
            .map_err(|error| Failure::Error(format!("cannot write {name}: {error}")))?;
    }
    Ok(())
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|error| {
        Failure::Error(format!(
            "cannot read {what} file '{}': {error}",
            path.display()
        ))
    })
}

/// Python truthiness of an optional path argument.
fn is_set(path: Option<&Path>) -> bool {
    path.is_some_and(|path| !path.as_os_str().is_empty())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A failing unwrap is a failing test.
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: MeasureArgs,
    }

    fn int(text: &str, auto: bool) -> Option<(u64, bool, Option<i64>)> {
        parse_python_int(text, auto).map(|v| (v.wrapped, v.nonzero, v.exact))
    }

    #[test]
    fn python_int_parsing() {
        assert_eq!(int("42", false), Some((42, true, Some(42))));
        assert_eq!(int(" +4_2 ", false), Some((42, true, Some(42))));
        assert_eq!(int("-1", false), Some((u64::MAX, true, Some(-1))));
        assert_eq!(int("007", false), Some((7, true, Some(7))));
        assert_eq!(int("0x10", false), None);
        assert_eq!(int("0x10", true), Some((16, true, Some(16))));
        assert_eq!(int("0X_1f", true), Some((31, true, Some(31))));
        assert_eq!(int("0b101", true), Some((5, true, Some(5))));
        assert_eq!(int("0o17", true), Some((15, true, Some(15))));
        assert_eq!(int("007", true), None);
        assert_eq!(int("000", true), Some((0, false, Some(0))));
        assert_eq!(int("0_0", true), Some((0, false, Some(0))));
        for bad in [
            "", "-", "_1", "1_", "1__0", "0x", "0x_", "1 2", "0x1g", "++1",
        ] {
            assert_eq!(int(bad, true), None, "{bad:?}");
        }
        // 2^64 wraps to 0 but stays truthy; beyond i64 there is no exact value.
        assert_eq!(int("18446744073709551616", false), Some((0, true, None)));
        assert_eq!(int("0x1_0000_0000_0000_0001", true), Some((1, true, None)));
        assert!(parse_int("9223372036854775807").is_ok());
        assert!(parse_int("9223372036854775808").is_err());
        assert_eq!(parse_int("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(
            parse_auto_base_int("0xFFFFFFFFFFFFFFFF"),
            Ok(AutoInt {
                wrapped: u64::MAX,
                nonzero: true
            })
        );
        assert_eq!(
            parse_auto_base_int("-0x1"),
            Ok(AutoInt {
                wrapped: u64::MAX,
                nonzero: true
            })
        );
    }

    #[test]
    fn ovmf_hash_parsing() {
        let hex = "ab".repeat(48);
        assert_eq!(parse_ovmf_hash(&hex).ok(), Some([0xab; 48]));
        let spaced = "ab ".repeat(48);
        assert_eq!(parse_ovmf_hash(&spaced).ok(), Some([0xab; 48]));
        assert!(parse_ovmf_hash("abc").is_err());
        assert!(parse_ovmf_hash("a b").is_err());
        assert!(parse_ovmf_hash("abcd").is_err());
    }

    #[test]
    fn flags_and_defaults() {
        let cli = Cli::try_parse_from(["m", "--mode", "snp:ovmf-hash", "--ovmf", "x"]).unwrap();
        assert_eq!(cli.args.mode, Mode::SnpOvmfHash);
        assert_eq!(cli.args.vmm_type, "QEMU");
        assert_eq!(cli.args.guest_features.wrapped, 1);
        assert_eq!(cli.args.output_format, OutputFormat::Hex);
        // Repeated flags: the last wins, as with argparse.
        let cli = Cli::try_parse_from([
            "m", "--mode", "sev", "--mode", "snp", "--ovmf", "x", "--vcpus", "-1",
        ])
        .unwrap();
        assert_eq!(cli.args.mode, Mode::Snp);
        assert_eq!(cli.args.vcpus, Some(-1));
        assert!(
            Cli::try_parse_from(["m", "--mode", "snp", "--ovmf", "x", "--vcpu-type", "epyc"])
                .is_err()
        );
        assert!(Cli::try_parse_from(["m", "--ovmf", "x"]).is_err());
        // Unambiguous prefixes of long flags, as argparse allows.
        let cli = Cli::try_parse_from([
            "m",
            "--mod",
            "snp",
            "--ovm",
            "x",
            "--vcpus",
            "2",
            "--snp-ovmf",
            "ab",
        ])
        .unwrap();
        assert_eq!(cli.args.snp_ovmf_hash.as_deref(), Some("ab"));
        assert!(Cli::try_parse_from(["m", "--mode", "snp", "--ovmf", "x", "--vcpu", "2"]).is_err());
        assert!(Cli::try_parse_from([
            "m",
            "--mode",
            "snp:svsm",
            "--ovmf",
            "x",
            "--vars-size",
            "1",
            "--vars-file",
            "f"
        ])
        .is_err());
    }
}
