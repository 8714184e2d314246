//! Enrollment tokens: what an agent needs to find the hub, trust it, and prove it may join.
//!
//! A token carries the hub address, the SHA-256 fingerprint of the hub CA certificate, and
//! `id.secret`. Its text form is `gt1_` followed by base64url (no padding) of a bincode
//! payload, so it survives shells, URLs and copy-paste unquoted. This module only encodes
//! and parses; the hub stores the secret hashed and checks it.

use serde::{Deserialize, Serialize};

/// Prefix of every token's text form; the digit is the token format version.
pub const TOKEN_PREFIX: &str = "gt1_";
/// Longest token text accepted, to bound parsing work on hostile input.
pub const MAX_TOKEN_CHARS: usize = 2048;

/// A parsed enrollment token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// Address agents dial, `HOST:PORT`.
    pub hub_addr: String,
    /// SHA-256 of the hub CA certificate (DER).
    pub ca_sha256: [u8; 32],
    /// Public token id, e.g. `tok_3f9a...`.
    pub id: String,
    /// Secret part: at least 128 random bits, hex-encoded.
    pub secret: String,
}

impl std::fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollmentToken")
            .field("hub_addr", &self.hub_addr)
            .field("ca_sha256", &hex(&self.ca_sha256))
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a token's text could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("enrollment token must start with `{TOKEN_PREFIX}`")]
    Prefix,
    #[error("enrollment token is too long")]
    TooLong,
    #[error("enrollment token is not valid base64url")]
    Encoding,
    #[error("enrollment token is damaged (its contents do not decode)")]
    Payload,
    #[error("enrollment token is damaged: {0}")]
    Field(&'static str),
}

impl EnrollmentToken {
    /// The token's text form.
    pub fn encode(&self) -> String {
        // bincode of a struct of strings and a fixed array cannot fail.
        let payload = bincode::serde::encode_to_vec(self, bincode::config::standard()).unwrap_or_default();
        format!("{TOKEN_PREFIX}{}", base64url_encode(&payload))
    }

    /// Parse a token's text form, checking every field.
    pub fn parse(text: &str) -> Result<EnrollmentToken, TokenError> {
        let text = text.trim();
        if text.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLong);
        }
        let body = text.strip_prefix(TOKEN_PREFIX).ok_or(TokenError::Prefix)?;
        let payload = base64url_decode(body).ok_or(TokenError::Encoding)?;
        let config = bincode::config::standard().with_limit::<MAX_TOKEN_CHARS>();
        let (token, read): (EnrollmentToken, usize) = bincode::serde::decode_from_slice(&payload, config).map_err(|_| TokenError::Payload)?;
        if read != payload.len() {
            return Err(TokenError::Payload);
        }
        if token.hub_addr.is_empty() || !token.hub_addr.contains(':') {
            return Err(TokenError::Field("hub address is missing its port"));
        }
        if token.id.is_empty() || !token.id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(TokenError::Field("token id"));
        }
        if token.secret.len() < 32 || !token.secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Field("secret must be at least 128 bits of hex"));
        }
        Ok(token)
    }

    /// CA fingerprint as lowercase hex.
    pub fn ca_fingerprint_hex(&self) -> String {
        hex(&self.ca_sha256)
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
    out
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let values: Option<Vec<u32>> = text.bytes().map(|c| B64.iter().position(|&b| b == c).map(|p| p as u32)).collect();
    let values = values?;
    for chunk in values.chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, v) in chunk.iter().enumerate() {
            n |= v << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EnrollmentToken {
        EnrollmentToken {
            hub_addr: "hub.example.com:7443".into(),
            ca_sha256: [7; 32],
            id: "tok_0123456789ab".into(),
            secret: "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff".into(),
        }
    }

    #[test]
    fn round_trips() {
        let text = sample().encode();
        assert!(text.starts_with(TOKEN_PREFIX));
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(EnrollmentToken::parse(&text).unwrap(), sample());
        assert_eq!(EnrollmentToken::parse(&format!("  {text}\n")).unwrap(), sample());
    }

    #[test]
    fn base64url_round_trips_every_length() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64url_decode(&base64url_encode(&bytes)).unwrap(), bytes);
        }
    }

    #[test]
    fn damaged_tokens_are_refused_with_a_reason() {
        assert_eq!(EnrollmentToken::parse("hello"), Err(TokenError::Prefix));
        assert_eq!(EnrollmentToken::parse("gt1_$$$"), Err(TokenError::Encoding));
        let text = sample().encode();
        assert!(EnrollmentToken::parse(&text[..text.len() - 6]).is_err());
        assert_eq!(EnrollmentToken::parse(&"gt1_".repeat(1000)), Err(TokenError::TooLong));
        let mut weak = sample();
        weak.secret = "abcd".into();
        assert!(matches!(EnrollmentToken::parse(&weak.encode()), Err(TokenError::Field(_))));
    }

    #[test]
    fn debug_redacts_the_secret() {
        let shown = format!("{:?}", sample());
        assert!(!shown.contains("00112233"), "{shown}");
    }
}
