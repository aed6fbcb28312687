//! Trust anchors: per product, the root key (ARK) and the two keys it signs,
//! the ASK (which signs VCEKs) and the ASVK (which signs VLEKs).

use std::sync::Arc;

use openssl::x509::X509;
use serde::Serialize;

use super::{common_name, CertError};
use crate::product::Product;

/// Who stands behind a trust anchor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RootOrigin {
    /// AMD's own roots, embedded in this binary.
    Amd,
    /// A simulated AMD Secure Processor's roots: no confidentiality at all,
    /// acceptable only where a policy explicitly allows simulated evidence.
    Simulated,
}

/// The roots of one product.
#[derive(Debug, Clone)]
pub struct TrustAnchor {
    /// The product these roots serve.
    pub product: Product,
    /// AMD's roots or a simulated platform's.
    pub origin: RootOrigin,
    pub(crate) ark: X509,
    pub(crate) ask: X509,
    pub(crate) asvk: Option<X509>,
}

fn bundle_error(product: Product, problem: impl Into<String>) -> CertError {
    CertError::RootBundle {
        product,
        problem: problem.into(),
    }
}

impl TrustAnchor {
    /// Builds an anchor from a PEM bundle holding the ARK, the ASK and
    /// optionally the ASVK of `product`, in any order (AMD's
    /// `ask_ark_asvk.pem` form). Each is recognised by its common name and
    /// its signature is checked: the ARK signs itself and the other two.
    pub fn from_pem_bundle(
        product: Product,
        origin: RootOrigin,
        pem: &[u8],
    ) -> Result<Self, CertError> {
        let name = product.amd_name();
        let mut ark = None;
        let mut ask = None;
        let mut asvk = None;
        for certificate in X509::stack_from_pem(pem)? {
            let common_name = common_name(certificate.subject_name()).unwrap_or_default();
            let slot = if common_name == format!("ARK-{name}") {
                &mut ark
            } else if common_name == format!("SEV-{name}") {
                &mut ask
            } else if common_name == format!("SEV-VLEK-{name}") {
                &mut asvk
            } else {
                return Err(bundle_error(
                    product,
                    format!("unexpected certificate {common_name:?}"),
                ));
            };
            if slot.replace(certificate).is_some() {
                return Err(bundle_error(
                    product,
                    format!("{common_name} appears twice"),
                ));
            }
        }
        let ark = ark.ok_or_else(|| bundle_error(product, "no ARK"))?;
        let ask = ask.ok_or_else(|| bundle_error(product, "no ASK"))?;
        let ark_key = ark.public_key()?;
        if !ark.verify(&ark_key)? {
            return Err(bundle_error(product, "the ARK's self-signature is invalid"));
        }
        for (label, certificate) in [("ASK", Some(&ask)), ("ASVK", asvk.as_ref())] {
            if let Some(certificate) = certificate {
                if !certificate.verify(&ark_key)? {
                    return Err(bundle_error(
                        product,
                        format!("the {label} is not signed by the ARK"),
                    ));
                }
            }
        }
        Ok(TrustAnchor {
            product,
            origin,
            ark,
            ask,
            asvk,
        })
    }

    /// Like [`TrustAnchor::from_pem_bundle`], the product read from the
    /// ARK's common name (`ARK-Milan`, ...).
    pub fn from_pem_bundle_of_any_product(
        origin: RootOrigin,
        pem: &[u8],
    ) -> Result<Self, CertError> {
        let certificates = X509::stack_from_pem(pem)?;
        let product = certificates
            .iter()
            .filter_map(|certificate| common_name(certificate.subject_name()))
            .find_map(|name| {
                name.strip_prefix("ARK-")
                    .and_then(|product| product.parse::<Product>().ok())
            })
            .ok_or_else(|| CertError::Parse("the bundle holds no ARK of a known product".into()))?;
        Self::from_pem_bundle(product, origin, pem)
    }

    /// The ARK, DER-encoded.
    pub fn ark_der(&self) -> Result<Vec<u8>, CertError> {
        Ok(self.ark.to_der()?)
    }

    /// The ASK, DER-encoded.
    pub fn ask_der(&self) -> Result<Vec<u8>, CertError> {
        Ok(self.ask.to_der()?)
    }

    /// The ASVK, DER-encoded, if the anchor has one.
    pub fn asvk_der(&self) -> Result<Option<Vec<u8>>, CertError> {
        Ok(self.asvk.as_ref().map(|asvk| asvk.to_der()).transpose()?)
    }
}

/// The set of anchors a verifier trusts, at most one per product and origin.
#[derive(Debug, Clone, Default)]
pub struct TrustStore {
    anchors: Vec<Arc<TrustAnchor>>,
}

impl TrustStore {
    /// AMD's roots for Milan, Genoa and Turin, as embedded in this binary.
    pub fn amd() -> Self {
        TrustStore {
            anchors: super::builtin::amd_anchors().to_vec(),
        }
    }

    /// An empty store.
    pub fn empty() -> Self {
        TrustStore::default()
    }

    /// Adds an anchor, replacing one of the same product and origin.
    pub fn with_anchor(mut self, anchor: TrustAnchor) -> Self {
        self.anchors.retain(|existing| {
            (existing.product, existing.origin) != (anchor.product, anchor.origin)
        });
        self.anchors.push(Arc::new(anchor));
        self
    }

    /// The anchors of `product`, AMD's first.
    pub fn anchors_for(&self, product: Product) -> impl Iterator<Item = &Arc<TrustAnchor>> {
        let mut anchors: Vec<&Arc<TrustAnchor>> = self
            .anchors
            .iter()
            .filter(|anchor| anchor.product == product)
            .collect();
        anchors.sort_by_key(|anchor| anchor.origin != RootOrigin::Amd);
        anchors.into_iter()
    }
}
