//! The on-disk certificate cache that makes verification work offline.
//!
//! Layout, one folder per product:
//!
//! ```text
//! <cache>/<product>/vcek/<hwid hex>/<tcb>.der   VCEKs, by chip and TCB
//! <cache>/<product>/vlek/<tcb>-<sha256>.der     VLEKs, by TCB
//! <cache>/<product>/vcek.crl.der                revocation lists, per service
//! <cache>/<product>/vlek.crl.der
//! ```
//!
//! Only what verifies is imported: a VCEK or VLEK must chain to a trusted
//! root and a CRL must be signed by its product's ARK. The AMD roots are
//! embedded in the binary, so KDS `cert_chain` files add nothing and are
//! checked against the embedded roots, then skipped.

use std::fs;
use std::path::{Path, PathBuf};

use openssl::x509::X509;
use serde::Serialize;

use crate::certs::{
    common_name, CertError, ChainError, EndorsementKey, EndorsementKind, RevocationList, TrustStore,
};
use crate::product::Product;
use crate::report::{AttestationReport, SigningKey, TcbVersion};

/// A cache operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is neither a certificate nor a CRL.
    #[error("{path}: neither an X.509 certificate nor a CRL")]
    UnknownFile {
        /// The path.
        path: PathBuf,
    },
    /// A certificate or CRL that cannot be used.
    #[error("{path}: {source}")]
    Cert {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        source: CertError,
    },
    /// A certificate that does not chain to a trusted root.
    #[error("{path}: {source}")]
    Untrusted {
        /// The path.
        path: PathBuf,
        /// Why.
        source: ChainError,
    },
    /// A root certificate that differs from the embedded AMD roots.
    #[error("{path}: {name} differs from the embedded AMD root of that name")]
    ForeignRoot {
        /// The path.
        path: PathBuf,
        /// The certificate's common name.
        name: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What importing one file did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Imported {
    /// The file imported.
    pub source: PathBuf,
    /// What it was and where it went (or why nothing was stored).
    pub outcome: String,
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheEntry {
    /// The product folder.
    pub product: Product,
    /// `vcek`, `vlek` or `crl`.
    pub kind: &'static str,
    /// Path relative to the cache root.
    pub path: PathBuf,
}

/// A certificate cache rooted at a folder.
#[derive(Debug, Clone)]
pub struct CertCache {
    root: PathBuf,
}

/// A cached VCEK or VLEK and where it is stored.
#[derive(Debug)]
pub struct CachedKey {
    /// The product folder it was found in.
    pub product: Product,
    /// Its path relative to the cache root.
    pub path: PathBuf,
    /// The parsed certificate.
    pub key: EndorsementKey,
}

/// The endorsement material found for a report.
#[derive(Debug)]
pub struct FoundEndorsement {
    /// The VCEK or VLEK candidates.
    pub keys: Vec<CachedKey>,
    /// The product's CRL, if cached, and its path relative to the root.
    pub crl: Option<(PathBuf, RevocationList)>,
}

fn tcb_file_stem(tcb: &TcbVersion) -> String {
    let fmc = tcb
        .fmc
        .map(|fmc| format!("fmc{fmc:03}-"))
        .unwrap_or_default();
    format!(
        "{fmc}bl{:03}-tee{:03}-snp{:03}-ucode{:03}",
        tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
    )
}

fn service_name(kind: EndorsementKind) -> &'static str {
    match kind {
        EndorsementKind::Vcek => "vcek",
        EndorsementKind::Vlek => "vlek",
    }
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    // Write then rename: a crash never leaves a torn certificate behind.
    let partial = path.with_extension("partial");
    fs::write(&partial, bytes).map_err(io_error(&partial))?;
    fs::rename(&partial, path).map_err(io_error(path))
}

impl CertCache {
    /// A cache at `root` (created on first import).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        CertCache { root: root.into() }
    }

    /// The default location: `$HSEV_CERT_CACHE`, else
    /// `$XDG_CACHE_HOME/hsev/kds`, else `~/.cache/hsev/kds`.
    pub fn default_location() -> PathBuf {
        if let Some(path) = std::env::var_os("HSEV_CERT_CACHE") {
            return PathBuf::from(path);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("hsev").join("kds")
    }

    /// The cache's root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn relative(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).unwrap_or(path).to_path_buf()
    }

    fn product_dir(&self, product: Product) -> PathBuf {
        self.root.join(product.to_string())
    }

    fn crl_path(&self, product: Product, kind: EndorsementKind) -> PathBuf {
        self.product_dir(product)
            .join(format!("{}.crl.der", service_name(kind)))
    }

    fn key_path(&self, product: Product, key: &EndorsementKey) -> Result<PathBuf, CertError> {
        let stem = tcb_file_stem(&key.tcb);
        Ok(match (&key.kind, &key.hw_id) {
            (EndorsementKind::Vcek, Some(hw_id)) => self
                .product_dir(product)
                .join("vcek")
                .join(hex::encode(hw_id))
                .join(format!("{stem}.der")),
            _ => {
                let fingerprint = hex::encode(&openssl::sha::sha256(&key.to_der()?)[..8]);
                self.product_dir(product)
                    .join("vlek")
                    .join(format!("{stem}-{fingerprint}.der"))
            }
        })
    }

    /// Imports certificate and CRL files (DER or PEM; PEM bundles too).
    /// Every file is checked before anything is stored; one bad file stores
    /// nothing.
    pub fn import(
        &self,
        store: &TrustStore,
        files: &[PathBuf],
    ) -> Result<Vec<Imported>, CacheError> {
        let mut writes: Vec<(PathBuf, Vec<u8>)> = Vec::new();
        let mut report = Vec::new();
        for file in files {
            let bytes = fs::read(file).map_err(io_error(file))?;
            let outcome = self.plan_import(store, file, &bytes, &mut writes)?;
            report.push(Imported {
                source: file.clone(),
                outcome,
            });
        }
        for (path, bytes) in writes {
            write_file(&path, &bytes)?;
        }
        Ok(report)
    }

    fn plan_import(
        &self,
        store: &TrustStore,
        file: &Path,
        bytes: &[u8],
        writes: &mut Vec<(PathBuf, Vec<u8>)>,
    ) -> Result<String, CacheError> {
        let cert_error = |source| CacheError::Cert {
            path: file.to_path_buf(),
            source,
        };
        if let Ok(crl) = RevocationList::parse(bytes) {
            let issuer = common_name(crl.crl.issuer_name()).unwrap_or_default();
            let product: Product = issuer
                .strip_prefix("ARK-")
                .and_then(|name| name.parse().ok())
                .ok_or_else(|| {
                    cert_error(CertError::CrlParse(format!(
                        "issuer {issuer:?} is not an AMD ARK"
                    )))
                })?;
            let signed_by_ark = store.anchors_for(product).any(|anchor| {
                anchor
                    .ark
                    .public_key()
                    .and_then(|key| crl.crl.verify(&key))
                    .unwrap_or(false)
            });
            if !signed_by_ark {
                return Err(CacheError::Untrusted {
                    path: file.to_path_buf(),
                    source: ChainError::CrlSignature(product),
                });
            }
            // AMD publishes one CRL per service, both signed by the ARK; a
            // CRL applies to whichever chain it is used with.
            for kind in [EndorsementKind::Vcek, EndorsementKind::Vlek] {
                writes.push((
                    self.crl_path(product, kind),
                    crl.to_der().map_err(cert_error)?,
                ));
            }
            return Ok(format!("CRL of {product}"));
        }

        let certificates = if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            X509::stack_from_pem(bytes)
                .map_err(|error| cert_error(CertError::Parse(error.to_string())))?
        } else {
            vec![X509::from_der(bytes).map_err(|_| CacheError::UnknownFile {
                path: file.to_path_buf(),
            })?]
        };
        if certificates.is_empty() {
            return Err(CacheError::UnknownFile {
                path: file.to_path_buf(),
            });
        }
        let mut outcomes = Vec::new();
        for certificate in certificates {
            let der = certificate
                .to_der()
                .map_err(|error| cert_error(error.into()))?;
            let name = common_name(certificate.subject_name()).unwrap_or_default();
            if name == "SEV-VCEK" || name == "SEV-VLEK" {
                let key = EndorsementKey::parse(&der).map_err(cert_error)?;
                let trusted =
                    store
                        .verify(&key, None, None)
                        .map_err(|source| CacheError::Untrusted {
                            path: file.to_path_buf(),
                            source,
                        })?;
                let path = self.key_path(trusted.product, &key).map_err(cert_error)?;
                outcomes.push(format!("{name} of {} [{}]", trusted.product, key.tcb));
                writes.push((path, der));
            } else {
                let embedded = Product::ALL
                    .iter()
                    .flat_map(|&product| store.anchors_for(product))
                    .any(|anchor| {
                        [Some(&anchor.ark), Some(&anchor.ask), anchor.asvk.as_ref()]
                            .into_iter()
                            .flatten()
                            .any(|root| root.to_der().is_ok_and(|root| root == der))
                    });
                if !embedded {
                    return Err(CacheError::ForeignRoot {
                        path: file.to_path_buf(),
                        name,
                    });
                }
                outcomes.push(format!("{name} (embedded already)"));
            }
        }
        Ok(outcomes.join(", "))
    }

    /// Every stored entry.
    pub fn list(&self) -> Result<Vec<CacheEntry>, CacheError> {
        let mut entries = Vec::new();
        for product in Product::ALL {
            let dir = self.product_dir(product);
            if !dir.is_dir() {
                continue;
            }
            for path in walk(&dir)? {
                let relative = self.relative(&path);
                let file_name = path
                    .file_name()
                    .and_then(|name| name.to_str())
                    .unwrap_or_default();
                let kind = if file_name.ends_with(".crl.der") {
                    "crl"
                } else if relative.components().any(|part| part.as_os_str() == "vlek") {
                    "vlek"
                } else {
                    "vcek"
                };
                entries.push(CacheEntry {
                    product,
                    kind,
                    path: relative,
                });
            }
        }
        Ok(entries)
    }

    /// The VCEK or VLEK candidates and CRL for `report`. With `product`
    /// unknown (v2 reports) every product is searched.
    pub fn find(
        &self,
        report: &AttestationReport,
        product: Option<Product>,
    ) -> Result<FoundEndorsement, CacheError> {
        let products: Vec<Product> =
            product.map_or_else(|| Product::ALL.to_vec(), |product| vec![product]);
        let kind = match report.key_info.signing_key {
            SigningKey::Vlek => EndorsementKind::Vlek,
            SigningKey::Vcek | SigningKey::None => EndorsementKind::Vcek,
        };
        let stem = tcb_file_stem(&report.reported_tcb);
        let mut keys = Vec::new();
        let mut crl = None;
        for product in products {
            let candidates: Vec<PathBuf> = match kind {
                EndorsementKind::Vcek => {
                    let path = self
                        .product_dir(product)
                        .join("vcek")
                        .join(hex::encode(&report.chip_id[..product.hw_id_len()]))
                        .join(format!("{stem}.der"));
                    vec![path]
                }
                EndorsementKind::Vlek => {
                    let dir = self.product_dir(product).join("vlek");
                    if dir.is_dir() {
                        walk(&dir)?
                            .into_iter()
                            .filter(|path| {
                                path.file_name()
                                    .and_then(|name| name.to_str())
                                    .is_some_and(|name| name.starts_with(&stem))
                            })
                            .collect()
                    } else {
                        Vec::new()
                    }
                }
            };
            let mut found_here = false;
            for path in candidates.into_iter().filter(|path| path.is_file()) {
                let bytes = fs::read(&path).map_err(io_error(&path))?;
                let key = EndorsementKey::parse(&bytes).map_err(|source| CacheError::Cert {
                    path: path.clone(),
                    source,
                })?;
                keys.push(CachedKey {
                    product,
                    path: self.relative(&path),
                    key,
                });
                found_here = true;
            }
            let crl_path = self.crl_path(product, kind);
            if found_here && crl.is_none() && crl_path.is_file() {
                let bytes = fs::read(&crl_path).map_err(io_error(&crl_path))?;
                let list = RevocationList::parse(&bytes).map_err(|source| CacheError::Cert {
                    path: crl_path.clone(),
                    source,
                })?;
                crl = Some((self.relative(&crl_path), list));
            }
        }
        Ok(FoundEndorsement { keys, crl })
    }

    /// Copies the cache, or with `report` only what that report needs, into
    /// `target` in the same layout (another cache can import its files).
    pub fn export(
        &self,
        target: &Path,
        report: Option<(&AttestationReport, Option<Product>)>,
    ) -> Result<Vec<PathBuf>, CacheError> {
        let selected: Vec<PathBuf> = match report {
            None => self.list()?.into_iter().map(|entry| entry.path).collect(),
            Some((report, product)) => {
                let found = self.find(report, product)?;
                found
                    .keys
                    .into_iter()
                    .map(|cached| cached.path)
                    .chain(found.crl.map(|(path, _)| path))
                    .collect()
            }
        };
        for relative in &selected {
            let source = self.root.join(relative);
            let bytes = fs::read(&source).map_err(io_error(&source))?;
            write_file(&target.join(relative), &bytes)?;
        }
        Ok(selected)
    }
}

/// Every file below `dir`, sorted.
fn walk(dir: &Path) -> Result<Vec<PathBuf>, CacheError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in fs::read_dir(&current).map_err(io_error(&current))? {
            let path = entry.map_err(io_error(&current))?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|extension| extension == "der") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}
