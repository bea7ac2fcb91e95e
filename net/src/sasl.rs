//! SASL on SASL_PLAINTEXT and SASL_SSL listeners: the mechanisms offered
//! (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER), the users file, the
//! PLAIN message (RFC 4616), and the per-connection state machine that
//! decides what a connection may send before it has authenticated, and
//! when its session must be renewed (KIP-368). SCRAM's messages are in
//! `scram.rs`, its credentials come from the metadata store through a
//! [`CredentialStore`]; OAUTHBEARER's token checks are in `oauth.rs`.
//!
//! No socket I/O: the connection (conn.rs) feeds it requests and sends
//! what it answers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use floe_meta::schema::ScramCredential;
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::handlers::{encode, Reply};
use crate::{oauth, scram};

/// SASL/PLAIN's name.
pub const MECHANISM_PLAIN: &str = "PLAIN";
/// Largest frame read before a connection has authenticated (Kafka's
/// `sasl.server.max.receive.size` default): an unauthenticated client must
/// not make the broker allocate `socket.request.max.bytes`.
pub const UNAUTHENTICATED_FRAME_BYTES_MAX: usize = 512 << 10;
/// Most users in a users file; more is a mistake for a static file.
pub const USERS_MAX: usize = 100_000;

const SASL_AUTHENTICATION_FAILED: i16 = 58;
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
const ILLEGAL_SASL_STATE: i16 = 34;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    #[error("--sasl-users-file {path}: {reason}")]
    UsersFile { path: String, reason: String },
    #[error("PLAIN message is malformed: {0}")]
    Malformed(&'static str),
}

/// The users of `--sasl-users-file`: one `user:password` per line; the
/// user name ends at the first `:`, so a password may contain one. Blank
/// lines and lines starting with `#` are ignored. Shared by every shard.
#[derive(Debug, Default)]
pub struct Users {
    passwords: HashMap<String, String>,
}

impl Users {
    pub fn load(path: &Path) -> Result<Arc<Self>, SaslError> {
        let text = std::fs::read_to_string(path).map_err(|e| SaslError::UsersFile {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::parse(&text)
            .map(Arc::new)
            .map_err(|reason| SaslError::UsersFile {
                path: path.display().to_string(),
                reason,
            })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut passwords = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let n = i + 1;
            let (user, password) = line
                .split_once(':')
                .ok_or_else(|| format!("line {n} is not user:password"))?;
            if user.is_empty() || user.contains('\0') || password.contains('\0') {
                return Err(format!("line {n}: empty user name or a NUL character"));
            }
            if password.is_empty() {
                return Err(format!("line {n}: user {user:?} has an empty password"));
            }
            if passwords
                .insert(user.to_string(), password.to_string())
                .is_some()
            {
                return Err(format!("line {n}: user {user:?} is listed twice"));
            }
            if passwords.len() > USERS_MAX {
                return Err(format!("more than {USERS_MAX} users"));
            }
        }
        if passwords.is_empty() {
            return Err("no users (expected lines of user:password)".into());
        }
        Ok(Self { passwords })
    }

    pub fn len(&self) -> usize {
        self.passwords.len()
    }

    pub fn is_empty(&self) -> bool {
        self.passwords.is_empty()
    }

    pub fn contains(&self, user: &str) -> bool {
        self.passwords.contains_key(user)
    }

    /// Whether `user` exists with `password`. The comparison does not stop
    /// at the first differing byte, so its time says little about how much
    /// of a guess was right.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        self.passwords
            .get(user)
            .is_some_and(|p| scram::constant_time_eq(p.as_bytes(), password.as_bytes()))
    }
}

/// A PLAIN message: `[authzid] NUL authcid NUL passwd`.
#[derive(Debug, PartialEq, Eq)]
pub struct PlainMessage<'a> {
    pub authzid: &'a str,
    pub user: &'a str,
    pub password: &'a str,
}

pub fn parse_plain(token: &[u8]) -> Result<PlainMessage<'_>, SaslError> {
    let text = std::str::from_utf8(token).map_err(|_| SaslError::Malformed("not UTF-8"))?;
    let mut parts = text.split('\0');
    let (Some(authzid), Some(user), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed(
            "expected authzid NUL user NUL password",
        ));
    };
    if user.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed("empty user name or password"));
    }
    Ok(PlainMessage {
        authzid,
        user,
        password,
    })
}

/// The mechanisms a SASL listener offers by default.
pub const MECHANISMS_DEFAULT: &str = "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512";

/// A mechanism a listener can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Scram(scram::Mechanism),
    OAuthBearer,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => MECHANISM_PLAIN,
            Mechanism::Scram(m) => m.name(),
            Mechanism::OAuthBearer => oauth::MECHANISM,
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            MECHANISM_PLAIN => Some(Mechanism::Plain),
            oauth::MECHANISM => Some(Mechanism::OAuthBearer),
            _ => scram::Mechanism::parse(name).map(Mechanism::Scram),
        }
    }

    /// A comma-separated list (`sasl.enabled.mechanisms`), in order,
    /// without repeats.
    pub fn parse_list(list: &str) -> Result<Vec<Self>, String> {
        let mut out: Vec<Self> = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let m = Self::parse(name).ok_or_else(|| {
                format!(
                    "unknown SASL mechanism {name:?} (floe serves PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 and OAUTHBEARER)"
                )
            })?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        if out.is_empty() {
            return Err("no SASL mechanism enabled".into());
        }
        Ok(out)
    }
}

/// What a SASL listener offers and checks against: its mechanisms, the
/// optional users file for PLAIN (PLAIN also accepts the password of a
/// stored SCRAM credential), and OAUTHBEARER's token validator.
pub struct SaslConfig {
    pub mechanisms: Vec<Mechanism>,
    pub users: Option<Arc<Users>>,
    pub oauth: Option<Arc<oauth::Validator>>,
}

/// Where SCRAM credentials come from: the engine (the metadata store), or
/// a map in tests. `Err` is a store failure, not "no such user".
pub trait CredentialStore {
    fn scram_credential<'a>(
        &'a self,
        user: &'a str,
        mechanism: scram::Mechanism,
    ) -> LocalBoxFuture<'a, Result<Option<ScramCredential>, String>>;
}

impl CredentialStore for floe_engine::Engine {
    fn scram_credential<'a>(
        &'a self,
        user: &'a str,
        mechanism: scram::Mechanism,
    ) -> LocalBoxFuture<'a, Result<Option<ScramCredential>, String>> {
        let f = floe_engine::Engine::scram_credential(self, user, mechanism.name());
        Box::pin(f.map(|r| r.map_err(|e| e.to_string())))
    }
}

/// Where a connection of a SASL listener is in authentication. `reauth`
/// is the principal of a session being renewed (KIP-368): the new login
/// must be the same principal.
enum State {
    AwaitHandshake,
    /// A mechanism was chosen; `raw` after a v0 handshake: tokens come as
    /// bare length-prefixed frames instead of SaslAuthenticate requests.
    AwaitToken {
        raw: bool,
        mechanism: Mechanism,
        reauth: Option<String>,
    },
    /// SCRAM: the server-first message was sent; the client-final is next.
    ScramFinal {
        raw: bool,
        exchange: Box<scram::Exchange>,
        reauth: Option<String>,
    },
    Authenticated {
        user: String,
        mechanism: Mechanism,
        /// When the credential expires (OAUTHBEARER), in Unix ms: the
        /// client must re-authenticate before then.
        expires_at_ms: Option<u64>,
    },
    /// Authentication failed; nothing more is accepted.
    Failed,
}

/// What the session answers to one authentication token.
#[derive(Debug, PartialEq, Eq)]
pub enum TokenStep {
    /// Send this challenge; another token follows (SCRAM's server-first).
    Challenge(Vec<u8>),
    /// Authenticated as `user`; send `reply` (SCRAM's server-final, or
    /// nothing); the session lasts `lifetime_ms` (0: no limit).
    Done {
        user: String,
        reply: Vec<u8>,
        lifetime_ms: i64,
    },
    /// Refused: answer an error (or close, for raw tokens), then close.
    Failed(String),
}

/// What the connection does after the session saw a SASL request or token.
pub struct Step {
    pub reply: Reply,
    /// Close after sending `reply` (authentication failed, wrong state).
    pub close: bool,
    /// Why, for the log line when `close`.
    pub why: Option<String>,
}

/// The authentication state of one connection of a SASL listener. Owned
/// by the connection's reader (one shard).
pub struct Session {
    config: Arc<SaslConfig>,
    state: State,
}

impl Session {
    pub fn new(config: Arc<SaslConfig>) -> Self {
        Self {
            config,
            state: State::AwaitHandshake,
        }
    }

    pub fn authenticated(&self) -> Option<&str> {
        match &self.state {
            State::Authenticated { user, .. } => Some(user),
            _ => None,
        }
    }

    /// Whether the session's credential has expired (KIP-368: past it,
    /// only a re-authentication is served).
    pub fn expired(&self) -> bool {
        match &self.state {
            State::Authenticated {
                expires_at_ms: Some(t),
                ..
            } => oauth::now_ms() >= *t,
            _ => false,
        }
    }

    /// The next frame is a bare token (after a v0 handshake), not a Kafka
    /// request.
    pub fn awaits_raw_token(&self) -> bool {
        matches!(
            self.state,
            State::AwaitToken { raw: true, .. } | State::ScramFinal { raw: true, .. }
        )
    }

    fn mechanism_names(&self) -> Vec<StrBytes> {
        self.config
            .mechanisms
            .iter()
            .map(|m| StrBytes::from_static_str(m.name()))
            .collect()
    }

    pub fn handshake(&mut self, req: &SaslHandshakeRequest, version: i16) -> Step {
        let mechanisms = self.mechanism_names();
        let illegal = |why: &str| Step {
            reply: encode(
                &SaslHandshakeResponse::default()
                    .with_error_code(ILLEGAL_SASL_STATE)
                    .with_mechanisms(mechanisms.clone()),
                version,
            ),
            close: true,
            why: Some(why.into()),
        };
        // A second handshake renews an authenticated session (KIP-368):
        // v1 only (tokens in SaslAuthenticate), with the same mechanism.
        let reauth = match &self.state {
            State::AwaitHandshake => None,
            State::Authenticated {
                user, mechanism, ..
            } => {
                if version == 0 {
                    return illegal("re-authentication with SaslHandshake v0");
                }
                if req.mechanism.as_str() != mechanism.name() {
                    return illegal("re-authentication with another mechanism");
                }
                Some(user.clone())
            }
            _ => return illegal("SaslHandshake after the handshake"),
        };
        let chosen =
            Mechanism::parse(req.mechanism.as_str()).filter(|m| self.config.mechanisms.contains(m));
        let Some(mechanism) = chosen else {
            // The client may try another mechanism on this connection.
            let resp = SaslHandshakeResponse::default()
                .with_error_code(UNSUPPORTED_SASL_MECHANISM)
                .with_mechanisms(mechanisms);
            return Step {
                reply: encode(&resp, version),
                close: false,
                why: None,
            };
        };
        self.state = State::AwaitToken {
            raw: version == 0,
            mechanism,
            reauth,
        };
        let resp = SaslHandshakeResponse::default().with_mechanisms(mechanisms);
        Step {
            reply: encode(&resp, version),
            close: false,
            why: None,
        }
    }

    /// Checks a PLAIN token against the users file, else the stored SCRAM
    /// credentials (the strongest mechanism first).
    async fn plain(&self, token: &[u8], store: &dyn CredentialStore) -> Result<String, String> {
        let msg = parse_plain(token).map_err(|e| e.to_string())?;
        if !msg.authzid.is_empty() && msg.authzid != msg.user {
            return Err(format!(
                "user {:?} may not act as {:?} (authorization ids are not supported)",
                msg.user, msg.authzid
            ));
        }
        let refused = || {
            format!(
                "authentication failed for user {:?}: invalid user name or password",
                msg.user
            )
        };
        if let Some(users) = &self.config.users {
            if users.contains(msg.user) {
                return match users.verify(msg.user, msg.password) {
                    true => Ok(msg.user.to_string()),
                    false => Err(refused()),
                };
            }
        }
        for m in [scram::Mechanism::Sha512, scram::Mechanism::Sha256] {
            let cred = store
                .scram_credential(msg.user, m)
                .await
                .map_err(|e| format!("the credentials of {:?} could not be read: {e}", msg.user))?;
            if let Some(cred) = cred {
                return match m.verify_password(&cred, msg.password) {
                    true => Ok(msg.user.to_string()),
                    false => Err(refused()),
                };
            }
        }
        Err(refused())
    }

    /// The user `token` says it authenticates, before anything is checked
    /// (for counting failures per user: net::auth_limit). None when the
    /// token names nobody we can trust to be the same next time
    /// (OAUTHBEARER's claims are unverified here) or cannot be read.
    pub fn claimed_user(&self, token: &[u8]) -> Option<String> {
        match &self.state {
            State::AwaitToken {
                mechanism: Mechanism::Plain,
                ..
            } => parse_plain(token).ok().map(|m| m.user.to_string()),
            State::AwaitToken {
                mechanism: Mechanism::Scram(_),
                ..
            } => scram::parse_client_first(token).ok().map(|f| f.user),
            State::ScramFinal { exchange, .. } => Some(exchange.user().to_string()),
            _ => None,
        }
    }

    /// Feeds one authentication token (a SaslAuthenticate's bytes, or a
    /// bare frame after a v0 handshake) to the chosen mechanism.
    pub async fn token(&mut self, token: &[u8], store: &dyn CredentialStore) -> TokenStep {
        let state = std::mem::replace(&mut self.state, State::Failed);
        let done = |user: String, reply: Vec<u8>| TokenStep::Done {
            user,
            reply,
            lifetime_ms: 0,
        };
        let (step, mechanism, reauth, expires) = match state {
            State::AwaitToken {
                mechanism: Mechanism::Plain,
                reauth,
                ..
            } => {
                let step = match self.plain(token, store).await {
                    Ok(user) => done(user, Vec::new()),
                    Err(why) => TokenStep::Failed(why),
                };
                (step, Mechanism::Plain, reauth, None)
            }
            State::AwaitToken {
                raw,
                mechanism: Mechanism::Scram(m),
                reauth,
            } => match scram_first(m, token, store).await {
                Ok((exchange, challenge)) => {
                    self.state = State::ScramFinal {
                        raw,
                        exchange: Box::new(exchange),
                        reauth,
                    };
                    return TokenStep::Challenge(challenge);
                }
                Err(why) => return TokenStep::Failed(why),
            },
            State::ScramFinal {
                exchange, reauth, ..
            } => {
                let step = match exchange.finish(token) {
                    Ok(reply) => done(exchange.user().to_string(), reply),
                    Err(why) => TokenStep::Failed(why),
                };
                let m = Mechanism::Scram(exchange.mechanism());
                (step, m, reauth, None)
            }
            State::AwaitToken {
                mechanism: Mechanism::OAuthBearer,
                reauth,
                ..
            } => {
                let checked = match &self.config.oauth {
                    None => Err("OAUTHBEARER is not configured".to_string()),
                    Some(v) => oauth::parse_initial_response(token).and_then(|t| v.validate(t)),
                };
                match checked {
                    Ok(t) => (
                        TokenStep::Done {
                            user: t.principal,
                            reply: Vec::new(),
                            lifetime_ms: oauth::lifetime_ms(t.expires_at_ms),
                        },
                        Mechanism::OAuthBearer,
                        reauth,
                        Some(t.expires_at_ms),
                    ),
                    Err(why) => return TokenStep::Failed(why),
                }
            }
            State::AwaitHandshake | State::Authenticated { .. } | State::Failed => {
                return TokenStep::Failed("an authentication token before a SaslHandshake".into())
            }
        };
        let TokenStep::Done { user, .. } = &step else {
            return step;
        };
        if let Some(before) = reauth.filter(|b| b != user) {
            return TokenStep::Failed(format!(
                "re-authentication as {user:?} on a session of {before:?}"
            ));
        }
        self.state = State::Authenticated {
            user: user.clone(),
            mechanism,
            expires_at_ms: expires,
        };
        step
    }

    pub async fn authenticate(
        &mut self,
        req: &SaslAuthenticateRequest,
        version: i16,
        store: &dyn CredentialStore,
    ) -> Step {
        let expecting = matches!(
            self.state,
            State::AwaitToken { raw: false, .. } | State::ScramFinal { raw: false, .. }
        );
        if !expecting {
            self.state = State::Failed;
            let resp = SaslAuthenticateResponse::default()
                .with_error_code(ILLEGAL_SASL_STATE)
                .with_error_message(Some(StrBytes::from_static_str(
                    "SaslAuthenticate before a SaslHandshake v1 choosing a mechanism",
                )));
            return Step {
                reply: encode(&resp, version),
                close: true,
                why: Some("SaslAuthenticate in the wrong state".into()),
            };
        }
        match self.token(&req.auth_bytes, store).await {
            TokenStep::Challenge(bytes) => Step {
                reply: encode(
                    &SaslAuthenticateResponse::default().with_auth_bytes(bytes.into()),
                    version,
                ),
                close: false,
                why: None,
            },
            TokenStep::Done {
                reply, lifetime_ms, ..
            } => Step {
                // v1+: the session's lifetime; the client re-authenticates
                // before it ends (KIP-368).
                reply: encode(
                    &SaslAuthenticateResponse::default()
                        .with_auth_bytes(reply.into())
                        .with_session_lifetime_ms(lifetime_ms),
                    version,
                ),
                close: false,
                why: None,
            },
            TokenStep::Failed(why) => failed_step(why, version),
        }
    }
}

/// A SaslAuthenticate answered SASL_AUTHENTICATION_FAILED, then closed.
pub fn failed_step(why: String, version: i16) -> Step {
    let resp = SaslAuthenticateResponse::default()
        .with_error_code(SASL_AUTHENTICATION_FAILED)
        .with_error_message(Some(StrBytes::from_string(format!(
            "Authentication failed: {why}"
        ))));
    Step {
        reply: encode(&resp, version),
        close: true,
        why: Some(why),
    }
}

/// SCRAM's first round: the client-first message, the user's credential.
async fn scram_first(
    m: scram::Mechanism,
    token: &[u8],
    store: &dyn CredentialStore,
) -> Result<(scram::Exchange, Vec<u8>), String> {
    let first = scram::parse_client_first(token)?;
    let cred = store
        .scram_credential(&first.user, m)
        .await
        .map_err(|e| format!("the credentials of {:?} could not be read: {e}", first.user))?
        .ok_or_else(|| {
            format!(
                "invalid user credentials: no {} credential for {:?}",
                m.name(),
                first.user
            )
        })?;
    scram::Exchange::start(m, first, &cred)
}

/// The answer to SaslHandshake on a listener without SASL.
pub fn handshake_not_enabled(version: i16) -> Reply {
    encode(
        &SaslHandshakeResponse::default().with_error_code(ILLEGAL_SASL_STATE),
        version,
    )
}

/// The answer to SaslAuthenticate on a listener without SASL.
pub fn authenticate_not_enabled(version: i16) -> Reply {
    encode(
        &SaslAuthenticateResponse::default()
            .with_error_code(ILLEGAL_SASL_STATE)
            .with_error_message(Some(StrBytes::from_static_str(
                "SASL is not enabled on this listener",
            ))),
        version,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use kafka_protocol::protocol::Decodable;

    use std::collections::HashMap;

    fn users() -> Arc<Users> {
        Arc::new(Users::parse("# comment\n\nalice:s3cret\nbob:pa:ss\r\n").expect("parses"))
    }

    #[test]
    fn users_file_lines() {
        let u = users();
        assert_eq!(u.len(), 2);
        assert!(u.verify("alice", "s3cret"));
        assert!(u.verify("bob", "pa:ss"), "the password may hold a colon");
        assert!(!u.verify("alice", "s3cre"));
        assert!(!u.verify("alice", "s3cret!"));
        assert!(!u.verify("carol", "s3cret"));
        for (bad, says) in [
            ("alice", "not user:password"),
            (":pw", "empty user"),
            ("alice:", "empty password"),
            ("a:1\na:2", "listed twice"),
            ("# only a comment\n", "no users"),
        ] {
            let e = Users::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let e = Users::load(Path::new("/nonexistent/users")).expect_err("missing");
        assert!(e
            .to_string()
            .contains("--sasl-users-file /nonexistent/users"));
    }

    #[test]
    fn plain_messages() {
        assert_eq!(
            parse_plain(b"\0alice\0s3cret"),
            Ok(PlainMessage {
                authzid: "",
                user: "alice",
                password: "s3cret"
            })
        );
        assert_eq!(
            parse_plain(b"admin\0alice\0p\0w").map(|m| m.user),
            Err(SaslError::Malformed(
                "expected authzid NUL user NUL password"
            ))
        );
        assert_eq!(
            parse_plain(b"alice\0pw").map(|m| m.user),
            Err(SaslError::Malformed(
                "expected authzid NUL user NUL password"
            ))
        );
        assert!(parse_plain(b"\0\0pw").is_err());
        assert!(parse_plain(b"\0alice\0").is_err());
        assert!(parse_plain(&[0, 0xff, 0, b'p']).is_err());
    }

    fn handshake_code(step: Step, version: i16) -> i16 {
        let Reply::Body(b) = step.reply else {
            panic!("a body")
        };
        SaslHandshakeResponse::decode(&mut Bytes::from(b), version)
            .expect("decodes")
            .error_code
    }

    fn authenticate_response(step: &mut Step, version: i16) -> SaslAuthenticateResponse {
        let reply = std::mem::replace(&mut step.reply, Reply::Nothing);
        let Reply::Body(b) = reply else {
            panic!("a body")
        };
        SaslAuthenticateResponse::decode(&mut Bytes::from(b), version).expect("decodes")
    }

    fn authenticate_code(step: &mut Step, version: i16) -> i16 {
        authenticate_response(step, version).error_code
    }

    /// SCRAM credentials in a map; `down` makes every lookup fail.
    #[derive(Default)]
    struct Creds {
        map: HashMap<(String, scram::Mechanism), ScramCredential>,
        down: bool,
    }

    impl CredentialStore for Creds {
        fn scram_credential<'a>(
            &'a self,
            user: &'a str,
            mechanism: scram::Mechanism,
        ) -> LocalBoxFuture<'a, Result<Option<ScramCredential>, String>> {
            let r = match self.down {
                true => Err("etcd is down".to_string()),
                false => Ok(self.map.get(&(user.to_string(), mechanism)).cloned()),
            };
            Box::pin(async move { r })
        }
    }

    fn creds() -> Creds {
        let mut c = Creds::default();
        for m in scram::Mechanism::ALL {
            let cred = m.credential_for_password("scr4m", 4096).expect("derives");
            c.map.insert(("carol".into(), m), cred);
        }
        c
    }

    fn config(mechanisms: &str) -> Arc<SaslConfig> {
        Arc::new(SaslConfig {
            mechanisms: Mechanism::parse_list(mechanisms).expect("mechanisms"),
            users: Some(users()),
            oauth: None,
        })
    }

    fn hs(m: &'static str) -> SaslHandshakeRequest {
        SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(m))
    }

    fn auth(t: &[u8]) -> SaslAuthenticateRequest {
        SaslAuthenticateRequest::default().with_auth_bytes(Bytes::copy_from_slice(t))
    }

    fn block<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn session_flow() {
        let store = creds();
        let all = || config(MECHANISMS_DEFAULT);

        // Authenticating before the handshake closes.
        let mut s = Session::new(all());
        let mut step = block(s.authenticate(&auth(b"\0alice\0s3cret"), 2, &store));
        assert_eq!(authenticate_code(&mut step, 2), ILLEGAL_SASL_STATE);
        assert!(step.close);

        // A mechanism not enabled is refused with the list, and the
        // connection may retry.
        let mut s = Session::new(config("PLAIN"));
        let step = s.handshake(&hs("SCRAM-SHA-256"), 1);
        assert!(!step.close);
        assert_eq!(handshake_code(step, 1), UNSUPPORTED_SASL_MECHANISM);
        assert_eq!(
            handshake_code(s.handshake(&hs("GSSAPI"), 1), 1),
            UNSUPPORTED_SASL_MECHANISM
        );
        assert_eq!(handshake_code(s.handshake(&hs("PLAIN"), 1), 1), 0);
        assert!(!s.awaits_raw_token());
        let mut step = block(s.authenticate(&auth(b"\0alice\0wrong"), 1, &store));
        assert_eq!(authenticate_code(&mut step, 1), SASL_AUTHENTICATION_FAILED);
        assert!(step.close && step.why.is_some_and(|w| w.contains("alice")));
        assert_eq!(s.authenticated(), None);

        let mut s = Session::new(all());
        s.handshake(&hs("PLAIN"), 1);
        let mut step = block(s.authenticate(&auth(b"alice\0alice\0s3cret"), 0, &store));
        assert_eq!(authenticate_code(&mut step, 0), 0);
        assert!(!step.close);
        assert_eq!(s.authenticated(), Some("alice"));
        // A second handshake after success renews the session (KIP-368)
        // with the same mechanism; another one is a protocol error.
        assert!(s.handshake(&hs("SCRAM-SHA-256"), 1).close);

        // v0: the token comes bare.
        let mut s = Session::new(all());
        s.handshake(&hs("PLAIN"), 0);
        assert!(s.awaits_raw_token());
        assert!(matches!(
            block(s.token(b"\0bob\0nope", &store)),
            TokenStep::Failed(_)
        ));
        let mut s = Session::new(all());
        s.handshake(&hs("PLAIN"), 0);
        assert_eq!(
            block(s.token(b"\0bob\0pa:ss", &store)),
            TokenStep::Done {
                user: "bob".into(),
                reply: vec![],
                lifetime_ms: 0
            }
        );
        // Acting as another user is refused.
        let mut s = Session::new(all());
        s.handshake(&hs("PLAIN"), 1);
        let mut step = block(s.authenticate(&auth(b"alice\0bob\0pa:ss"), 1, &store));
        assert_eq!(authenticate_code(&mut step, 1), SASL_AUTHENTICATION_FAILED);
    }

    #[test]
    fn plain_checks_stored_scram_credentials() {
        let store = creds();
        let plain = |token: &[u8], store: &Creds| {
            let mut s = Session::new(config("PLAIN"));
            s.handshake(&hs("PLAIN"), 1);
            block(s.token(token, store))
        };
        assert!(matches!(
            plain(b"\0carol\0scr4m", &store),
            TokenStep::Done { .. }
        ));
        assert!(matches!(
            plain(b"\0carol\0scr4m!", &store),
            TokenStep::Failed(_)
        ));
        assert!(matches!(
            plain(b"\0dave\0scr4m", &store),
            TokenStep::Failed(_)
        ));
        // The users file is authoritative for its users.
        let mut shadow = creds();
        let cred = scram::Mechanism::Sha512
            .credential_for_password("other", 4096)
            .unwrap();
        shadow
            .map
            .insert(("alice".into(), scram::Mechanism::Sha512), cred);
        assert!(matches!(
            plain(b"\0alice\0other", &shadow),
            TokenStep::Failed(_)
        ));
        assert!(matches!(
            plain(b"\0alice\0s3cret", &shadow),
            TokenStep::Done { .. }
        ));
        // A store that cannot answer refuses, and says why.
        let down = Creds {
            down: true,
            ..creds()
        };
        let TokenStep::Failed(why) = plain(b"\0carol\0scr4m", &down) else {
            panic!("refused")
        };
        assert!(why.contains("etcd is down"), "{why}");
    }

    /// The client's side of SCRAM (RFC 5802), to drive a session.
    fn scram_client_final(
        m: scram::Mechanism,
        password: &str,
        bare: &str,
        server_first: &[u8],
    ) -> (Vec<u8>, Vec<u8>) {
        use aws_lc_rs::{digest, hmac};
        use base64::engine::general_purpose::STANDARD;
        use base64::Engine as _;
        let sf = std::str::from_utf8(server_first).unwrap();
        let f: Vec<&str> = sf.split(',').map(|p| &p[2..]).collect();
        let salt = STANDARD.decode(f[1]).unwrap();
        let salted = m.salted_password(password.as_bytes(), &salt, f[2].parse().unwrap());
        let (alg, dig) = match m {
            scram::Mechanism::Sha256 => (hmac::HMAC_SHA256, &digest::SHA256),
            scram::Mechanism::Sha512 => (hmac::HMAC_SHA512, &digest::SHA512),
        };
        let mac = |k: &[u8], d: &[u8]| hmac::sign(&hmac::Key::new(alg, k), d).as_ref().to_vec();
        let client_key = mac(&salted, b"Client Key");
        let stored = digest::digest(dig, &client_key);
        let without = format!("c=biws,r={}", f[0]);
        let am = format!("{bare},{sf},{without}");
        let sig = mac(stored.as_ref(), am.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        let server_sig = mac(&mac(&salted, b"Server Key"), am.as_bytes());
        (
            format!("{without},p={}", STANDARD.encode(proof)).into_bytes(),
            format!("v={}", STANDARD.encode(server_sig)).into_bytes(),
        )
    }

    #[test]
    fn scram_sessions() {
        let store = creds();
        for (m, name) in [
            (scram::Mechanism::Sha256, "SCRAM-SHA-256"),
            (scram::Mechanism::Sha512, "SCRAM-SHA-512"),
        ] {
            for version in [0i16, 1] {
                for password in ["scr4m", "wrong"] {
                    let mut s = Session::new(config(MECHANISMS_DEFAULT));
                    assert_eq!(handshake_code(s.handshake(&hs(name), version), version), 0);
                    assert_eq!(s.awaits_raw_token(), version == 0);
                    let bare = "n=carol,r=fyko+d2lbbFgONRv9qkxdawL";
                    let first = format!("n,,{bare}");
                    let TokenStep::Challenge(sf) = block(s.token(first.as_bytes(), &store)) else {
                        panic!("a server-first message")
                    };
                    assert_eq!(s.awaits_raw_token(), version == 0, "still raw");
                    let (cf, expect) = scram_client_final(m, password, bare, &sf);
                    let step = if version == 0 {
                        block(s.token(&cf, &store))
                    } else {
                        let mut step = block(s.authenticate(&auth(&cf), 1, &store));
                        let resp = authenticate_response(&mut step, 1);
                        match resp.error_code {
                            0 => TokenStep::Done {
                                user: "carol".into(),
                                reply: resp.auth_bytes.to_vec(),
                                lifetime_ms: resp.session_lifetime_ms,
                            },
                            _ => TokenStep::Failed(
                                resp.error_message
                                    .map(|m| m.to_string())
                                    .unwrap_or_default(),
                            ),
                        }
                    };
                    match password {
                        "scr4m" => {
                            assert_eq!(
                                step,
                                TokenStep::Done {
                                    user: "carol".into(),
                                    reply: expect,
                                    lifetime_ms: 0
                                },
                                "{name} v{version}"
                            );
                            assert_eq!(s.authenticated(), Some("carol"));
                        }
                        _ => {
                            let TokenStep::Failed(why) = step else {
                                panic!("refused")
                            };
                            assert!(why.contains("invalid credentials"), "{why}");
                            assert_eq!(s.authenticated(), None);
                        }
                    }
                }
            }
        }
        // An unknown user is refused at the first message.
        let mut s = Session::new(config(MECHANISMS_DEFAULT));
        s.handshake(&hs("SCRAM-SHA-512"), 1);
        let mut step = block(s.authenticate(&auth(b"n,,n=dave,r=abc"), 1, &store));
        let resp = authenticate_response(&mut step, 1);
        assert_eq!(resp.error_code, SASL_AUTHENTICATION_FAILED);
        assert!(step.close);
        // A SaslAuthenticate after a v0 handshake (raw tokens) is refused.
        let mut s = Session::new(config(MECHANISMS_DEFAULT));
        s.handshake(&hs("SCRAM-SHA-512"), 0);
        let mut step = block(s.authenticate(&auth(b"n,,n=carol,r=abc"), 1, &store));
        assert_eq!(authenticate_code(&mut step, 1), ILLEGAL_SASL_STATE);
        assert_eq!(
            Mechanism::parse_list(" SCRAM-SHA-512,PLAIN,PLAIN ").unwrap(),
            vec![Mechanism::Scram(scram::Mechanism::Sha512), Mechanism::Plain]
        );
        assert!(Mechanism::parse_list("").is_err());
    }

    /// An EC P-256 key: the validator trusts its JWK; `sign` makes tokens.
    fn oauth_setup() -> (Arc<SaslConfig>, impl Fn(serde_json::Value) -> Vec<u8>) {
        use aws_lc_rs::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        use jsonwebtoken::{Algorithm, EncodingKey, Header};
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &aws_lc_rs::rand::SystemRandom::new(),
        )
        .expect("key");
        let key = EncodingKey::from_ec_der(pkcs8.as_ref());
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some("k1".into());
        let v = oauth::Validator::new(oauth::OAuthConfig {
            jwks_url: "file:///unused".into(),
            issuer: Some("https://idp.example".into()),
            audience: vec!["floe".into()],
            principal_claim: "sub".into(),
        });
        v.set_keys(jsonwebtoken::jwk::JwkSet { keys: vec![jwk] });
        let cfg = Arc::new(SaslConfig {
            mechanisms: Mechanism::parse_list("OAUTHBEARER,PLAIN").expect("mechanisms"),
            users: Some(users()),
            oauth: Some(Arc::new(v)),
        });
        let sign = move |claims: serde_json::Value| {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some("k1".into());
            let t = jsonwebtoken::encode(&h, &claims, &key).expect("signs");
            format!("n,,\x01auth=Bearer {t}\x01\x01").into_bytes()
        };
        (cfg, sign)
    }

    #[test]
    fn oauthbearer_and_reauthentication() {
        let store = creds();
        let (cfg, sign) = oauth_setup();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = |sub: &str, exp: u64| serde_json::json!({"sub": sub, "exp": exp, "iss": "https://idp.example", "aud": "floe"});
        let mut s = Session::new(cfg.clone());
        assert_eq!(handshake_code(s.handshake(&hs("OAUTHBEARER"), 1), 1), 0);
        let mut step = block(s.authenticate(&auth(&sign(claims("svc-a", now + 60))), 2, &store));
        let resp = authenticate_response(&mut step, 2);
        assert_eq!(resp.error_code, 0, "{:?}", resp.error_message);
        assert!(
            (50_000..=60_000).contains(&resp.session_lifetime_ms),
            "{}",
            resp.session_lifetime_ms
        );
        assert_eq!(s.authenticated(), Some("svc-a"));
        assert!(!s.expired());
        // KIP-368: the same principal renews its session on the connection.
        assert_eq!(handshake_code(s.handshake(&hs("OAUTHBEARER"), 1), 1), 0);
        assert_eq!(s.authenticated(), None, "nothing is served mid-renewal");
        let mut step = block(s.authenticate(&auth(&sign(claims("svc-a", now + 120))), 2, &store));
        assert_eq!(authenticate_response(&mut step, 2).error_code, 0);
        assert_eq!(s.authenticated(), Some("svc-a"));
        // ... but not as someone else, nor with another mechanism, nor v0.
        assert_eq!(handshake_code(s.handshake(&hs("OAUTHBEARER"), 1), 1), 0);
        let mut step = block(s.authenticate(&auth(&sign(claims("svc-b", now + 60))), 2, &store));
        assert_eq!(authenticate_code(&mut step, 2), SASL_AUTHENTICATION_FAILED);
        assert!(step.close);
        let mut s2 = Session::new(cfg.clone());
        s2.handshake(&hs("OAUTHBEARER"), 1);
        block(s2.authenticate(&auth(&sign(claims("svc-a", now + 60))), 2, &store));
        assert!(s2.handshake(&hs("PLAIN"), 1).close);
        let mut s3 = Session::new(cfg.clone());
        s3.handshake(&hs("OAUTHBEARER"), 1);
        block(s3.authenticate(&auth(&sign(claims("svc-a", now + 60))), 2, &store));
        assert!(s3.handshake(&hs("OAUTHBEARER"), 0).close);

        // Refused tokens, each with its reason.
        for (claims, says) in [
            (claims("svc-a", now - 120), "ExpiredSignature"),
            (
                serde_json::json!({"sub": "x", "exp": now + 60, "iss": "https://evil", "aud": "floe"}),
                "InvalidIssuer",
            ),
            (
                serde_json::json!({"sub": "x", "exp": now + 60, "iss": "https://idp.example", "aud": "other"}),
                "InvalidAudience",
            ),
            (
                serde_json::json!({"exp": now + 60, "iss": "https://idp.example", "aud": "floe"}),
                "\"sub\" claim",
            ),
            (
                serde_json::json!({"sub": "x", "iss": "https://idp.example", "aud": "floe"}),
                "exp",
            ),
        ] {
            let mut s = Session::new(cfg.clone());
            s.handshake(&hs("OAUTHBEARER"), 1);
            let mut step = block(s.authenticate(&auth(&sign(claims)), 2, &store));
            let resp = authenticate_response(&mut step, 2);
            assert_eq!(resp.error_code, SASL_AUTHENTICATION_FAILED);
            let msg = resp
                .error_message
                .map(|m| m.to_string())
                .unwrap_or_default();
            assert!(msg.contains(says), "{says}: {msg}");
        }
        // A session whose token has run out serves nothing but a renewal.
        let mut s = Session::new(cfg);
        s.handshake(&hs("OAUTHBEARER"), 1);
        block(s.authenticate(&auth(&sign(claims("svc-a", now + 60))), 2, &store));
        if let State::Authenticated { expires_at_ms, .. } = &mut s.state {
            *expires_at_ms = Some(1);
        }
        assert!(s.expired());
    }
}
