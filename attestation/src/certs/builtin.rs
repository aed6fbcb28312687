//! AMD's root certificates, embedded: ARK, ASK and ASVK of each product, as
//! published by AMD's key distribution service (`ask_ark_asvk.pem`).

use std::sync::{Arc, OnceLock};

use super::{RootOrigin, TrustAnchor};
use crate::product::Product;

const MILAN: &[u8] = include_bytes!("builtin/milan.pem");
const GENOA: &[u8] = include_bytes!("builtin/genoa.pem");
const TURIN: &[u8] = include_bytes!("builtin/turin.pem");

/// The embedded anchors, parsed and self-checked once per process.
pub(super) fn amd_anchors() -> &'static [Arc<TrustAnchor>] {
    static ANCHORS: OnceLock<Vec<Arc<TrustAnchor>>> = OnceLock::new();
    ANCHORS.get_or_init(|| {
        [
            (Product::Milan, MILAN),
            (Product::Genoa, GENOA),
            (Product::Turin, TURIN),
        ]
        .into_iter()
        .map(|(product, pem)| {
            // The bundles are fixed at build time and covered by tests:
            // failing here means the binary itself is corrupt.
            #[allow(clippy::expect_used)]
            let anchor = TrustAnchor::from_pem_bundle(product, RootOrigin::Amd, pem)
                .expect("embedded AMD root bundle is valid");
            Arc::new(anchor)
        })
        .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_product_has_ark_ask_and_asvk() {
        let anchors = amd_anchors();
        assert_eq!(anchors.len(), 3);
        for anchor in anchors {
            assert!(anchor.asvk.is_some(), "{} lacks its ASVK", anchor.product);
        }
    }

    #[test]
    fn embedded_roots_equal_the_published_ones() {
        let roots = hsev_e2e::snp_testdata().join("roots");
        for anchor in amd_anchors() {
            let folder = roots.join(anchor.product.to_string());
            for (file, der) in [
                ("ark.pem", anchor.ark_der().expect("der")),
                ("ask.pem", anchor.ask_der().expect("der")),
            ] {
                let published = std::fs::read(folder.join(file)).expect("published root readable");
                let published = openssl::x509::X509::from_pem(&published)
                    .expect("published root parses")
                    .to_der()
                    .expect("der");
                assert_eq!(published, der, "{} {file}", anchor.product);
            }
        }
    }

    #[test]
    fn a_bundle_with_a_forged_ask_is_refused() {
        let mut forged = MILAN.to_vec();
        // Replace the Milan ASK with Genoa's: right shape, wrong signer.
        let genoa_ask = TrustAnchor::from_pem_bundle(Product::Genoa, RootOrigin::Amd, GENOA)
            .expect("genoa bundle")
            .ask
            .to_pem()
            .expect("pem");
        forged.extend_from_slice(&genoa_ask);
        assert!(TrustAnchor::from_pem_bundle(Product::Milan, RootOrigin::Amd, &forged).is_err());
    }
}
