//! Authentication of people and API clients: argon2id password hashes, login sessions
//! (random ids, stored hashed, idle and absolute timeouts) and API keys (prefixed id plus a
//! secret shown once, stored hashed).
//!
//! This module decides who a credential belongs to; it does not know routes or HTTP
//! framing beyond the header and cookie values it is handed.

use crate::access::{Access, Perm, Perms, Refusal, Scope};
use crate::store::{self, ApiKey, Session, User};
use crate::Hub;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use gantry_shared::token::hex;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Name of the session cookie over plain HTTP. Do not read or set the cookie by this name:
/// [`session_cookie_name`] decides which name applies.
pub const SESSION_COOKIE: &str = "gantry_session";
/// Name of the session cookie when browsers reach the hub over HTTPS. The `__Host-` prefix
/// makes browsers accept it only with `Secure`, `Path=/` and no `Domain`, so a sibling
/// subdomain or a plain-HTTP page cannot plant or overwrite it.
pub const SECURE_SESSION_COOKIE: &str = "__Host-gantry_session";

/// The session cookie's name under `config`: [`SECURE_SESSION_COOKIE`] when cookies are
/// `Secure` (the hub serves TLS, or `public_url` is `https://`), else [`SESSION_COOKIE`]
/// (browsers refuse `__Host-` cookies without `Secure`). Setting and reading the cookie
/// both go through this one decision.
pub fn session_cookie_name(config: &crate::config::Config) -> &'static str {
    if config.secure_cookies() {
        SECURE_SESSION_COOKIE
    } else {
        SESSION_COOKIE
    }
}
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
    /// Where it may act and how: roles for people, scopes for keys.
    pub access: Access,
}

impl Principal {
    /// The caller's permissions in `org`, checked; see `api::authorize` for the answers.
    pub fn check(&self, org: &str, perm: Perm) -> Result<(), Refusal> {
        self.access.check(org, perm)
    }
}

/// A user's access: everything for operators, otherwise their memberships.
pub fn access_of_user(hub: &Hub, user: &User) -> Result<Access, store::Error> {
    if user.operator {
        return Ok(Access::operator());
    }
    let orgs = hub.store.memberships_of(&user.id)?.into_iter().map(|m| (m.org, m.role.perms())).collect();
    Ok(Access { everywhere: Perms::NONE, orgs })
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

/// Weakest zxcvbn score a new password may have: 3 means about 10^8 to 10^10 guesses, out of
/// reach of online guessing and costly offline against argon2id.
pub const MIN_PASSWORD_SCORE: zxcvbn::Score = zxcvbn::Score::Three;

/// Check a new password for the account `email` against the policy: 12 characters to 1024
/// bytes, and not common or guessable (a zxcvbn score of at least [`MIN_PASSWORD_SCORE`],
/// with the email, its parts and "gantry" counted as words an attacker tries first). zxcvbn
/// reads the first 100 characters; the whole password is hashed, never truncated.
pub fn check_password_policy(password: &str, email: &str) -> Result<(), String> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(format!("password must be at least {MIN_PASSWORD_CHARS} characters"));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(format!("password must be at most {MAX_PASSWORD_BYTES} bytes"));
    }
    let inputs = guessable_words(email);
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    let estimate = zxcvbn::zxcvbn(password, &inputs);
    if estimate.score() >= MIN_PASSWORD_SCORE {
        return Ok(());
    }
    // zxcvbn's feedback is sentences ("This is a very common password."); fold it into one
    // lowercase message.
    let mut advice: Vec<String> = Vec::new();
    if let Some(feedback) = estimate.feedback() {
        advice.extend(feedback.warning().map(|w| w.to_string()));
        advice.extend(feedback.suggestions().iter().map(|s| s.to_string()));
    }
    if advice.is_empty() {
        advice.push("Add another word or two.".to_string());
    }
    let advice: Vec<String> = advice.iter().map(|text| lowercase_first(text.trim_end_matches('.'))).collect();
    Err(format!("password is too common or easy to guess: {}", advice.join("; ")))
}

/// Words tied to the account that a guesser tries first: the email, its local part and
/// domain, their pieces, and the product name.
fn guessable_words(email: &str) -> Vec<String> {
    let email = email.trim().to_lowercase();
    let mut words = vec![email.clone(), "gantry".to_string()];
    if let Some((local, domain)) = email.split_once('@') {
        words.push(local.to_string());
        words.push(domain.to_string());
        words.extend(local.split(['.', '+', '-', '_']).chain(domain.split('.')).map(str::to_string));
    }
    words.retain(|w| w.chars().count() >= 3);
    words.sort();
    words.dedup();
    words
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
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
    check_password_policy(password, &email)?;
    let user = User {
        id: format!("usr_{}", random_hex(8)),
        email,
        password_hash: hash_password(password)?,
        operator,
        disabled: false,
        created_at_ms: crate::wall_ms(),
        totp: None,
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

/// Start the session of a login. The session the request came with, if any, is ended first
/// and the new one always gets a fresh random id, so an id planted in the browser before
/// login (session fixation) never becomes an authenticated session.
pub fn start_login_session(hub: &Hub, user: &User, presented_cookie: Option<&str>) -> Result<String, store::Error> {
    if let Some(old) = presented_cookie {
        end_session(hub, old)?;
    }
    start_session(hub, user)
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
    // Refresh at most once a minute to keep writes down (more often under a short idle
    // timeout, so a session in use never lapses).
    if now - session.last_seen_ms > (idle / 2).min(60_000) {
        session.last_seen_ms = now;
        hub.store.put_session(&key, &session)?;
    }
    let access = access_of_user(hub, &user)?;
    Ok(Some(Principal { id: user.id, name: user.email, operator: user.operator, org: None, via_cookie: true, access }))
}

/// Create an API key with every scope; returns the record and the full key text (shown
/// once).
pub fn create_api_key(hub: &Hub, name: &str, org: Option<String>, created_by: &str) -> Result<(ApiKey, String), store::Error> {
    create_scoped_api_key(
        hub,
        NewApiKey { name: name.to_string(), org, created_by: created_by.to_string(), created_by_user: None, scopes: Scope::all(), expires_at_ms: None },
    )
}

/// What a new API key is.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    pub name: String,
    /// `None`: an operator key, acting across orgs.
    pub org: Option<String>,
    pub created_by: String,
    pub created_by_user: Option<String>,
    pub scopes: Vec<Scope>,
    pub expires_at_ms: Option<i64>,
}

/// Create an API key; returns the record and the full key text (shown once).
pub fn create_scoped_api_key(hub: &Hub, new: NewApiKey) -> Result<(ApiKey, String), store::Error> {
    let id = random_hex(8);
    let secret = random_hex(32);
    let mut scopes = new.scopes;
    scopes.sort();
    scopes.dedup();
    let key = ApiKey {
        id: id.clone(),
        name: new.name,
        secret_sha256: sha256_hex(&secret),
        org: new.org,
        created_by: new.created_by,
        created_at_ms: crate::wall_ms(),
        revoked: false,
        scopes,
        created_by_user: new.created_by_user,
        expires_at_ms: new.expires_at_ms,
        last_used_ms: None,
    };
    hub.store.create_api_key(&key)?;
    Ok((key, format!("{API_KEY_PREFIX}{id}.{secret}")))
}

/// The principal behind an API key text: refused when revoked, expired, or made by a user
/// who has since been disabled. A key never does more than its scopes allow, nor more than
/// its creator may still do.
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
    let now = crate::wall_ms();
    if key.expires_at_ms.is_some_and(|at| now >= at) {
        return Ok(None);
    }
    let granted = match &key.org {
        None => Access::operator(),
        Some(org) => Access { everywhere: Perms::NONE, orgs: [(org.clone(), Perms::all())].into() },
    };
    let creator = match &key.created_by_user {
        None => granted,
        Some(user_id) => match hub.store.user_by_id(user_id)? {
            Some(user) if !user.disabled => {
                let theirs = access_of_user(hub, &user)?;
                // The creator's access, within the key's own reach.
                match &key.org {
                    None if user.operator => theirs,
                    None => return Ok(None),
                    Some(org) => Access { everywhere: Perms::NONE, orgs: [(org.clone(), theirs.perms_in(org))].into() },
                }
            }
            _ => return Ok(None),
        },
    };
    let access = creator.limited_to(Scope::perms_of(&key.scopes));
    if key.last_used_ms.is_none_or(|at| now - at > 60_000) {
        hub.store.update_api_key(&key.id, |k| k.last_used_ms = Some(now))?;
    }
    Ok(Some(Principal { id: key.id.clone(), name: format!("key:{}", key.id), operator: key.org.is_none(), org: key.org, via_cookie: false, access }))
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
        assert!(check_password_policy("short", "ops@example.com").is_err());
        assert!(check_password_policy("long enough password", "ops@example.com").is_ok());
    }

    #[test]
    fn policy_refuses_common_and_guessable_passwords() {
        for weak in ["password1234", "qwertyuiop123", "123456789012", "Password1234!", "aaaaaaaaaaaaaaaa", "gantrygantry1"] {
            let error = check_password_policy(weak, "ops@example.com").unwrap_err();
            assert!(error.starts_with("password is too common or easy to guess: "), "{weak}: {error}");
        }
        let error = check_password_policy("qwertyuiop123", "ops@example.com").unwrap_err();
        assert!(!error.ends_with('.') && error.contains("; "), "one lowercase message: {error}");
        // The account's own email is among the first guesses.
        for own in ["jane.doe@acme.com1", "Acme.com2024!"] {
            assert!(check_password_policy(own, "jane.doe@acme.com").is_err(), "{own}");
            assert!(check_password_policy(own, "ops@example.com").is_ok(), "{own}");
        }
    }

    #[test]
    fn policy_accepts_passphrases_of_any_length_untruncated() {
        assert!(check_password_policy("orbit velvet canyon mosaic", "ops@example.com").is_ok());
        // zxcvbn only reads 100 characters; the policy and the hash take all of them.
        let long: String = ["lantern ", "quarry ", "thimble ", "nebula "].iter().cycle().take(136).copied().collect();
        assert!(long.len() > 1000 && long.len() <= MAX_PASSWORD_BYTES);
        assert!(check_password_policy(&long, "ops@example.com").is_ok());
        let hash = hash_password(&long).unwrap();
        assert!(verify_password(&hash, &long));
        assert!(!verify_password(&hash, &long[..long.len() - 1]));
        assert!(check_password_policy(&format!("{long}too long"), "ops@example.com").is_err());
    }
}
