//! `sign-token`: a JWT for gateways with `--auth`, so that `--token` can measure what
//! authentication costs (docs/performance.md).

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// A token for `sub`, valid for `exp_secs`, allowing every topic, signed with `key` (an HMAC
/// secret file as the gateway reads it, or a PKCS#8 PEM private key).
///
/// # Errors
/// An unknown algorithm or an unreadable key.
pub fn sign(key: &Path, alg: &str, exp_secs: u64, sub: &str) -> Result<String> {
    let alg: Algorithm = alg
        .parse()
        .with_context(|| format!("unknown algorithm {alg}"))?;
    let bytes = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let encoding = match alg {
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
            // As the gateway reads its secret file: without the trailing newline.
            let secret = bytes.trim_ascii_end();
            EncodingKey::from_secret(secret)
        }
        Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&bytes),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&bytes),
        _ => EncodingKey::from_rsa_pem(&bytes),
    }
    .with_context(|| format!("{} is not a {alg:?} key", key.display()))?;
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + exp_secs;
    if exp_secs == 0 {
        bail!("--exp-secs must be at least 1");
    }
    let claims = serde_json::json!({"sub": sub, "exp": exp, "topics": ["*"]});
    Ok(jsonwebtoken::encode(&Header::new(alg), &claims, &encoding)?)
}
