//! `hsev attest`: offline verification of SEV-SNP evidence, report
//! inspection, KDS addresses and the certificate cache.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use hsev_attestation::cache::CertCache;
use hsev_attestation::certs::{
    EndorsementKey, RevocationList, RootOrigin, TrustAnchor, TrustStore,
};
use hsev_attestation::policy::AppraisalPolicy;
use hsev_attestation::report::{AttestationReport, EvidenceCertificate, SigningKey, SnpEvidence};
use hsev_attestation::verifier::{appraise, Appraisal};
use hsev_attestation::{kds, Product};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::output::{print_json, print_tree, InputError, OutputFormat};

/// Attestation commands.
#[derive(Debug, Subcommand)]
pub enum AttestCommand {
    /// Verify a report: exit 0 if genuine and acceptable, 1 if refused (every
    /// reason listed), 2 on a usage or input error.
    Verify(VerifyArgs),
    /// Decode every field of a report.
    Show(ShowArgs),
    /// Print the AMD KDS addresses of the certificates a report needs.
    KdsUrl(KdsUrlArgs),
    /// Manage the offline certificate cache.
    #[command(subcommand)]
    Cache(CacheCommand),
}

/// Where the report comes from, shared by every attest command.
#[derive(Debug, Args)]
pub struct ReportSource {
    /// A raw report (1184 bytes) or Trustee KBS JSON evidence
    /// (`{"attestation_report": ..., "cert_chain": ...}`).
    #[arg(long, value_name = "FILE")]
    report: PathBuf,
    /// The product, for v2 reports (which do not name it).
    #[arg(long, value_name = "PRODUCT")]
    product: Option<Product>,
}

/// `hsev attest verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    source: ReportSource,
    /// The VCEK that signed the report (DER or PEM).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["vlek", "cert_dir"])]
    vcek: Option<PathBuf>,
    /// The VLEK that signed the report (DER or PEM).
    #[arg(long, value_name = "FILE", conflicts_with = "cert_dir")]
    vlek: Option<PathBuf>,
    /// A certificate folder: a flat one holding `vcek.der` or `vlek.der`
    /// (or `.pem`), as `hsev firmware sim report --certs-out` and snpguest
    /// write it, or a certificate cache (`hsev attest cache`); default: the
    /// evidence's own cert_chain, else the default cache.
    #[arg(long, value_name = "DIR")]
    cert_dir: Option<PathBuf>,
    /// A CRL to check the chain against (DER or PEM).
    #[arg(long, value_name = "FILE")]
    crl: Option<PathBuf>,
    /// Also trust this simulated platform's roots (the `sim_roots.pem` of
    /// `hsev firmware sim report --certs-out`), as SIMULATED: its evidence
    /// passes only a policy with `allow_simulated = true`. Repeatable.
    #[arg(long, value_name = "FILE")]
    sim_root: Vec<PathBuf>,
    /// The appraisal policy (TOML); default: the built-in safe policy.
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Judge certificate validity at this time instead of now (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    at: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev attest show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    source: ReportSource,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev attest kds-url`.
#[derive(Debug, Args)]
pub struct KdsUrlArgs {
    #[command(flatten)]
    source: ReportSource,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
}

/// `hsev attest cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Import VCEKs, VLEKs, CRLs and KDS cert_chain files (checked first).
    Import {
        /// Certificate cache folder (default: $HSEV_CERT_CACHE or ~/.cache/hsev/kds).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Files to import.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Copy the cache, or only what one report needs, to another folder.
    Export {
        /// Certificate cache folder.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Target folder.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Export only the certificates this report needs.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// The product, for v2 reports.
        #[arg(long, value_name = "PRODUCT")]
        product: Option<Product>,
    },
    /// List the cache's entries.
    List {
        /// Certificate cache folder.
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
    },
}

/// Runs an attest command.
pub fn run(command: &AttestCommand) -> Result<ExitCode, InputError> {
    match command {
        AttestCommand::Verify(args) => verify(args),
        AttestCommand::Show(args) => show(args),
        AttestCommand::KdsUrl(args) => kds_url(args),
        AttestCommand::Cache(command) => cache(command),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, InputError> {
    std::fs::read(path)
        .map_err(|error| InputError(format!("cannot read {}: {error}", path.display())))
}

/// Reads a raw report or JSON evidence.
fn load_evidence(path: &Path) -> Result<SnpEvidence, InputError> {
    let bytes = read(path)?;
    let context =
        |error: &dyn std::fmt::Display| InputError(format!("{}: {error}", path.display()));
    if bytes.trim_ascii_start().starts_with(b"{") {
        SnpEvidence::from_json(&bytes).map_err(|error| context(&error))
    } else {
        let report = AttestationReport::from_bytes(&bytes).map_err(|error| context(&error))?;
        Ok(SnpEvidence {
            report,
            certificates: Vec::new(),
        })
    }
}

fn product_of(
    source: &ReportSource,
    report: &AttestationReport,
) -> Result<Option<Product>, InputError> {
    match (source.product, report.product()) {
        (Some(given), Some(reported)) if given != reported => Err(InputError(format!(
            "--product {given} contradicts the report, which comes from {reported}"
        ))),
        (given, reported) => Ok(given.or(reported)),
    }
}

/// The endorsement key at the top of a flat certificate folder, for the kind
/// of key that signed `report`: `vcek.der` or `vlek.der` (or `.pem`), the
/// names `hsev firmware sim report --certs-out`, snpguest and AMD's KDS use.
fn flat_folder_key(dir: &Path, report: &AttestationReport) -> Option<PathBuf> {
    let stem = match report.key_info.signing_key {
        SigningKey::Vlek => "vlek",
        SigningKey::Vcek | SigningKey::None => "vcek",
    };
    ["der", "pem"]
        .iter()
        .map(|extension| dir.join(format!("{stem}.{extension}")))
        .find(|path| path.is_file())
}

/// The endorsement keys and CRL the evidence carries (its cert_chain).
pub(crate) fn evidence_endorsement(
    evidence: &SnpEvidence,
) -> Result<(Vec<EndorsementKey>, Option<RevocationList>), InputError> {
    let mut keys = Vec::new();
    let mut crl = None;
    for certificate in &evidence.certificates {
        match certificate {
            EvidenceCertificate::Vcek(der) | EvidenceCertificate::Vlek(der) => keys.push(
                EndorsementKey::parse(der)
                    .map_err(|error| InputError(format!("evidence cert_chain: {error}")))?,
            ),
            EvidenceCertificate::Crl(der) if crl.is_none() => {
                crl = Some(
                    RevocationList::parse(der)
                        .map_err(|error| InputError(format!("evidence cert_chain: {error}")))?,
                );
            }
            _ => {}
        }
    }
    Ok((keys, crl))
}

/// The endorsement key and CRL to check `evidence` with, from the flags,
/// a flat certificate folder, the evidence itself, or the cache.
fn endorsement(
    args: &VerifyArgs,
    evidence: &SnpEvidence,
    product: Option<Product>,
) -> Result<(Vec<EndorsementKey>, Option<RevocationList>), InputError> {
    let parse = |path: &Path| -> Result<EndorsementKey, InputError> {
        EndorsementKey::parse(&read(path)?)
            .map_err(|error| InputError(format!("{}: {error}", path.display())))
    };
    let crl = args
        .crl
        .as_deref()
        .map(|path| {
            RevocationList::parse(&read(path)?)
                .map_err(|error| InputError(format!("{}: {error}", path.display())))
        })
        .transpose()?;
    if let Some(path) = args.vcek.as_deref().or(args.vlek.as_deref()) {
        return Ok((vec![parse(path)?], crl));
    }
    if let Some(path) = args
        .cert_dir
        .as_deref()
        .and_then(|dir| flat_folder_key(dir, &evidence.report))
    {
        return Ok((vec![parse(&path)?], crl));
    }
    if args.cert_dir.is_none() {
        let (keys, evidence_crl) = evidence_endorsement(evidence)?;
        if !keys.is_empty() {
            return Ok((keys, crl.or(evidence_crl)));
        }
    }
    let cache = CertCache::new(
        args.cert_dir
            .clone()
            .unwrap_or_else(CertCache::default_location),
    );
    let found = cache.find(&evidence.report, product)?;
    if found.keys.is_empty() {
        let hint = product
            .map(|product| kds::urls(&evidence.report, product))
            .and_then(|urls| urls.vcek)
            .map(|url| format!("; fetch it from {url} and run `hsev attest cache import`"))
            .unwrap_or_default();
        return Err(InputError(format!(
            "no certificate for this report: pass --vcek or --vlek, or import it into the cache at {}{hint}",
            cache.root().display()
        )));
    }
    let keys = found.keys.into_iter().map(|cached| cached.key).collect();
    Ok((keys, crl.or(found.crl.map(|(_, list)| list))))
}

fn verify(args: &VerifyArgs) -> Result<ExitCode, InputError> {
    let evidence = load_evidence(&args.source.report)?;
    let product = product_of(&args.source, &evidence.report)?;
    let policy = match &args.policy {
        Some(path) => AppraisalPolicy::load(path)?,
        None => AppraisalPolicy::default(),
    };
    let at = match &args.at {
        Some(text) => OffsetDateTime::parse(text, &Rfc3339).map_err(|error| {
            InputError(format!("--at {text:?} is not an RFC 3339 time: {error}"))
        })?,
        None => OffsetDateTime::now_utc(),
    };
    let (keys, crl) = endorsement(args, &evidence, product)?;
    let appraisal = appraise_with(
        &evidence,
        &keys,
        product,
        crl.as_ref(),
        &args.sim_root,
        &policy,
        at,
    )?;
    print_appraisal(&args.source.report, &appraisal, args.output)?;
    if !appraisal.accepted() && args.sim_root.is_empty() {
        // Roots found beside the certificates are never trusted for being
        // there; say how to trust them on purpose.
        if let Some(bundle) = args
            .cert_dir
            .as_deref()
            .map(|dir| dir.join("sim_roots.pem"))
            .filter(|bundle| bundle.is_file())
        {
            eprintln!(
                "hint: {} holds a simulated platform's roots; trust them with --sim-root {} \
                 (and a policy with allow_simulated = true)",
                bundle.parent().unwrap_or(&bundle).display(),
                bundle.display()
            );
        }
    }
    Ok(if appraisal.accepted() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Appraises `evidence` with each of `keys` (several cached VLEKs may match
/// the TCB: the one that signed wins), trusting AMD's roots and the
/// simulated platforms' bundles in `sim_roots`.
pub(crate) fn appraise_with(
    evidence: &SnpEvidence,
    keys: &[EndorsementKey],
    product: Option<Product>,
    crl: Option<&RevocationList>,
    sim_roots: &[PathBuf],
    policy: &AppraisalPolicy,
    at: OffsetDateTime,
) -> Result<Appraisal, InputError> {
    let mut store = TrustStore::amd();
    for path in sim_roots {
        let anchor =
            TrustAnchor::from_pem_bundle_of_any_product(RootOrigin::Simulated, &read(path)?)
                .map_err(|error| InputError(format!("{}: {error}", path.display())))?;
        store = store.with_anchor(anchor);
    }
    let mut appraisals = keys
        .iter()
        .map(|key| appraise(&store, &evidence.report, key, product, crl, policy, at));
    let first = appraisals
        .next()
        .ok_or_else(|| InputError("no certificate to verify with".into()))?;
    Ok(if first.accepted() {
        first
    } else {
        appraisals.find(Appraisal::accepted).unwrap_or(first)
    })
}

pub(crate) fn print_appraisal(
    path: &Path,
    appraisal: &Appraisal,
    output: OutputFormat,
) -> Result<(), InputError> {
    match output {
        OutputFormat::Json => print_json(appraisal),
        OutputFormat::Text => {
            let report = appraisal.report();
            println!(
                "{}: report version {}, signed by the {}",
                path.display(),
                report.version,
                report.key_info.signing_key
            );
            let width = appraisal
                .checks()
                .iter()
                .map(|check| check.name.len())
                .max()
                .unwrap_or(0);
            for check in appraisal.checks() {
                let mark = if check.passed { "ok  " } else { "FAIL" };
                println!("  {mark} {:width$}  {}", check.name, check.detail);
            }
            if appraisal.accepted() {
                println!("ACCEPTED: genuine and acceptable under the policy");
            } else {
                let failed: Vec<&str> = appraisal.failures().map(|check| check.name).collect();
                println!("REFUSED: {}", failed.join(", "));
            }
            Ok(())
        }
    }
}

fn show(args: &ShowArgs) -> Result<ExitCode, InputError> {
    let evidence = load_evidence(&args.source.report)?;
    let product = product_of(&args.source, &evidence.report)?;
    let mut document = serde_json::to_value(&evidence.report)?;
    if let (Some(product), Some(map)) = (product, document.as_object_mut()) {
        map.insert("product".into(), serde_json::to_value(product)?);
    }
    match args.output {
        OutputFormat::Json => print_json(&document)?,
        OutputFormat::Text => print_tree(&document),
    }
    Ok(ExitCode::SUCCESS)
}

fn kds_url(args: &KdsUrlArgs) -> Result<ExitCode, InputError> {
    let evidence = load_evidence(&args.source.report)?;
    let product = product_of(&args.source, &evidence.report)?.ok_or_else(|| {
        InputError(
            "this v2 report does not name its product: pass --product milan|genoa|turin".into(),
        )
    })?;
    let urls = kds::urls(&evidence.report, product);
    match args.output {
        OutputFormat::Json => print_json(&urls)?,
        OutputFormat::Text => {
            if let Some(vcek) = &urls.vcek {
                println!("vcek:       {vcek}");
            } else {
                println!("vlek:       provisioned by the cloud provider, not published by AMD");
            }
            println!("cert_chain: {}", urls.cert_chain);
            println!("crl:        {}", urls.crl);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cache(command: &CacheCommand) -> Result<ExitCode, InputError> {
    let open = |dir: &Option<PathBuf>| {
        CertCache::new(dir.clone().unwrap_or_else(CertCache::default_location))
    };
    match command {
        CacheCommand::Import { cache, files } => {
            let cache = open(cache);
            for imported in cache.import(&TrustStore::amd(), files)? {
                println!("{}: {}", imported.source.display(), imported.outcome);
            }
            println!("imported into {}", cache.root().display());
        }
        CacheCommand::Export {
            cache,
            out,
            report,
            product,
        } => {
            let cache = open(cache);
            let evidence = report.as_deref().map(load_evidence).transpose()?;
            let selection = evidence
                .as_ref()
                .map(|evidence| (&evidence.report, product.or(evidence.report.product())));
            let exported = cache.export(out, selection)?;
            if exported.is_empty() {
                return Err(InputError(format!(
                    "nothing to export from {}",
                    cache.root().display()
                )));
            }
            for path in exported {
                println!("{}", out.join(path).display());
            }
        }
        CacheCommand::List { cache, output } => {
            let entries = open(cache).list()?;
            match output {
                OutputFormat::Json => print_json(&entries)?,
                OutputFormat::Text => {
                    println!("{:<7} {:<5} PATH", "PRODUCT", "KIND");
                    for entry in entries {
                        println!(
                            "{:<7} {:<5} {}",
                            entry.product.to_string(),
                            entry.kind,
                            entry.path.display()
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
