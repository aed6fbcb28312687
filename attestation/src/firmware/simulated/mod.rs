//! A simulated AMD Secure Processor for hosts without SEV (every dev and CI
//! machine). It gives NO confidentiality: guest memory is as readable as
//! any VM's. What it gives is a faithful firmware interface, so that every
//! launch, report and key release of HyperSEV runs for real:
//!
//! - a persistent identity per host ([`state`]): a random chip id, a chip
//!   secret, its own ARK -> ASK -> VCEK chain in AMD's certificate format
//!   ([`pki`]), marked simulated in every certificate name; the VCEK is
//!   derived from the secret and the TCB, so a TCB change rotates it;
//! - the SNP launch digest, computed page by page over exactly the bytes it
//!   is handed, with the SNP page-info chain;
//! - ASIDs, taken at launch start and freed at decommission; a launch with
//!   none left fails cleanly;
//! - reports signed in the real layout (version 3 on Milan and Genoa, 5 on
//!   Turin), extended reports with the certificate table, derived keys.
//!
//! A verifier accepts its reports only with its roots registered as a
//! simulated anchor and a policy that sets `allow_simulated = true`.

mod der;
pub mod pki;
mod state;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openssl::bn::BigNumContext;
use openssl::ec::{EcKey, PointConversionForm};
use openssl::pkey::{PKey, Private};
use ring::signature::{EcdsaKeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

pub use pki::{SimRoots, SIMULATED_ORGANIZATION};
pub use state::PlatformConfig;
use state::{FinishedLaunch, LaunchRecord, StateDir};

use super::{
    AsidCounts, DerivedKeyRequest, FirmwareError, GuestRequest, GuestResponse, LaunchFinish,
    LaunchHandle, LaunchedGuest, PageUpdate, PlatformStatus, RootKey, SevFirmware, SnpLaunch,
};
use crate::certs::encode_certificate_table;
use crate::hex_bytes::HexBytes;
use crate::id_block::{IdBlock, IdKeyDigests};
use crate::measurement::{Gctx, PAGE_SIZE};
use crate::product::Product;
use crate::report::{
    Cpuid, EvidenceCertificate, FirmwareVersion, GuestPolicy, KeyInfo, ReportWriter, SigningKey,
    TcbVersion,
};

/// HMAC-SHA-384 of the concatenated `parts` under `key`.
pub(crate) fn hmac_sha384(key: &[u8], parts: &[&[u8]]) -> [u8; 48] {
    let mut out = [0u8; 48];
    // HMAC with a valid key and digest cannot fail; an error leaves zeros,
    // which every caller's use would expose at once in tests.
    let computed = PKey::hmac(key).and_then(|key| {
        let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha384(), &key)?;
        for part in parts {
            signer.update(part)?;
        }
        signer.sign_to_vec()
    });
    if let Ok(mac) = computed {
        out.copy_from_slice(&mac[..48]);
    }
    out
}

/// Options of `hsev firmware sim init`.
#[derive(Debug, Clone, Default)]
pub struct SimInit {
    /// Product (default Genoa; fixed once initialized).
    pub product: Option<Product>,
    /// TCB (default: a recent one for the product).
    pub tcb: Option<TcbVersion>,
    /// SEV-ES/SNP ASIDs (default 16).
    pub asids: Option<u32>,
    /// RSA size of the roots (default 4096, as AMD's).
    pub rsa_bits: Option<u32>,
}

/// A plausible recent TCB of each product.
pub fn default_tcb(product: Product) -> TcbVersion {
    match product {
        Product::Milan => TcbVersion {
            fmc: None,
            bootloader: 4,
            tee: 0,
            snp: 24,
            microcode: 219,
        },
        Product::Genoa => TcbVersion {
            fmc: None,
            bootloader: 10,
            tee: 0,
            snp: 23,
            microcode: 25,
        },
        Product::Turin => TcbVersion {
            fmc: Some(1),
            bootloader: 1,
            tee: 1,
            snp: 3,
            microcode: 67,
        },
    }
}

/// The CPUID family, model and stepping a product's reports carry.
fn product_cpuid(product: Product) -> Cpuid {
    match product {
        Product::Milan => Cpuid {
            family: 0x19,
            model: 0x01,
            stepping: 0x01,
        },
        Product::Genoa => Cpuid {
            family: 0x19,
            model: 0x11,
            stepping: 0x01,
        },
        Product::Turin => Cpuid {
            family: 0x1a,
            model: 0x02,
            stepping: 0x00,
        },
    }
}

/// `key` (a P-384 VCEK) as a ring signing key: SHA-384, then `r || s`,
/// each 48 bytes big-endian.
fn ring_signer(key: &EcKey<Private>) -> Result<EcdsaKeyPair, FirmwareError> {
    let mut context = BigNumContext::new()?;
    let public =
        key.public_key()
            .to_bytes(key.group(), PointConversionForm::UNCOMPRESSED, &mut context)?;
    let private = zeroize::Zeroizing::new(key.private_key().to_vec_padded(48)?);
    EcdsaKeyPair::from_private_key_and_public_key(
        &ECDSA_P384_SHA384_FIXED_SIGNING,
        &private,
        &public,
        &ring::rand::SystemRandom::new(),
    )
    .map_err(|error| FirmwareError::Device(format!("the VCEK does not load for signing: {error}")))
}

/// A launch between `SNP_LAUNCH_START` and `SNP_LAUNCH_FINISH`.
struct InProgress {
    gctx: Gctx,
    /// GPAs of the pages already added: a page is added once.
    pages: HashSet<u64>,
}

/// The simulated Secure Processor of one host.
pub struct SimulatedFirmware {
    state: StateDir,
    config: PlatformConfig,
    secret: [u8; 32],
    roots: SimRoots,
    /// The VCEK, as ring signs with it: ring's P-384 signing takes half the
    /// time of OpenSSL 3.0's (which has no optimized P-384 before 3.2), and
    /// every simulated report costs one signature. Verification stays
    /// OpenSSL's, as for real reports.
    vcek: EcdsaKeyPair,
    vcek_der: Vec<u8>,
    /// The certificate table of extended reports: VCEK, ASK, ARK.
    certificate_table: Vec<u8>,
    in_progress: Mutex<HashMap<u64, InProgress>>,
    /// Finished launches of this process, so that guest requests do not go
    /// to disk; the records on disk stay the truth across restarts.
    launched: Mutex<HashMap<u64, (LaunchRecord, FinishedLaunch)>>,
}

impl std::fmt::Debug for SimulatedFirmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedFirmware")
            .field("dir", &self.state.root)
            .field("product", &self.config.product)
            .finish_non_exhaustive()
    }
}

fn random<const N: usize>() -> Result<[u8; N], FirmwareError> {
    let mut bytes = [0u8; N];
    openssl::rand::rand_bytes(&mut bytes)?;
    Ok(bytes)
}

fn bad_state(path: &Path, problem: impl Into<String>) -> FirmwareError {
    FirmwareError::State {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

impl SimulatedFirmware {
    /// Creates the platform in `dir`, or, if it exists, applies the TCB and
    /// ASID changes `options` asks for (a TCB change rotates the VCEK).
    pub fn init(dir: &Path, options: &SimInit) -> Result<Self, FirmwareError> {
        let state = StateDir {
            root: dir.to_path_buf(),
        };
        if state.exists() {
            let mut config = state.read_config()?;
            if let Some(product) = options.product.filter(|&product| product != config.product) {
                return Err(bad_state(
                    dir,
                    format!(
                        "the platform simulates {}; it cannot become {product} (use a new folder)",
                        config.product
                    ),
                ));
            }
            if let Some(tcb) = options.tcb {
                config.tcb = tcb;
            }
            if let Some(asids) = options.asids {
                config.asids = asids;
            }
            config
                .validate()
                .map_err(|problem| bad_state(dir, problem))?;
            state.write_config(&config)?;
            return Self::open(dir);
        }
        let product = options.product.unwrap_or(Product::Genoa);
        let mut chip_id: [u8; 64] = random()?;
        chip_id[product.hw_id_len()..].fill(0);
        let config = PlatformConfig {
            product,
            chip_id: HexBytes(chip_id),
            tcb: options.tcb.unwrap_or_else(|| default_tcb(product)),
            asids: options.asids.unwrap_or(16),
            sev_asids: 0,
            smt_enabled: false,
            api_major: 1,
            api_minor: 55,
            build: 40,
        };
        config
            .validate()
            .map_err(|problem| bad_state(dir, problem))?;
        std::fs::create_dir_all(dir).map_err(|error| bad_state(dir, error.to_string()))?;
        let roots = SimRoots::generate(product, options.rsa_bits.unwrap_or(4096))?;
        roots.save(dir)?;
        state.write_secret(&random()?)?;
        // The configuration goes last: its presence marks a complete folder.
        state.write_config(&config)?;
        Self::open(dir)
    }

    /// Opens an initialized platform.
    pub fn open(dir: &Path) -> Result<Self, FirmwareError> {
        let state = StateDir {
            root: dir.to_path_buf(),
        };
        if !state.exists() {
            return Err(bad_state(
                dir,
                "not a simulated platform: run `hsev firmware sim init --dir` first",
            ));
        }
        let config = state.read_config()?;
        let secret = state.read_secret()?;
        let roots = SimRoots::load(config.product, dir)?;
        let vcek = pki::derive_vcek(&secret, config.product, &config.tcb)?;
        let vcek_der = roots
            .issue_vcek(&vcek, &config.chip_id.0, &config.tcb)?
            .to_der()?;
        let certificate_table = encode_certificate_table(&[
            EvidenceCertificate::Vcek(vcek_der.clone()),
            EvidenceCertificate::Ask(roots.ask_der()?),
            EvidenceCertificate::Ark(roots.ark_der()?),
        ]);
        let vcek = ring_signer(&vcek)?;
        Ok(SimulatedFirmware {
            state,
            config,
            secret,
            roots,
            vcek,
            vcek_der,
            certificate_table,
            in_progress: Mutex::new(HashMap::new()),
            launched: Mutex::new(HashMap::new()),
        })
    }

    /// The state folder.
    pub fn dir(&self) -> &Path {
        &self.state.root
    }

    /// The platform configuration.
    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// The roots, to register as a simulated anchor.
    pub fn roots(&self) -> &SimRoots {
        &self.roots
    }

    /// The current VCEK certificate, DER.
    pub fn vcek_der(&self) -> &[u8] {
        &self.vcek_der
    }

    /// Launches a guest whose launch digest is `launch_digest`, adding no
    /// pages: the digest chain starts from it, as `--snp-ovmf-hash` seeds a
    /// measurement. For reports about a measurement computed elsewhere
    /// (`hsev firmware sim report --measurement`); a real Secure Processor
    /// has no such call.
    pub fn launch_with_digest(
        firmware: &Arc<SimulatedFirmware>,
        policy: u64,
        launch_digest: [u8; 48],
        finish: &LaunchFinish,
    ) -> Result<LaunchedGuest, FirmwareError> {
        let shared: Arc<dyn SevFirmware> = Arc::clone(firmware) as Arc<dyn SevFirmware>;
        let launch = SnpLaunch::start(shared, policy)?;
        let id = launch.handle()?.0;
        if let Some(in_progress) = firmware.in_progress().get_mut(&id) {
            in_progress.gctx = Gctx::with_seed(launch_digest);
        }
        launch.finish(finish)
    }

    /// Takes back a finished launch after a restart of the process that
    /// made it (its VM kept running): guest requests work again, and
    /// dropping the returned guest decommissions it.
    pub fn adopt(
        firmware: &Arc<SimulatedFirmware>,
        launch_id: u64,
    ) -> Result<LaunchedGuest, FirmwareError> {
        let handle = LaunchHandle(launch_id);
        let (record, finished) = firmware.finished(&handle)?;
        Ok(LaunchedGuest {
            firmware: Arc::clone(firmware) as Arc<dyn SevFirmware>,
            handle,
            launch_digest: finished.launch_digest.0,
            policy: record.policy,
            host_data: finished.host_data.0,
        })
    }

    fn in_progress(&self) -> std::sync::MutexGuard<'_, HashMap<u64, InProgress>> {
        // A panic while holding the lock leaves a map that is still
        // consistent (each entry is replaced whole), so poisoning is ignored.
        self.in_progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_policy(&self, policy: u64) -> Result<GuestPolicy, FirmwareError> {
        let refused = |reason: String| FirmwareError::PolicyRefused { policy, reason };
        let parsed = GuestPolicy::new(policy).map_err(|error| refused(error.to_string()))?;
        let required = (parsed.abi_major(), parsed.abi_minor());
        if required > (self.config.api_major, self.config.api_minor) {
            return Err(refused(format!(
                "it requires firmware ABI {}.{}, the platform runs {}.{}",
                required.0, required.1, self.config.api_major, self.config.api_minor
            )));
        }
        if self.config.smt_enabled && !parsed.smt_allowed() {
            return Err(refused(
                "SMT is enabled on the platform and the policy forbids it".into(),
            ));
        }
        Ok(parsed)
    }

    fn launched(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (LaunchRecord, FinishedLaunch)>> {
        self.launched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A finished launch: from memory, else from its record on disk.
    fn finished(
        &self,
        launch: &LaunchHandle,
    ) -> Result<(LaunchRecord, FinishedLaunch), FirmwareError> {
        if let Some(entry) = self.launched().get(&launch.0) {
            return Ok(entry.clone());
        }
        let record = self.record(launch)?;
        let finished = record
            .finished
            .clone()
            .ok_or(FirmwareError::UnknownLaunch(launch.0))?;
        self.launched()
            .insert(launch.0, (record.clone(), finished.clone()));
        Ok((record, finished))
    }

    fn record(&self, launch: &LaunchHandle) -> Result<LaunchRecord, FirmwareError> {
        self.state
            .record(launch.0)?
            .ok_or(FirmwareError::UnknownLaunch(launch.0))
    }

    fn sign_report(
        &self,
        record: &LaunchRecord,
        finished: &FinishedLaunch,
        report_data: &[u8; 64],
        vmpl: u32,
    ) -> Result<Vec<u8>, FirmwareError> {
        if vmpl > 3 {
            return Err(FirmwareError::BadRequest(format!(
                "VMPL {vmpl} does not exist (0-3)"
            )));
        }
        let product = self.config.product;
        let version = if product == Product::Turin { 5 } else { 3 };
        let tcb = self.config.tcb;
        let firmware = FirmwareVersion {
            major: self.config.api_major,
            minor: self.config.api_minor,
            build: self.config.build,
        };
        let mut writer = ReportWriter::new(version, product.tcb_layout());
        writer
            .guest(
                finished.guest_svn,
                record.policy,
                &finished.family_id.0,
                &finished.image_id.0,
                vmpl,
            )
            .platform(
                u64::from(self.config.smt_enabled),
                KeyInfo {
                    author_key_en: finished.author_key_digest.0 != [0; 48],
                    mask_chip_key: false,
                    signing_key: SigningKey::Vcek,
                },
            )
            .contents(
                report_data,
                &finished.launch_digest.0,
                &finished.host_data.0,
            )
            .identities(
                &finished.id_key_digest.0,
                &finished.author_key_digest.0,
                &finished.report_id.0,
                &[0xff; 32],
            )
            .cpuid(product_cpuid(product))
            .chip_id(&self.config.chip_id.0)
            .firmware_versions(firmware, firmware);
        writer
            .tcbs(&tcb, &tcb, &tcb, &tcb)
            .map_err(|error| FirmwareError::Device(error.to_string()))?;
        if version >= 5 {
            writer.mitigation_vectors(0, 0);
        }
        let signature = self
            .vcek
            .sign(&ring::rand::SystemRandom::new(), writer.signed_bytes())
            .map_err(|_| FirmwareError::Device("signing the report failed".into()))?;
        let (r, s) = signature.as_ref().split_at(48);
        let report = writer.finish(r, s).map_err(|error| {
            FirmwareError::Device(format!("the simulated report does not parse: {error}"))
        })?;
        Ok(report.as_bytes().to_vec())
    }

    fn derived_key(
        &self,
        record: &LaunchRecord,
        finished: &FinishedLaunch,
        request: &DerivedKeyRequest,
    ) -> Result<[u8; 32], FirmwareError> {
        let bad = |problem: String| FirmwareError::BadRequest(problem);
        if request.vmpl > 3 {
            return Err(bad(format!("VMPL {} does not exist (0-3)", request.vmpl)));
        }
        if request.guest_field_select & !0x3f != 0 {
            return Err(bad(format!(
                "guest_field_select {:#x} sets undefined bits",
                request.guest_field_select
            )));
        }
        if request.guest_svn > finished.guest_svn {
            return Err(bad(format!(
                "guest SVN {} is above the guest's {}",
                request.guest_svn, finished.guest_svn
            )));
        }
        let current = u64::from_le_bytes(
            self.config
                .tcb
                .encode(self.config.product.tcb_layout())
                .map_err(|error| FirmwareError::Device(error.to_string()))?,
        );
        let requested = request.tcb_version.to_le_bytes();
        if requested
            .iter()
            .zip(current.to_le_bytes())
            .any(|(asked, have)| *asked > have)
        {
            return Err(bad(
                "the TCB version asked for is above the current TCB".into()
            ));
        }
        let root: &[u8] = match request.root_key {
            RootKey::Vcek => b"vcek",
            RootKey::Vmrk => b"vmrk",
        };
        let select = request.guest_field_select;
        let field = |bit: u64, bytes: &[u8]| -> Vec<u8> {
            if select & (1 << bit) != 0 {
                bytes.to_vec()
            } else {
                Vec::new()
            }
        };
        let mixed = hmac_sha384(
            &self.secret,
            &[
                b"hsev-sim-derived-key",
                root,
                &request.vmpl.to_le_bytes(),
                &select.to_le_bytes(),
                &field(0, &record.policy.to_le_bytes()),
                &field(1, &finished.image_id.0),
                &field(2, &finished.family_id.0),
                &field(3, &finished.launch_digest.0),
                &field(4, &request.guest_svn.to_le_bytes()),
                &field(5, &requested),
            ],
        );
        let mut key = [0u8; 32];
        key.copy_from_slice(&mixed[..32]);
        Ok(key)
    }
}

fn page_aligned(gpa: u64) -> Result<(), FirmwareError> {
    if gpa.is_multiple_of(PAGE_SIZE as u64) {
        Ok(())
    } else {
        Err(FirmwareError::BadUpdate(format!(
            "GPA {gpa:#x} is not page aligned"
        )))
    }
}

impl SevFirmware for SimulatedFirmware {
    fn status(&self) -> Result<PlatformStatus, FirmwareError> {
        let lock = self.state.lock()?;
        let used = u32::try_from(self.state.records(&lock)?.len()).unwrap_or(u32::MAX);
        let tcb = self.config.tcb;
        Ok(PlatformStatus {
            simulated: true,
            product: Some(self.config.product),
            sev_enabled: true,
            sev_es_enabled: true,
            snp_enabled: true,
            firmware_version: FirmwareVersion {
                major: self.config.api_major,
                minor: self.config.api_minor,
                build: self.config.build,
            },
            current_tcb: tcb,
            reported_tcb: tcb,
            committed_tcb: tcb,
            asids: AsidCounts {
                total: self.config.asids + self.config.sev_asids,
                sev_pool: self.config.sev_asids,
                sev_es_snp_pool: self.config.asids,
                free: self.config.asids.saturating_sub(used),
            },
            chip_id: Some(self.config.chip_id.0[..self.config.product.hw_id_len()].to_vec()),
        })
    }

    fn launch_start(&self, policy: u64) -> Result<LaunchHandle, FirmwareError> {
        self.check_policy(policy)?;
        let lock = self.state.lock()?;
        let records = self.state.records(&lock)?;
        let used: HashSet<u32> = records.iter().map(|record| record.asid).collect();
        let asid = (1..=self.config.asids)
            .find(|asid| !used.contains(asid))
            .ok_or(FirmwareError::NoFreeAsid(self.config.asids))?;
        let id = u64::from_le_bytes(random()?);
        self.state.write_record(&LaunchRecord {
            id,
            asid,
            pid: std::process::id(),
            policy,
            finished: None,
        })?;
        drop(lock);
        self.in_progress().insert(
            id,
            InProgress {
                gctx: Gctx::new(),
                pages: HashSet::new(),
            },
        );
        Ok(LaunchHandle(id))
    }

    fn launch_update(
        &self,
        launch: &LaunchHandle,
        update: PageUpdate<'_>,
    ) -> Result<(), FirmwareError> {
        let mut launches = self.in_progress();
        let in_progress = launches
            .get_mut(&launch.0)
            .ok_or(FirmwareError::UnknownLaunch(launch.0))?;
        let mut claim = |gpa: u64, length: u64| -> Result<(), FirmwareError> {
            page_aligned(gpa)?;
            if !length.is_multiple_of(PAGE_SIZE as u64) || length == 0 {
                return Err(FirmwareError::BadUpdate(format!(
                    "{length} bytes is not a whole number of pages"
                )));
            }
            let end = gpa.checked_add(length).ok_or_else(|| {
                FirmwareError::BadUpdate(format!("GPA {gpa:#x} + {length} overflows"))
            })?;
            for page in (gpa..end).step_by(PAGE_SIZE) {
                if !in_progress.pages.insert(page) {
                    return Err(FirmwareError::BadUpdate(format!(
                        "page {page:#x} was already added"
                    )));
                }
            }
            Ok(())
        };
        match update {
            PageUpdate::Normal { gpa, data } => {
                claim(gpa, data.len() as u64)?;
                in_progress.gctx.update_normal_pages(gpa, data)?;
            }
            PageUpdate::Zero { gpa, length } => {
                claim(gpa, length)?;
                in_progress.gctx.update_zero_pages(gpa, length)?;
            }
            PageUpdate::Unmeasured { gpa, length } => {
                claim(gpa, length)?;
                in_progress.gctx.update_unmeasured_pages(gpa, length)?;
            }
            PageUpdate::Secrets { gpa } => {
                claim(gpa, PAGE_SIZE as u64)?;
                in_progress.gctx.update_secrets_page(gpa);
            }
            PageUpdate::Cpuid { gpa } => {
                claim(gpa, PAGE_SIZE as u64)?;
                in_progress.gctx.update_cpuid_page(gpa);
            }
            // Each VMSA lives in its own host page; the digest records them
            // all at the same architectural GPA.
            PageUpdate::Vmsa { page } => in_progress.gctx.update_vmsa_page(page),
        }
        Ok(())
    }

    fn launch_finish(
        &self,
        launch: &LaunchHandle,
        finish: &LaunchFinish,
    ) -> Result<[u8; 48], FirmwareError> {
        let digest = {
            let launches = self.in_progress();
            launches
                .get(&launch.0)
                .ok_or(FirmwareError::UnknownLaunch(launch.0))?
                .gctx
                .launch_digest()
        };
        let mut record = self.record(launch)?;
        // The checks of SNP_LAUNCH_FINISH: a launch that does not match its
        // owner's ID block does not finish, so the guest never runs.
        let (block, digests) = match &finish.id_block {
            Some(signed) => {
                let digests = signed
                    .check(&digest, record.policy)
                    .map_err(|refusal| FirmwareError::IdBlock(refusal.to_string()))?;
                (signed.block, digests)
            }
            None => (
                IdBlock {
                    launch_digest: digest,
                    family_id: [0; 16],
                    image_id: [0; 16],
                    guest_svn: 0,
                    policy: record.policy,
                },
                IdKeyDigests {
                    id_key: [0; 48],
                    author_key: [0; 48],
                },
            ),
        };
        record.finished = Some(FinishedLaunch {
            launch_digest: HexBytes(digest),
            host_data: HexBytes(finish.host_data),
            family_id: HexBytes(block.family_id),
            image_id: HexBytes(block.image_id),
            guest_svn: block.guest_svn,
            id_key_digest: HexBytes(digests.id_key),
            author_key_digest: HexBytes(digests.author_key),
            report_id: HexBytes(random()?),
        });
        self.state.write_record(&record)?;
        self.in_progress().remove(&launch.0);
        Ok(digest)
    }

    fn guest_request(
        &self,
        launch: &LaunchHandle,
        request: &GuestRequest,
    ) -> Result<GuestResponse, FirmwareError> {
        let (record, finished) = self.finished(launch)?;
        match request {
            GuestRequest::Report { report_data, vmpl } => Ok(GuestResponse::Report(
                self.sign_report(&record, &finished, report_data, *vmpl)?,
            )),
            GuestRequest::ExtendedReport { report_data, vmpl } => {
                Ok(GuestResponse::ExtendedReport {
                    report: self.sign_report(&record, &finished, report_data, *vmpl)?,
                    certificates: self.certificate_table.clone(),
                })
            }
            GuestRequest::DerivedKey(request) => Ok(GuestResponse::DerivedKey(
                self.derived_key(&record, &finished, request)?,
            )),
        }
    }

    fn decommission(&self, launch: &LaunchHandle) {
        self.in_progress().remove(&launch.0);
        self.launched().remove(&launch.0);
        self.state.remove_record(launch.0);
    }
}
