//! `hsev-kbs`, HyperSEV's key broker, speaking the Trustee KBS protocol
//! (RCAR, kbs-types 0.4.0): a guest authenticates, attests with SNP
//! evidence bound to a nonce and an ephemeral key, and receives each
//! resource (a disk key) encrypted to that key, only if its verified report
//! satisfies that resource's release policy.
//!
//! - [`protocol`]: the wire shapes and the runtime-data binding;
//! - [`jwe`]: the JWE the resource travels in;
//! - [`client`]: the blocking client the guest agent and `hsevd` use;
//! - `server` (feature `kbs-server`): the broker itself.
//!
//! The protocol and client build without the server's dependencies (the
//! guest agent uses them with `default-features = false`). Nothing here
//! ever logs a secret: resource data, keys and tokens.

pub mod client;
pub mod jwe;
pub mod protocol;
#[cfg(feature = "kbs-server")]
pub mod server;
