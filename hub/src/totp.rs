//! Time-based one-time passwords (RFC 6238 TOTP over RFC 4226 HOTP) for the optional second
//! login factor: HMAC-SHA-1, 6 digits, a 30 s step, one step of clock drift either way, and
//! every code usable once (the caller keeps the last step a code was accepted for).
//!
//! Pure functions over a secret and a Unix time, so tests run on fixed clocks. This module
//! knows neither HTTP nor the store; `api/mfa.rs` does the enrolment and the login check, and
//! the secret is kept sealed in the user record ([`Factor`]).

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Digits in a code.
pub const DIGITS: u32 = 6;
/// Seconds each code is current for.
pub const STEP_SECS: u64 = 30;
/// Steps of clock drift accepted either side of the current one.
pub const DRIFT_STEPS: u64 = 1;
/// Bytes of a new secret: 160 bits, the HMAC-SHA-1 block RFC 4226 recommends.
pub const SECRET_BYTES: usize = 20;
/// Issuer shown by authenticator apps.
pub const ISSUER: &str = "Gantry";

/// A user's TOTP second factor as stored in the user record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Factor {
    /// The secret sealed with the hub's secrets key (`secrets::Kind::Totp`, bound to the user
    /// id), as hex.
    pub sealed_secret: String,
    /// Confirmed with a right code; until then the factor is pending and login ignores it.
    pub enabled: bool,
    /// The step of the last code accepted; codes of that step or older are refused, so a
    /// code works once.
    #[serde(default)]
    pub last_step: Option<u64>,
    pub created_at_ms: i64,
}

/// A fresh random secret of [`SECRET_BYTES`].
pub fn new_secret() -> Result<Vec<u8>, String> {
    let mut secret = vec![0u8; SECRET_BYTES];
    SystemRandom::new().fill(&mut secret).map_err(|_| "no system randomness".to_string())?;
    Ok(secret)
}

/// The secret as authenticator apps take it: base32 without padding.
pub fn encode_secret(secret: &[u8]) -> String {
    data_encoding::BASE32_NOPAD.encode(secret)
}

/// A base32 secret (any case, spaces and padding ignored) back to bytes.
pub fn decode_secret(text: &str) -> Option<Vec<u8>> {
    let clean: String = text.chars().filter(|c| !c.is_whitespace() && *c != '=').map(|c| c.to_ascii_uppercase()).collect();
    data_encoding::BASE32_NOPAD.decode(clean.as_bytes()).ok()
}

/// The HOTP value of `counter` (RFC 4226 section 5.3) with `digits` digits.
pub fn hotp(secret: &[u8], counter: u64, digits: u32) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = hmac::sign(&key, &counter.to_be_bytes());
    let mac = tag.as_ref();
    // Dynamic truncation: the low nibble of the last byte picks 4 bytes; the top bit is
    // dropped so the value reads the same signed or unsigned. A SHA-1 tag is 20 bytes and
    // the offset at most 15, so the slice is in range.
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let binary = u32::from_be_bytes([mac[offset] & 0x7f, mac[offset + 1], mac[offset + 2], mac[offset + 3]]);
    binary % 10u32.pow(digits)
}

/// The time step of `unix_secs`.
pub fn step_of(unix_secs: u64) -> u64 {
    unix_secs / STEP_SECS
}

/// The code of `step`, zero-padded to [`DIGITS`].
pub fn code_of_step(secret: &[u8], step: u64) -> String {
    format!("{:0width$}", hotp(secret, step, DIGITS), width = DIGITS as usize)
}

/// The code current at `unix_secs`.
pub fn code_at(secret: &[u8], unix_secs: u64) -> String {
    code_of_step(secret, step_of(unix_secs))
}

/// The step `code` belongs to, if it is the code of a step within [`DRIFT_STEPS`] of
/// `unix_secs` and newer than `last_used`; `None` for a wrong, stale or replayed code. Spaces
/// in the code are ignored (apps show `123 456`).
pub fn verify(secret: &[u8], code: &str, unix_secs: u64, last_used: Option<u64>) -> Option<u64> {
    let code: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    if code.len() != DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let now = step_of(unix_secs);
    let mut matched = None;
    // Every candidate is compared in constant time and none ends the loop early, so timing
    // does not tell which step (if any) was close.
    for step in now.saturating_sub(DRIFT_STEPS)..=now.saturating_add(DRIFT_STEPS) {
        let fresh = last_used.is_none_or(|last| step > last);
        let equal = bool::from(code_of_step(secret, step).as_bytes().ct_eq(code.as_bytes()));
        if equal && fresh && matched.is_none() {
            matched = Some(step);
        }
    }
    matched
}

/// The `otpauth://` URI authenticator apps read (usually from a QR code) for `account`.
pub fn otpauth_uri(account: &str, secret: &[u8]) -> String {
    let label = percent_encode(&format!("{ISSUER}:{account}"));
    format!("otpauth://totp/{label}?secret={}&issuer={}&algorithm=SHA1&digits={DIGITS}&period={STEP_SECS}", encode_secret(secret), percent_encode(ISSUER))
}

/// RFC 3986 percent-encoding of everything but unreserved characters (the label's `:`
/// separator is encoded too, which apps accept).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_SEED: &[u8] = b"12345678901234567890";

    #[test]
    fn rfc6238_sha1_test_vectors() {
        // RFC 6238 appendix B, SHA-1 rows: (time, 8-digit TOTP).
        let vectors =
            [(59u64, 94287082u32), (1111111109, 7081804), (1111111111, 14050471), (1234567890, 89005924), (2000000000, 69279037), (20000000000, 65353130)];
        for (time, expected) in vectors {
            assert_eq!(hotp(RFC_SEED, step_of(time), 8), expected, "8 digits at {time}");
            // Six digits are the same truncation modulo 10^6.
            assert_eq!(code_at(RFC_SEED, time), format!("{:06}", expected % 1_000_000), "6 digits at {time}");
        }
    }

    #[test]
    fn rfc4226_hotp_test_vectors() {
        // RFC 4226 appendix D, counters 0..9.
        let expected = [755224, 287082, 359152, 969429, 338314, 254676, 287922, 162583, 399871, 520489];
        for (counter, value) in expected.into_iter().enumerate() {
            assert_eq!(hotp(RFC_SEED, counter as u64, 6), value, "counter {counter}");
        }
    }

    #[test]
    fn codes_are_accepted_one_step_either_side_and_only_once() {
        let t = 1_111_111_111;
        let now = step_of(t);
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t), t, None), Some(now));
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t - 30), t, None), Some(now - 1), "a step behind");
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t + 30), t, None), Some(now + 1), "a step ahead");
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t - 60), t, None), None, "two steps behind");
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t + 60), t, None), None, "two steps ahead");
        // Replays: the step used last and anything older are refused, newer ones are fine.
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t), t, Some(now)), None);
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t - 30), t, Some(now - 1)), None);
        assert_eq!(verify(RFC_SEED, &code_at(RFC_SEED, t + 30), t, Some(now)), Some(now + 1));
    }

    #[test]
    fn malformed_codes_are_refused() {
        let t = 1_234_567_890;
        let code = code_at(RFC_SEED, t);
        assert_eq!(verify(RFC_SEED, &format!("{} {}", &code[..3], &code[3..]), t, None), Some(step_of(t)), "spaces are ignored");
        for bad in ["", "12345", "1234567", "abcdef", "-12345", "８９００５９"] {
            assert_eq!(verify(RFC_SEED, bad, t, None), None, "{bad:?}");
        }
        assert_eq!(verify(b"another secret", &code, t, None), None, "another secret's code");
    }

    #[test]
    fn secrets_round_trip_through_base32_and_the_uri() {
        let secret = new_secret().unwrap();
        assert_eq!(secret.len(), SECRET_BYTES);
        assert_ne!(secret, new_secret().unwrap());
        let text = encode_secret(&secret);
        assert_eq!(text.len(), 32, "160 bits are 32 base32 characters, no padding");
        assert_eq!(decode_secret(&text).unwrap(), secret);
        assert_eq!(decode_secret(&text.to_lowercase()).unwrap(), secret);
        assert_eq!(encode_secret(RFC_SEED), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        assert!(decode_secret("not base32!").is_none());
        let uri = otpauth_uri("ops+1@example.com", &secret);
        assert_eq!(uri, format!("otpauth://totp/Gantry%3Aops%2B1%40example.com?secret={text}&issuer=Gantry&algorithm=SHA1&digits=6&period=30"));
    }
}
