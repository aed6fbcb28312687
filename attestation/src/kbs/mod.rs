//! `hsev-kbs`, HyperSEV's key broker, speaking the Trustee KBS protocol
//! (RCAR, version 0.4.0, kbs-types' wire shapes): a guest authenticates,
//! attests with SNP evidence bound to a nonce and an ephemeral key (and,
//! optionally, init-data bound to its HOST_DATA), and receives each
//! resource (a disk key) encrypted to that key, only if its verified report
//! satisfies that resource's release policy. Trustee's own client
//! (guest-components' `kbs_protocol`) and HyperSEV's agent run the same
//! exchange.
//!
//! - [`protocol`]: the wire shapes, Trustee's error types and the
//!   runtime-data binding;
//! - [`init_data`]: Trustee's init-data document and its HOST_DATA digest;
//! - [`release_policy`]: a resource's release policy;
//! - [`jwe`]: the JWE the resource travels in;
//! - [`tls`]: the broker's key as its clients pin it, and the pinned
//!   connection;
//! - [`client`]: the blocking clients of the guest agent and the tenant's
//!   CLI;
//! - `server` (feature `kbs-server`): the broker itself.
//!
//! The protocol and client build without the server's dependencies (the
//! guest agent uses them with `default-features = false`). Nothing here
//! ever logs a secret: resource data, keys and tokens.

pub mod client;
pub mod init_data;
pub mod jwe;
pub mod protocol;
pub mod release_policy;
#[cfg(feature = "kbs-server")]
pub mod server;
pub mod tls;
