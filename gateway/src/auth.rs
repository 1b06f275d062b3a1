//! Connection authentication (DESIGN §10): JSON Web Tokens verified against an HMAC secret, a
//! PEM public key (RSA, EC, Ed25519) or a JWKS file that is re-read when it changes.
//!
//! A token's `alg` must belong to its key's family: `none` is not an algorithm here, and an
//! HMAC token checked against a public key (the classic confusion attack) is refused before
//! any signature is computed. `exp` is required; `nbf`, `aud` and `iss` are checked when
//! present or configured, with a small clock leeway ([`DEFAULT_LEEWAY_SECS`]). The `topics` claim lists the
//! patterns (exact names, `prefix:*`, `*`) the connection may join; without it, nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::history::Patterns;

/// Longest token accepted (bytes): far above any real token, far below anything that could
/// cost memory or time to look at.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Default clock leeway for `exp` and `nbf`, in seconds (`--jwt-leeway-secs`).
pub const DEFAULT_LEEWAY_SECS: u64 = 5;
/// How often a JWKS file is checked for changes (at most; only when a token is verified).
const JWKS_CHECK: Duration = Duration::from_secs(1);
/// Most keys read from a JWKS file.
const MAX_JWKS_KEYS: usize = 64;
/// Largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// Who may connect (`--auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No authentication: any client may join any topic (the seed's behaviour).
    Off,
    /// Connections without a token may join only `--anonymous-topics`.
    Optional,
    /// Every connection authenticates, on the upgrade or with its first message.
    Required,
}

/// What `--auth` and the key flags configure.
#[derive(Clone)]
pub struct AuthSettings {
    pub mode: AuthMode,
    /// Present unless the mode is off.
    pub verifier: Option<Arc<Verifier>>,
    /// What connections without a token may join (optional mode).
    pub anonymous_topics: Patterns,
    /// How long a connection may take to send `auth.authenticate` (required mode, no token on
    /// the upgrade).
    pub timeout: Duration,
    /// Clock leeway: a token is accepted, and its connection kept, this long past `exp`.
    pub leeway: Duration,
}

impl AuthSettings {
    /// Authentication off: today's behaviour.
    pub fn off() -> Self {
        Self {
            mode: AuthMode::Off,
            verifier: None,
            anonymous_topics: Patterns::default(),
            timeout: Duration::from_secs(5),
            leeway: Duration::from_secs(DEFAULT_LEEWAY_SECS),
        }
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("mode", &self.mode)
            .field("anonymous_topics", &self.anonymous_topics)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why a token (or the lack of one) was refused: the `reason` label of
/// `wsgate_auth_failures_total`, and the message clients get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token where one is required.
    Missing,
    /// Over [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// Not three base64url parts, or a header or payload that is not the JSON expected.
    Malformed,
    /// `alg` is `none`, unknown, or not of the key's family.
    Algorithm,
    /// No key has the token's `kid` (or the token has none and there are several keys).
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp`.
    Expired,
    /// Before `nbf`.
    NotYetValid,
    /// `aud` is not the configured audience.
    Audience,
    /// `iss` is not the configured issuer.
    Issuer,
    /// A required claim is missing or has the wrong type (`exp`, `sub`, `topics`).
    Claims,
    /// No `auth.authenticate` within `--auth-timeout-ms`.
    Timeout,
}

impl AuthFailure {
    /// Every failure, for metric initialisation.
    pub const ALL: [AuthFailure; 12] = [
        AuthFailure::Missing,
        AuthFailure::TooLarge,
        AuthFailure::Malformed,
        AuthFailure::Algorithm,
        AuthFailure::UnknownKey,
        AuthFailure::BadSignature,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::Audience,
        AuthFailure::Issuer,
        AuthFailure::Claims,
        AuthFailure::Timeout,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::TooLarge => "too_large",
            AuthFailure::Malformed => "malformed",
            AuthFailure::Algorithm => "algorithm",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::Audience => "audience",
            AuthFailure::Issuer => "issuer",
            AuthFailure::Claims => "claims",
            AuthFailure::Timeout => "timeout",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::Missing => "a token is required",
            AuthFailure::TooLarge => "token too large",
            AuthFailure::Malformed => "malformed token",
            AuthFailure::Algorithm => "token algorithm not accepted",
            AuthFailure::UnknownKey => "unknown signing key",
            AuthFailure::BadSignature => "invalid token signature",
            AuthFailure::Expired => "token expired",
            AuthFailure::NotYetValid => "token not yet valid",
            AuthFailure::Audience => "token audience not accepted",
            AuthFailure::Issuer => "token issuer not accepted",
            AuthFailure::Claims => "token claims invalid",
            AuthFailure::Timeout => "authentication timeout",
        }
    }
}

/// Who a verified token says the connection is, and what it may join.
#[derive(Debug, Clone)]
pub struct Identity {
    /// `sub`, the user.
    pub user: Option<crate::types::UserId>,
    /// The `topics` claim.
    pub topics: Patterns,
    /// `exp`, in seconds since the Unix epoch.
    pub expires_at: u64,
}

impl Identity {
    /// How long until the token expires (zero when it has).
    pub fn remaining(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        Duration::from_secs(self.expires_at.saturating_sub(now))
    }
}

/// One verification key and the `kid` it answers to (JWKS keys; `None` for a single key).
struct Key {
    kid: Option<String>,
    key: DecodingKey,
}

/// Where the keys come from.
enum Keys {
    /// A secret or a public key, read once at start.
    Fixed(Arc<[Key]>),
    /// A JWKS file, re-read when it changes.
    Jwks(Mutex<Reloading<[Key]>>),
}

/// What identifies a file's content (modification time, length).
type Stamp = Option<(SystemTime, u64)>;

/// What a file holds, read again when it changes: checked (its modification time and length)
/// at most every [`JWKS_CHECK`], when the value is asked for. A file that no longer reads
/// keeps the value in force: a half-written or emptied file must not lock everyone out.
struct Reloading<T: ?Sized> {
    path: PathBuf,
    checked: Instant,
    /// What identified the file's content when it was last read.
    stamp: Stamp,
    value: Arc<T>,
    read: fn(&Path) -> Result<Arc<T>, String>,
    /// What the file holds, for the logs.
    what: &'static str,
}

impl<T: ?Sized> Reloading<T> {
    fn new(
        path: &Path,
        read: fn(&Path) -> Result<Arc<T>, String>,
        what: &'static str,
    ) -> Result<Self, String> {
        let stamp = stamp(path);
        Ok(Self {
            value: read(path)?,
            path: path.to_owned(),
            checked: Instant::now(),
            stamp,
            read,
            what,
        })
    }

    fn get(&mut self) -> Arc<T> {
        if self.checked.elapsed() >= JWKS_CHECK {
            self.checked = Instant::now();
            let now = stamp(&self.path);
            if now != self.stamp {
                match (self.read)(&self.path) {
                    Ok(value) => {
                        tracing::info!(path = %self.path.display(), "{} reloaded", self.what);
                        self.value = value;
                    }
                    Err(e) => tracing::warn!(error = %e, "{} not reloaded", self.what),
                }
                self.stamp = now;
            }
        }
        self.value.clone()
    }
}

/// Checks tokens.
pub struct Verifier {
    keys: Keys,
    audience: Option<String>,
    issuer: Option<String>,
    leeway_secs: u64,
}

/// Where a verifier finds its key (exactly one of the `--jwt-*-file` flags).
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `--jwt-secret-file`: the HMAC secret (the file's bytes, a trailing newline removed).
    Secret(PathBuf),
    /// `--jwt-public-key-file`: a PEM public key (RSA, EC P-256/P-384, Ed25519).
    PublicKey(PathBuf),
    /// `--jwt-jwks-file`: a JSON Web Key Set.
    Jwks(PathBuf),
}

#[derive(Deserialize)]
struct PeekHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The claims read past what the library validates; typed by hand, so that a claim of the
/// wrong type is a claims error rather than a malformed token.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    exp: Option<serde_json::Value>,
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    topics: Option<serde_json::Value>,
}

impl Verifier {
    /// Reads the key and builds a verifier.
    ///
    /// # Errors
    /// A message saying what is wrong with the key file.
    pub fn new(
        source: &KeySource,
        audience: Option<String>,
        issuer: Option<String>,
        leeway_secs: u64,
    ) -> Result<Self, String> {
        let keys = match source {
            KeySource::Secret(path) => {
                let mut secret = read(path, 64 * 1024)?;
                while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    secret.pop();
                }
                if secret.len() < 32 {
                    return Err(format!(
                        "{}: an HMAC secret needs at least 32 bytes",
                        path.display()
                    ));
                }
                let key = DecodingKey::from_secret(&secret)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Keys::Fixed(Arc::from([Key { kid: None, key }]))
            }
            KeySource::PublicKey(path) => {
                let pem = read(path, 64 * 1024)?;
                let key = DecodingKey::from_rsa_pem(&pem)
                    .or_else(|_| DecodingKey::from_ec_pem(&pem))
                    .or_else(|_| DecodingKey::from_ed_pem(&pem))
                    .map_err(|_| {
                        format!(
                            "{}: not a PEM RSA, EC or Ed25519 public key",
                            path.display()
                        )
                    })?;
                Keys::Fixed(Arc::from([Key { kid: None, key }]))
            }
            KeySource::Jwks(path) => {
                Keys::Jwks(Mutex::new(Reloading::new(path, read_jwks, "JWKS")?))
            }
        };
        Ok(Self {
            keys,
            audience,
            issuer,
            leeway_secs,
        })
    }

    /// The keys in force (re-reading a JWKS file that changed).
    fn keys(&self) -> Arc<[Key]> {
        match &self.keys {
            Keys::Fixed(keys) => keys.clone(),
            Keys::Jwks(file) => file.lock().unwrap_or_else(PoisonError::into_inner).get(),
        }
    }

    /// Verifies `token`.
    ///
    /// # Errors
    /// Why it is not accepted.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        if token.is_empty() {
            return Err(AuthFailure::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthFailure::TooLarge);
        }
        let header = peek_header(token)?;
        let alg: Algorithm = header.alg.parse().map_err(|_| AuthFailure::Algorithm)?;
        let keys = self.keys();
        let key = match &header.kid {
            Some(kid) => keys.iter().find(|k| k.kid.as_deref() == Some(kid.as_str())),
            None if keys.len() == 1 => keys.first(),
            None => None,
        }
        .or_else(|| {
            // A single fixed key answers whatever `kid` the token names.
            matches!(self.keys, Keys::Fixed(_))
                .then(|| keys.first())
                .flatten()
        })
        .ok_or(AuthFailure::UnknownKey)?;
        if key.key.family() != alg.family() {
            return Err(AuthFailure::Algorithm);
        }
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway_secs;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &validation).map_err(|e| {
            match e.kind() {
                ErrorKind::ExpiredSignature => AuthFailure::Expired,
                ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
                ErrorKind::InvalidAudience => AuthFailure::Audience,
                ErrorKind::InvalidIssuer => AuthFailure::Issuer,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::MissingAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::UnsupportedAlgorithm => AuthFailure::Algorithm,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidClaimFormat(_) => {
                    AuthFailure::Claims
                }
                ErrorKind::InvalidToken
                | ErrorKind::Base64(_)
                | ErrorKind::Json(_)
                | ErrorKind::Utf8(_) => AuthFailure::Malformed,
                // A signature that does not verify, or does not even decode as one.
                _ => AuthFailure::BadSignature,
            }
        })?;
        let claims = data.claims;
        let topics = match &claims.topics {
            None => Patterns::default(),
            Some(serde_json::Value::Array(list)) => {
                let items: Option<Vec<&str>> = list.iter().map(|v| v.as_str()).collect();
                let items = items.ok_or(AuthFailure::Claims)?;
                Patterns::from_items(items).map_err(|_| AuthFailure::Claims)?
            }
            Some(_) => return Err(AuthFailure::Claims),
        };
        let user = match claims.sub {
            None => None,
            Some(serde_json::Value::String(s)) => {
                Some(crate::types::UserId::new(&s).map_err(|_| AuthFailure::Claims)?)
            }
            Some(_) => return Err(AuthFailure::Claims),
        };
        // Required and checked by the library; a number it accepted.
        let expires_at = claims
            .exp
            .and_then(|e| e.as_u64().or_else(|| e.as_f64().map(|f| f as u64)))
            .ok_or(AuthFailure::Claims)?;
        Ok(Identity {
            user,
            topics,
            expires_at,
        })
    }
}

/// The API keys `/api/*` accepts: those given with `--api-key` (repeatable, or a comma list in
/// `WSGATE_API_KEY`) and those in `--api-keys-file` (one per line), which is re-read when it
/// changes — so a new key can be added, clients moved to it, and the old one removed, with no
/// restart and no moment without a valid key.
pub struct ApiKeys {
    fixed: Vec<String>,
    file: Option<Mutex<Reloading<[String]>>>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys themselves.
        f.debug_struct("ApiKeys")
            .field("fixed", &self.fixed.len())
            .field("file", &self.file.is_some())
            .finish()
    }
}

/// Most keys accepted at once.
pub const MAX_API_KEYS: usize = 16;

impl ApiKeys {
    /// Keys from the flags and, if given, the file.
    ///
    /// # Errors
    /// A message naming a bad key or an unreadable file.
    pub fn new(fixed: Vec<String>, file: Option<PathBuf>) -> Result<Self, String> {
        for key in &fixed {
            check_api_key(key)?;
        }
        let file = match file {
            None => None,
            Some(path) => Some(Mutex::new(Reloading::new(
                &path,
                read_api_keys,
                "API keys",
            )?)),
        };
        let keys = Self { fixed, file };
        if keys.count() > MAX_API_KEYS {
            return Err(format!("at most {MAX_API_KEYS} API keys"));
        }
        Ok(keys)
    }

    /// No keys: `/api/*` answers loopback callers only (or everyone, when allowed).
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.file.is_none()
    }

    fn count(&self) -> usize {
        self.fixed.len() + self.file_keys().map_or(0, |k| k.len())
    }

    fn file_keys(&self) -> Option<Arc<[String]>> {
        let file = self.file.as_ref()?;
        Some(file.lock().unwrap_or_else(PoisonError::into_inner).get())
    }

    /// Whether `token` is one of the keys, compared in constant time with each.
    pub fn accepts(&self, token: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let matches =
            |key: &String| key.len() == token.len() && bool::from(key.as_bytes().ct_eq(token));
        // Every key is compared, whichever matches: the time does not tell which.
        let fixed = self.fixed.iter().fold(false, |any, k| any | matches(k));
        let file = self
            .file_keys()
            .is_some_and(|keys| keys.iter().fold(false, |any, k| any | matches(k)));
        fixed | file
    }
}

fn check_api_key(key: &str) -> Result<(), String> {
    if key.len() < 16
        || key.len() > 1024
        || key
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ',')
    {
        return Err(
            "an API key is 16 to 1024 characters, without spaces, commas or control characters"
                .into(),
        );
    }
    Ok(())
}

/// One key per line; blank lines and lines starting with `#` are skipped.
fn read_api_keys(path: &Path) -> Result<Arc<[String]>, String> {
    let text = String::from_utf8(read(path, 64 * 1024)?)
        .map_err(|_| format!("{}: not UTF-8", path.display()))?;
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for key in &keys {
        check_api_key(key).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if keys.is_empty() {
        return Err(format!("{}: no key", path.display()));
    }
    if keys.len() > MAX_API_KEYS {
        return Err(format!("{}: at most {MAX_API_KEYS} keys", path.display()));
    }
    Ok(Arc::from(keys))
}

/// Browser origins allowed to open WebSocket connections (`--allowed-origins`): exact
/// `scheme://host[:port]`, or `scheme://*.domain` for its subdomains.
#[derive(Debug, Clone, Default)]
pub struct Origins {
    exact: Vec<String>,
    /// (scheme, `.domain` suffix).
    subdomains: Vec<(String, String)>,
}

impl Origins {
    /// Parses a comma-separated list.
    ///
    /// # Errors
    /// A message naming the first bad origin.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let Some((scheme, host)) = lower.split_once("://") else {
                return Err(format!("{item:?}: an origin is scheme://host[:port]"));
            };
            let host_ok = |h: &str| {
                !h.is_empty()
                    && h.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                    })
            };
            if !matches!(scheme, "http" | "https") {
                return Err(format!("{item:?}: the scheme is http or https"));
            }
            match host.strip_prefix("*.") {
                Some(domain) if host_ok(domain) => out
                    .subdomains
                    .push((scheme.to_owned(), format!(".{domain}"))),
                None if host_ok(host) => out.exact.push(lower),
                _ => {
                    return Err(format!(
                        "{item:?}: an origin is scheme://host[:port], without a path"
                    ));
                }
            }
        }
        Ok(out)
    }

    /// No list: every origin is allowed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.subdomains.is_empty()
    }

    /// Whether a browser from `origin` (the `Origin` header) may connect.
    pub fn allows(&self, origin: &str) -> bool {
        if self.is_empty() {
            return true;
        }
        let origin = origin.to_ascii_lowercase();
        if self.exact.contains(&origin) {
            return true;
        }
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        self.subdomains.iter().any(|(s, suffix)| {
            s == scheme && host.ends_with(suffix.as_str()) && host.len() > suffix.len()
        })
    }
}

/// The token's header, read before anything is verified only to pick the key and the
/// algorithm: nothing in it is trusted.
fn peek_header(token: &str) -> Result<PeekHeader, AuthFailure> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthFailure::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| AuthFailure::Malformed)
}

fn read(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > max {
        return Err(format!("{}: larger than {max} bytes", path.display()));
    }
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn stamp(path: &Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads a JWKS file: every key it can use (RSA, EC, OKP, oct), by `kid`.
fn read_jwks(path: &Path) -> Result<Arc<[Key]>, String> {
    let bytes = read(path, MAX_JWKS_BYTES)?;
    let set: JwkSet = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
    let mut keys = Vec::new();
    for jwk in set.keys.iter().take(MAX_JWKS_KEYS) {
        match DecodingKey::from_jwk(jwk) {
            Ok(key) => keys.push(Key {
                kid: jwk.common.key_id.clone(),
                key,
            }),
            Err(e) => {
                tracing::warn!(kid = ?jwk.common.key_id, error = %e, "JWKS key skipped");
            }
        }
    }
    if keys.is_empty() {
        return Err(format!("{}: no usable key", path.display()));
    }
    Ok(Arc::from(keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test";

    fn secret_file(dir: &Path) -> PathBuf {
        let path = dir.join("secret");
        std::fs::write(&path, [SECRET, b"\n"].concat()).unwrap();
        path
    }

    fn tmp() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wsgate-auth-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn hs(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn origins_match_exactly_or_by_subdomain() {
        let o =
            Origins::parse("https://app.example.com, http://localhost:3000, https://*.example.org")
                .unwrap();
        assert!(o.allows("https://app.example.com"));
        assert!(o.allows("HTTPS://APP.EXAMPLE.COM"));
        assert!(o.allows("http://localhost:3000"));
        assert!(o.allows("https://a.b.example.org"));
        for refused in [
            "https://evil.com",
            "http://app.example.com",
            "https://app.example.com.evil.com",
            "https://example.org",
            "https://evilexample.org",
            "http://a.example.org",
            "http://localhost:3001",
            "null",
            "",
        ] {
            assert!(!o.allows(refused), "{refused}");
        }
        assert!(Origins::parse("").unwrap().allows("https://anything"));
        for bad in [
            "example.com",
            "ftp://x",
            "https://x/path",
            "https://",
            "https://*.",
        ] {
            assert!(Origins::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn api_keys_from_flags_and_a_file_that_is_reread_when_it_changes() {
        let dir = tmp();
        let path = dir.join("keys");
        std::fs::write(&path, "# current\nkey-from-the-file-0001\n\n").unwrap();
        let keys = ApiKeys::new(vec!["key-from-the-flag-001".into()], Some(path.clone())).unwrap();
        assert!(keys.accepts(b"key-from-the-flag-001"));
        assert!(keys.accepts(b"key-from-the-file-0001"));
        assert!(!keys.accepts(b"key-from-the-file-0002"));
        assert!(!keys.accepts(b"key-from-the-file-000"));
        // Rotation: both, then only the new one.
        std::fs::write(&path, "key-from-the-file-0001\nkey-from-the-file-0002\n").unwrap();
        keys.file.as_ref().unwrap().lock().unwrap().checked = Instant::now() - JWKS_CHECK;
        assert!(keys.accepts(b"key-from-the-file-0002"));
        assert!(keys.accepts(b"key-from-the-file-0001"));
        std::fs::write(&path, "key-from-the-file-0002\n").unwrap();
        {
            let mut f = keys.file.as_ref().unwrap().lock().unwrap();
            f.checked = Instant::now() - JWKS_CHECK;
            f.stamp = None;
        }
        assert!(!keys.accepts(b"key-from-the-file-0001"));
        assert!(keys.accepts(b"key-from-the-file-0002"));
        // An emptied file keeps the keys in force.
        std::fs::write(&path, "").unwrap();
        keys.file.as_ref().unwrap().lock().unwrap().checked = Instant::now() - JWKS_CHECK;
        assert!(keys.accepts(b"key-from-the-file-0002"));
        assert!(ApiKeys::new(vec!["short".into()], None).is_err());
        assert!(ApiKeys::new(vec![], Some(dir.join("missing"))).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_hmac_token_gives_its_user_topics_and_expiry() {
        let dir = tmp();
        let v = Verifier::new(
            &KeySource::Secret(secret_file(&dir)),
            None,
            None,
            DEFAULT_LEEWAY_SECS,
        )
        .unwrap();
        let exp = now() + 60;
        let id = v
            .verify(&hs(
                json!({"sub": "u1", "exp": exp, "topics": ["news", "chat:*"]}),
            ))
            .unwrap();
        assert_eq!(id.user.as_ref().map(|u| u.as_str()), Some("u1"));
        assert_eq!(id.expires_at, exp);
        assert!(id.topics.matches("news") && id.topics.matches("chat:1"));
        assert!(!id.topics.matches("other"));
        // No topics claim: nothing may be joined.
        let id = v.verify(&hs(json!({"exp": exp}))).unwrap();
        assert!(id.topics.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let dir = tmp();
        let v = Verifier::new(
            &KeySource::Secret(secret_file(&dir)),
            Some("app".into()),
            Some("issuer".into()),
            DEFAULT_LEEWAY_SECS,
        )
        .unwrap();
        let good = json!({"exp": now() + 60, "aud": "app", "iss": "issuer"});
        assert!(v.verify(&hs(good.clone())).is_ok());
        let with = |k: &str, val: serde_json::Value| {
            let mut c = good.clone();
            c[k] = val;
            hs(c)
        };
        assert_eq!(
            v.verify(&with("exp", json!(now() - 60))).err(),
            Some(AuthFailure::Expired)
        );
        assert_eq!(
            v.verify(&with("nbf", json!(now() + 60))).err(),
            Some(AuthFailure::NotYetValid)
        );
        assert_eq!(
            v.verify(&with("aud", json!("other"))).err(),
            Some(AuthFailure::Audience)
        );
        assert_eq!(
            v.verify(&with("iss", json!("other"))).err(),
            Some(AuthFailure::Issuer)
        );
        assert_eq!(
            v.verify(&with("topics", json!(["a b"]))).err(),
            Some(AuthFailure::Claims)
        );
        assert_eq!(
            v.verify(&with("topics", json!(["a,b"]))).err(),
            Some(AuthFailure::Claims)
        );
        assert_eq!(
            v.verify(&with("topics", json!("news"))).err(),
            Some(AuthFailure::Claims)
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(v.verify(&hs(no_exp)).err(), Some(AuthFailure::Claims));
        // Signed with another secret.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &good,
            &EncodingKey::from_secret(b"another secret, just as long as the first").unwrap(),
        )
        .unwrap();
        assert_eq!(v.verify(&forged).err(), Some(AuthFailure::BadSignature));
        // alg none, and garbage.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let none = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&good.to_string())
        );
        assert_eq!(v.verify(&none).err(), Some(AuthFailure::Algorithm));
        for bad in [
            "",
            "a",
            "a.b",
            "a.b.c.d",
            "!!.!!.!!",
            &format!("{}.x.y", b64("[]")),
        ] {
            let want = if bad.is_empty() {
                AuthFailure::Missing
            } else {
                AuthFailure::Malformed
            };
            assert_eq!(v.verify(bad).err(), Some(want), "{bad}");
        }
        assert_eq!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)).err(),
            Some(AuthFailure::TooLarge)
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_short_secret_and_an_unreadable_key_are_configuration_errors() {
        let dir = tmp();
        let short = dir.join("short");
        std::fs::write(&short, b"too short").unwrap();
        assert!(Verifier::new(&KeySource::Secret(short), None, None, DEFAULT_LEEWAY_SECS).is_err());
        let garbage = dir.join("garbage.pem");
        std::fs::write(
            &garbage,
            b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        assert!(
            Verifier::new(
                &KeySource::PublicKey(garbage),
                None,
                None,
                DEFAULT_LEEWAY_SECS
            )
            .is_err()
        );
        assert!(
            Verifier::new(
                &KeySource::Jwks(dir.join("missing")),
                None,
                None,
                DEFAULT_LEEWAY_SECS
            )
            .is_err()
        );
        let empty = dir.join("empty.json");
        std::fs::write(&empty, br#"{"keys":[]}"#).unwrap();
        assert!(Verifier::new(&KeySource::Jwks(empty), None, None, DEFAULT_LEEWAY_SECS).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn jwks_keys_are_picked_by_kid_and_reloaded_when_the_file_changes() {
        let dir = tmp();
        let path = dir.join("jwks.json");
        let b64 = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let set = |keys: &[(&str, &[u8])]| {
            json!({"keys": keys.iter().map(|(kid, k)| json!({"kty": "oct", "kid": kid, "k": b64(k), "alg": "HS256"})).collect::<Vec<_>>()})
                .to_string()
        };
        let (k1, k2) = (
            b"first key, thirty-two bytes long!!".as_slice(),
            b"second key, thirty-two bytes long!".as_slice(),
        );
        std::fs::write(&path, set(&[("one", k1)])).unwrap();
        let v = Verifier::new(
            &KeySource::Jwks(path.clone()),
            None,
            None,
            DEFAULT_LEEWAY_SECS,
        )
        .unwrap();
        let token = |kid: &str, key: &[u8]| {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some(kid.into());
            encode(
                &h,
                &json!({"exp": now() + 60}),
                &EncodingKey::from_secret(key).unwrap(),
            )
            .unwrap()
        };
        assert!(v.verify(&token("one", k1)).is_ok());
        assert_eq!(
            v.verify(&token("two", k2)).err(),
            Some(AuthFailure::UnknownKey)
        );
        // Rotation: two keys, then only the new one.
        std::fs::write(&path, set(&[("one", k1), ("two", k2)])).unwrap();
        if let Keys::Jwks(f) = &v.keys {
            f.lock().unwrap().checked = Instant::now() - JWKS_CHECK;
        }
        assert!(v.verify(&token("two", k2)).is_ok());
        assert!(v.verify(&token("one", k1)).is_ok());
        std::fs::write(&path, set(&[("two", k2)])).unwrap();
        if let Keys::Jwks(f) = &v.keys {
            let mut f = f.lock().unwrap();
            f.checked = Instant::now() - JWKS_CHECK;
            f.stamp = None; // the same length: make sure the change is seen
        }
        assert_eq!(
            v.verify(&token("one", k1)).err(),
            Some(AuthFailure::UnknownKey)
        );
        // A broken file keeps the keys in force.
        std::fs::write(&path, b"{not json").unwrap();
        if let Keys::Jwks(f) = &v.keys {
            f.lock().unwrap().checked = Instant::now() - JWKS_CHECK;
        }
        assert!(v.verify(&token("two", k2)).is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn verifier() -> (PathBuf, Verifier) {
            let dir = tmp();
            let v = Verifier::new(
                &KeySource::Secret(secret_file(&dir)),
                None,
                None,
                DEFAULT_LEEWAY_SECS,
            )
            .unwrap();
            (dir, v)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever arrives as a token — printable text, three dotted parts, base64url
            /// alphabets — is refused with a reason, never a panic.
            #[test]
            fn any_string_is_refused_with_a_reason_never_a_panic(
                token in prop_oneof![
                    "\\PC{0,200}",
                    "[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,60}",
                    "eyJ[A-Za-z0-9_-]{0,80}\\.eyJ[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,86}",
                ]
            ) {
                let (dir, v) = verifier();
                prop_assert!(v.verify(&token).is_err());
                std::fs::remove_dir_all(dir).unwrap();
            }

            /// A correctly signed token is accepted exactly when its claims are: `exp` in the
            /// future (beyond the leeway), `topics` a list of valid patterns, `sub` a valid id.
            #[test]
            fn a_signed_token_is_accepted_exactly_when_its_claims_are_valid(
                exp_offset in -100i64..100,
                topics in proptest::collection::vec("[a-z:*]{0,6}", 0..4),
                sub in "\\PC{0,8}",
            ) {
                let (dir, v) = verifier();
                let exp = (now() as i64 + exp_offset).max(0) as u64;
                let claims = json!({"exp": exp, "sub": sub, "topics": topics});
                let result = v.verify(&hs(claims));
                let topics_ok = Patterns::from_items(topics.iter().map(String::as_str)).is_ok();
                let sub_ok = crate::types::UserId::new(&sub).is_ok();
                let alive = exp_offset > DEFAULT_LEEWAY_SECS as i64;
                let dead = exp_offset < -(DEFAULT_LEEWAY_SECS as i64) - 1;
                if dead {
                    prop_assert_eq!(result.err(), Some(AuthFailure::Expired));
                } else if alive {
                    prop_assert_eq!(result.is_ok(), topics_ok && sub_ok, "{:?}", result.err());
                }
                std::fs::remove_dir_all(dir).unwrap();
            }

            /// The pattern matcher: an exact pattern matches only itself, `stem*` every topic
            /// that starts with the stem, `*` everything — whatever the other patterns.
            #[test]
            fn patterns_match_what_their_form_says(
                stems in proptest::collection::vec("[a-z0-9:._-]{1,8}", 1..6),
                prefixes in proptest::collection::vec(any::<bool>(), 1..6),
                topic in "[a-z0-9:._-]{1,12}",
            ) {
                let items: Vec<String> = stems
                    .iter()
                    .zip(prefixes.iter().cycle())
                    .map(|(s, p)| if *p { format!("{s}*") } else { s.clone() })
                    .collect();
                let patterns = Patterns::from_items(items.iter().map(String::as_str)).unwrap();
                let expected = stems.iter().zip(prefixes.iter().cycle()).any(|(s, p)| {
                    if *p { topic.starts_with(s.as_str()) } else { topic == *s }
                });
                prop_assert_eq!(patterns.matches(&topic), expected);
                let mut all = items.clone();
                all.push("*".into());
                let everything = Patterns::from_items(all.iter().map(String::as_str)).unwrap();
                prop_assert!(everything.matches(&topic));
            }
        }
    }
}
