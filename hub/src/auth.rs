//! Authentication of people and API clients: argon2id password hashes, login sessions
//! (random ids, stored hashed, idle and absolute timeouts) and API keys (prefixed id plus a
//! secret shown once, stored hashed).
//!
//! This module decides who a credential belongs to; it does not know routes or HTTP
//! framing beyond the header and cookie values it is handed.

use crate::store::{self, ApiKey, Session, User};
use crate::Hub;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use gantry_shared::token::hex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Name of the session cookie.
pub const SESSION_COOKIE: &str = "gantry_session";
/// Prefix of API keys, so leaked keys are recognisable by secret scanners.
pub const API_KEY_PREFIX: &str = "gk_";
/// Shortest password accepted.
pub const MIN_PASSWORD_CHARS: usize = 12;
/// Longest password accepted (long passphrases are fine; this only bounds hashing work).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// User id, or the API key id.
    pub id: String,
    /// Email for people, `key:<id>` for API keys; what the audit trail records.
    pub name: String,
    /// Platform operator: may act in every org.
    pub operator: bool,
    /// Org an org-scoped key or member belongs to.
    pub org: Option<String>,
    /// Authenticated by a cookie (so state changes need CSRF protection).
    pub via_cookie: bool,
}

fn argon2() -> Argon2<'static> {
    // OWASP's argon2id floor: 19 MiB, 2 iterations, 1 lane. The constants are valid, so
    // `Params::new` cannot fail; fall back to the crate default (the same values) anyway.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or_default();
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Hash a password as an argon2id PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut argon2::password_hash::rand_core::OsRng);
    argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(hash: &str, password: &str) -> bool {
    if password.len() > MAX_PASSWORD_BYTES {
        return false;
    }
    match PasswordHash::new(hash) {
        Ok(parsed) => argon2().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Check a new password against the policy.
pub fn check_password_policy(password: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!("password must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!("password must be at most {MAX_PASSWORD_BYTES} bytes"));
    }
    Ok(())
}

/// Random lowercase hex with `bytes` bytes of entropy.
pub fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    hex(&raw)
}

pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Create a user; the email is lowercased.
pub fn create_user(hub: &Hub, email: &str, password: &str, operator: bool) -> Result<User, String> {
    let email = email.trim().to_lowercase();
    if !email.contains('@') || email.len() > 254 {
        return Err(format!("{email:?} is not an email address"));
    }
    check_password_policy(password)?;
    let user = User {
        id: format!("usr_{}", random_hex(8)),
        email,
        password_hash: hash_password(password)?,
        operator,
        disabled: false,
        created_at_ms: crate::wall_ms(),
    };
    hub.store.create_user(&user).map_err(|e| e.to_string())?;
    Ok(user)
}

/// Check an email and password; the user on success.
pub fn login(hub: &Hub, email: &str, password: &str) -> Result<Option<User>, store::Error> {
    let email = email.trim().to_lowercase();
    match hub.store.user_by_email(&email)? {
        Some(user) if !user.disabled && verify_password(&user.password_hash, password) => Ok(Some(user)),
        Some(_) => Ok(None),
        None => {
            // Spend the same work as a real check so timing does not reveal which emails exist.
            let _ = verify_password("$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$qLml5cbqFAO6YxVHhrSBHP0UWdxrIxkNcM8aMX3tEkg", password);
            Ok(None)
        }
    }
}

/// Start a session for `user`; returns the cookie value (256 random bits).
pub fn start_session(hub: &Hub, user: &User) -> Result<String, store::Error> {
    let value = random_hex(32);
    let now = crate::wall_ms();
    let session = Session { user_id: user.id.clone(), email: user.email.clone(), created_at_ms: now, last_seen_ms: now };
    hub.store.put_session(&sha256_hex(&value), &session)?;
    Ok(value)
}

pub fn end_session(hub: &Hub, cookie_value: &str) -> Result<(), store::Error> {
    hub.store.delete_session(&sha256_hex(cookie_value))
}

/// The principal behind a session cookie, enforcing timeouts and refreshing `last_seen`.
pub fn principal_from_session(hub: &Hub, cookie_value: &str) -> Result<Option<Principal>, store::Error> {
    if cookie_value.len() != 64 {
        return Ok(None);
    }
    let key = sha256_hex(cookie_value);
    let Some(mut session) = hub.store.session(&key)? else { return Ok(None) };
    let now = crate::wall_ms();
    let idle = (hub.config.session_idle_timeout_secs as i64).saturating_mul(1000);
    let absolute = (hub.config.session_absolute_timeout_secs as i64).saturating_mul(1000);
    if now - session.last_seen_ms > idle || now - session.created_at_ms > absolute {
        hub.store.delete_session(&key)?;
        return Ok(None);
    }
    let Some(user) = hub.store.user_by_email(&session.email)? else { return Ok(None) };
    if user.disabled || user.id != session.user_id {
        hub.store.delete_session(&key)?;
        return Ok(None);
    }
    // Refresh at most once a minute to keep writes down.
    if now - session.last_seen_ms > 60_000 {
        session.last_seen_ms = now;
        hub.store.put_session(&key, &session)?;
    }
    Ok(Some(Principal { id: user.id, name: user.email, operator: user.operator, org: None, via_cookie: true }))
}

/// Create an API key; returns the record and the full key text (shown once).
pub fn create_api_key(hub: &Hub, name: &str, org: Option<String>, created_by: &str) -> Result<(ApiKey, String), store::Error> {
    let id = random_hex(8);
    let secret = random_hex(32);
    let key = ApiKey {
        id: id.clone(),
        name: name.to_string(),
        secret_sha256: sha256_hex(&secret),
        org,
        created_by: created_by.to_string(),
        created_at_ms: crate::wall_ms(),
        revoked: false,
    };
    hub.store.create_api_key(&key)?;
    Ok((key, format!("{API_KEY_PREFIX}{id}.{secret}")))
}

/// The principal behind an API key text.
pub fn principal_from_api_key(hub: &Hub, text: &str) -> Result<Option<Principal>, store::Error> {
    let Some(rest) = text.strip_prefix(API_KEY_PREFIX) else { return Ok(None) };
    let Some((id, secret)) = rest.split_once('.') else { return Ok(None) };
    if id.len() > 64 || secret.len() > 128 {
        return Ok(None);
    }
    let Some(key) = hub.store.api_key(id)? else { return Ok(None) };
    let presented = sha256_hex(secret);
    if key.revoked || !bool::from(presented.as_bytes().ct_eq(key.secret_sha256.as_bytes())) {
        return Ok(None);
    }
    Ok(Some(Principal { id: key.id.clone(), name: format!("key:{}", key.id), operator: key.org.is_none(), org: key.org, via_cookie: false }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_with_argon2id_and_verify() {
        let hash = hash_password("correct horse battery staple").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        assert!(verify_password(&hash, "correct horse battery staple"));
        assert!(!verify_password(&hash, "correct horse battery stapl"));
        let long = "x".repeat(500);
        let hash = hash_password(&long).unwrap();
        assert!(verify_password(&hash, &long));
        assert!(!verify_password(&hash, &"x".repeat(499)), "long passphrases are not truncated");
    }

    #[test]
    fn policy_refuses_short_passwords() {
        assert!(check_password_policy("short").is_err());
        assert!(check_password_policy("long enough password").is_ok());
    }
}
