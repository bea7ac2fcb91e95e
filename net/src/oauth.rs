//! SASL/OAUTHBEARER (RFC 7628; Kafka's KIP-255, and KIP-768's validation
//! of OIDC tokens): the client's initial response, and the check of its
//! JWT against a JWK set — the signature (RS/PS/ES/EdDSA only: no `none`,
//! no shared-secret HS*), expiry, and the issuer and audience when they
//! are configured. The principal is one claim (`sub` by default); the
//! token's expiry ends the session, so the client re-authenticates on the
//! same connection (KIP-368) before then.
//!
//! The JWK set comes from a file (`file:///…`, re-read when it changes) or
//! an HTTP(S) URL (fetched again every few minutes, and at once when a
//! token names a key it does not hold): [`Validator::refresh_loop`] runs
//! on the sidecar. The JWT checks themselves are jsonwebtoken's (on
//! aws-lc-rs); this module is the SASL framing and the policy.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// The mechanism's name.
pub const MECHANISM: &str = "OAUTHBEARER";
/// How often a JWK set file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(5);
/// How often a JWK set URL is fetched again.
const URL_REFRESH: Duration = Duration::from_secs(300);
/// The soonest a URL is fetched again for a key it did not hold.
const URL_REFRESH_MIN: Duration = Duration::from_secs(10);
/// Largest initial response accepted.
const MESSAGE_BYTES_MAX: usize = 64 << 10;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// What OAUTHBEARER checks tokens against (Kafka's
/// `sasl.oauthbearer.jwks.endpoint.url`, `expected.issuer`,
/// `expected.audience`, `sub.claim.name`).
#[derive(Debug, Clone)]
pub struct OAuthConfig {
    /// `file:///path` or `http(s)://…`.
    pub jwks_url: String,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub principal_claim: String,
}

/// A validated token: who, and until when (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub principal: String,
    pub expires_at_ms: u64,
}

pub struct Validator {
    config: OAuthConfig,
    keys: ArcSwap<JwkSet>,
    /// The file's modification time when last read.
    seen: std::sync::Mutex<Option<SystemTime>>,
    /// Set when a token named a key the set lacks (URL sources).
    wanted: tokio::sync::Notify,
}

/// The wall clock in Unix milliseconds (token expiries are on it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The token of an OAUTHBEARER initial response:
/// `gs2-header %x01 ("auth=Bearer " token) %x01 [key=value %x01]* %x01`.
pub fn parse_initial_response(msg: &[u8]) -> Result<&str, String> {
    if msg.len() > MESSAGE_BYTES_MAX {
        return Err(format!("OAUTHBEARER message of {} bytes", msg.len()));
    }
    let text = std::str::from_utf8(msg).map_err(|_| "OAUTHBEARER message is not UTF-8")?;
    let (gs2, rest) = text
        .split_once('\u{1}')
        .ok_or("OAUTHBEARER message lacks its key-value pairs")?;
    if !(gs2.starts_with("n,") || gs2.starts_with("y,")) || !gs2.ends_with(',') {
        return Err(format!("invalid GS2 header {gs2:?}"));
    }
    let rest = rest
        .strip_suffix("\u{1}\u{1}")
        .ok_or("OAUTHBEARER message does not end with two ^A")?;
    let mut token = None;
    for kv in rest.split('\u{1}') {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| format!("malformed key-value pair {kv:?}"))?;
        if k == "auth" {
            let t = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .ok_or("the auth value is not a Bearer token")?;
            token = Some(t.trim());
        }
    }
    token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| "no auth=Bearer token in the OAUTHBEARER message".into())
}

impl Validator {
    pub fn new(config: OAuthConfig) -> Self {
        Self {
            config,
            keys: ArcSwap::from_pointee(JwkSet { keys: Vec::new() }),
            seen: std::sync::Mutex::new(None),
            wanted: tokio::sync::Notify::new(),
        }
    }

    pub fn config(&self) -> &OAuthConfig {
        &self.config
    }

    /// Installs a JWK set (tests, and what `reload` read).
    pub fn set_keys(&self, set: JwkSet) {
        self.keys.store(std::sync::Arc::new(set));
    }

    /// Reads the JWK set from its source; `Ok(false)`: a file that has not
    /// changed since it was last read.
    pub async fn reload(&self) -> Result<bool, String> {
        let url = &self.config.jwks_url;
        let text = if let Some(path) = url.strip_prefix("file://") {
            let modified = std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_err(|e| format!("JWK set {path}: {e}"))?;
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if *seen == Some(modified) {
                return Ok(false);
            }
            let text = std::fs::read_to_string(path).map_err(|e| format!("JWK set {path}: {e}"))?;
            *seen = Some(modified);
            text
        } else {
            let resp = reqwest::Client::new()
                .get(url)
                .timeout(Duration::from_secs(10))
                .send()
                .await
                .and_then(|r| r.error_for_status())
                .map_err(|e| format!("JWK set {url}: {e}"))?;
            resp.text()
                .await
                .map_err(|e| format!("JWK set {url}: {e}"))?
        };
        let set: JwkSet = serde_json::from_str(&text)
            .map_err(|e| format!("JWK set {url} is not a JWK set: {e}"))?;
        if set.keys.is_empty() {
            return Err(format!("JWK set {url} holds no key"));
        }
        self.set_keys(set);
        Ok(true)
    }

    /// Keeps the JWK set current until the process ends (on the sidecar).
    pub async fn refresh_loop(self: std::sync::Arc<Self>) {
        let file = self.config.jwks_url.starts_with("file://");
        loop {
            if file {
                tokio::time::sleep(FILE_POLL).await;
            } else {
                let _ = tokio::time::timeout(URL_REFRESH, self.wanted.notified()).await;
            }
            match self.reload().await {
                Ok(true) => {
                    tracing::info!(source = %self.config.jwks_url, keys = self.keys.load().keys.len(), "OAUTHBEARER JWK set reloaded")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "reloading the OAUTHBEARER JWK set failed; keeping the previous one")
                }
            }
            if !file {
                tokio::time::sleep(URL_REFRESH_MIN).await;
            }
        }
    }

    /// Checks a token: signature, expiry, issuer, audience; its principal.
    pub fn validate(&self, token: &str) -> Result<Token, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            match unsigned_alg(token) {
                // librdkafka's `enable.sasl.oauthbearer.unsecure.jwt`
                // tokens, and any other algorithm we do not know.
                Some(alg) => format!(
                    "JWT algorithm {alg:?} is not accepted (only public-key signatures: RS*, PS*, ES*, EdDSA)"
                ),
                None => format!("malformed JWT: {e}"),
            }
        })?;
        let asymmetric = !matches!(
            header.alg,
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
        );
        if !asymmetric {
            return Err(format!(
                "JWT algorithm {:?} is not accepted (only public-key signatures)",
                header.alg
            ));
        }
        let keys = self.keys.load();
        let jwk = match &header.kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => None,
        };
        let Some(jwk) = jwk else {
            self.wanted.notify_one();
            return Err(format!(
                "no key {:?} in the JWK set",
                header.kid.as_deref().unwrap_or("(no kid)")
            ));
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWK {:?}: {e}", header.kid))?;
        let mut v = Validation::new(header.alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        if let Some(iss) = &self.config.issuer {
            v.set_issuer(&[iss]);
        }
        if self.config.audience.is_empty() {
            v.validate_aud = false;
        } else {
            v.set_audience(&self.config.audience);
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| format!("invalid JWT: {e}"))?;
        let claim = &self.config.principal_claim;
        let principal = data
            .claims
            .get(claim)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("the JWT has no {claim:?} claim (the principal)"))?;
        let exp = data
            .claims
            .get("exp")
            .and_then(|v| v.as_u64())
            .ok_or("the JWT's exp is not a number")?;
        let expires_at_ms = exp.saturating_mul(1000);
        if expires_at_ms <= now_ms() {
            return Err("the JWT has expired".into());
        }
        Ok(Token {
            principal: principal.to_string(),
            expires_at_ms,
        })
    }
}

/// Milliseconds until `expires_at_ms`, for SaslAuthenticate's
/// `session_lifetime_ms` (at least 1: 0 would mean "no limit").
pub fn lifetime_ms(expires_at_ms: u64) -> i64 {
    expires_at_ms.saturating_sub(now_ms()).max(1) as i64
}

/// The `alg` a JWT's header names, when the header is readable JSON but
/// the algorithm is not one jsonwebtoken knows (e.g. `none`).
fn unsigned_alg(token: &str) -> Option<String> {
    let header = token.split('.').next()?;
    let json = URL_SAFE_NO_PAD.decode(header.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&json).ok()?;
    Some(v.get("alg")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_responses() {
        assert_eq!(
            parse_initial_response(b"n,,\x01auth=Bearer abc.def.ghi\x01\x01"),
            Ok("abc.def.ghi")
        );
        assert_eq!(
            parse_initial_response(b"n,a=alice,\x01host=h\x01auth=Bearer t\x01port=1\x01\x01"),
            Ok("t")
        );
        for (bad, says) in [
            (&b"n,,auth=Bearer t"[..], "key-value"),
            (b"n,,\x01auth=Bearer t\x01", "two ^A"),
            (b"n,,\x01auth=Basic t\x01\x01", "Bearer"),
            (b"n,,\x01host=h\x01\x01", "no auth"),
            (b"x,,\x01auth=Bearer t\x01\x01", "GS2"),
            (b"n,,\x01junk\x01\x01", "malformed"),
            (&[0xff, 1, 1], "UTF-8"),
        ] {
            let e = parse_initial_response(bad).unwrap_err();
            assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn symmetric_and_unsigned_tokens_are_refused() {
        let v = Validator::new(OAuthConfig {
            jwks_url: "file:///nonexistent".into(),
            issuer: None,
            audience: vec![],
            principal_claim: "sub".into(),
        });
        let hs = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "mallory", "exp": now_ms() / 1000 + 60}),
            &jsonwebtoken::EncodingKey::from_secret(b"guess"),
        )
        .unwrap();
        assert!(v.validate(&hs).unwrap_err().contains("not accepted"));
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0.";
        let why = v.validate(none).unwrap_err();
        assert!(why.contains("algorithm \"none\" is not accepted"), "{why}");
        assert!(v.validate("garbage").unwrap_err().contains("malformed"));
    }
}
