//! Bearer tokens kept as SHA-256 hashes (the agent's and the fleet server's HTTP APIs): the
//! token an `Authorization` header presents, and which configured hash it matches, every
//! hash compared in constant time so the comparison does not reveal how much of a hash
//! matched.

use sha2::{Digest, Sha256};

/// The token of an `Authorization` header value `Bearer <token>` (scheme in any case);
/// `None` for another scheme or an empty token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The lowercase hex SHA-256 of a token, as configuration files store it.
pub fn token_sha256(token: &str) -> String {
    crate::trust::hex(&Sha256::digest(token.as_bytes()))
}

/// The position of the first of `hashes` (hex, any case) that is the SHA-256 of `presented`.
/// Every hash is compared, each in constant time.
pub fn find<'a>(presented: &str, hashes: impl IntoIterator<Item = &'a str>) -> Option<usize> {
    let hash = token_sha256(presented);
    let mut found = None;
    for (i, h) in hashes.into_iter().enumerate() {
        if ct_eq(hash.as_bytes(), h.to_ascii_lowercase().as_bytes()) && found.is_none() {
            found = Some(i);
        }
    }
    found
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that matches no configured hash.
    Invalid,
}

impl AuthFailure {
    /// The message of the 401 answer.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "authentication required: send Authorization: Bearer <token>",
            AuthFailure::Invalid => "invalid bearer token",
        }
    }

    /// The `WWW-Authenticate` value of the 401 answer (RFC 6750).
    pub fn challenge(self, realm: &str) -> String {
        match self {
            AuthFailure::Missing => format!("Bearer realm=\"{realm}\""),
            AuthFailure::Invalid => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
        }
    }
}

/// The position among `hashes` of the token an `Authorization` header value presents.
pub fn authenticate<'a>(
    header: Option<&str>,
    hashes: impl IntoIterator<Item = &'a str>,
) -> Result<usize, AuthFailure> {
    let presented = header.and_then(bearer).ok_or(AuthFailure::Missing)?;
    find(presented, hashes).ok_or(AuthFailure::Invalid)
}

/// Byte equality whose time depends only on the lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_and_matched_by_hash() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("  bearer   abc  "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
        let h = token_sha256("s3cret");
        assert_eq!(h.len(), 64);
        let upper = h.to_ascii_uppercase();
        let other = token_sha256("other");
        assert_eq!(find("s3cret", [other.as_str(), upper.as_str()]), Some(1));
        assert_eq!(find("s3cret", [other.as_str()]), None);
        assert_eq!(find("other", [other.as_str(), h.as_str()]), Some(0));
        assert_eq!(authenticate(None, [h.as_str()]), Err(AuthFailure::Missing));
        assert_eq!(
            authenticate(Some("Bearer nope"), [h.as_str()]),
            Err(AuthFailure::Invalid)
        );
        assert_eq!(authenticate(Some("Bearer s3cret"), [h.as_str()]), Ok(0));
        assert!(AuthFailure::Invalid
            .challenge("x")
            .contains("invalid_token"));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
