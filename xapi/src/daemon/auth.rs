//! Bearer-token authentication: a token maps to a caller with a role. The
//! daemon stores tokens as SHA-256 only and compares digests in constant
//! time; a token never appears in a log line.

use hsev_attestation::HexBytes;

use super::config::{Role, TokenConfig};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name: a tenant owns VMs under it.
    pub name: String,
    /// Its role.
    pub role: Role,
}

impl Caller {
    /// The owner whose VMs this caller may see: `None` for admins (all).
    pub fn owner_scope(&self) -> Option<&str> {
        match self.role {
            Role::Admin => None,
            Role::Tenant => Some(&self.name),
        }
    }

    /// Whether the caller is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// Why a request is not authenticated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization: Bearer` header.
    #[error("missing bearer token (send `authorization: Bearer <token>`)")]
    Missing,
    /// A token no configured entry matches.
    #[error("unknown bearer token")]
    Unknown,
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<(HexBytes<32>, Caller)>,
}

impl Tokens {
    /// From the configuration.
    pub fn new(config: &[TokenConfig]) -> Self {
        Tokens {
            entries: config
                .iter()
                .map(|token| {
                    (
                        token.sha256,
                        Caller {
                            name: token.name.clone(),
                            role: token.role,
                        },
                    )
                })
                .collect(),
        }
    }

    /// The caller of an `authorization` header value.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Caller, AuthError> {
        let token = header
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let digest = openssl::sha::sha256(token.as_bytes());
        self.entries
            .iter()
            .find(|(expected, _)| openssl::memcmp::eq(&expected.0, &digest))
            .map(|(_, caller)| caller.clone())
            .ok_or(AuthError::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::new(&[
            TokenConfig {
                name: "ops".into(),
                role: Role::Admin,
                sha256: HexBytes(openssl::sha::sha256(b"admin-secret")),
            },
            TokenConfig {
                name: "alice".into(),
                role: Role::Tenant,
                sha256: HexBytes(openssl::sha::sha256(b"alice-secret")),
            },
        ])
    }

    #[test]
    fn tokens_map_to_callers() {
        let tokens = tokens();
        let admin = tokens
            .authenticate(Some("Bearer admin-secret"))
            .expect("admin");
        assert!(admin.is_admin() && admin.owner_scope().is_none());
        let alice = tokens
            .authenticate(Some("Bearer alice-secret"))
            .expect("tenant");
        assert_eq!(alice.owner_scope(), Some("alice"));
    }

    #[test]
    fn bad_headers_are_refused() {
        let tokens = tokens();
        assert_eq!(tokens.authenticate(None), Err(AuthError::Missing));
        assert_eq!(
            tokens.authenticate(Some("Basic xyz")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            tokens.authenticate(Some("Bearer ")),
            Err(AuthError::Missing)
        );
        assert_eq!(
            tokens.authenticate(Some("Bearer guess")),
            Err(AuthError::Unknown)
        );
        assert!(
            !AuthError::Unknown.to_string().contains("guess"),
            "a token is never echoed"
        );
    }
}
