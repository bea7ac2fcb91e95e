//! SASL/PLAIN on SASL_PLAINTEXT and SASL_SSL listeners: the users file,
//! the PLAIN message (RFC 4616), and the per-connection state machine that
//! decides what a connection may send before it has authenticated.
//!
//! Pure logic, no I/O: the connection (conn.rs) feeds it requests and
//! sends what it answers. SCRAM and OAUTHBEARER are not implemented
//! (FINDINGS.md).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use kafka_protocol::messages::{
    SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use crate::handlers::{encode, Reply};

/// The one mechanism served.
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

    /// Whether `user` exists with `password`. The comparison does not stop
    /// at the first differing byte, so its time says little about how much
    /// of a guess was right.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let Some(expected) = self.passwords.get(user) else {
            return false;
        };
        let (a, b) = (expected.as_bytes(), password.as_bytes());
        let mut diff = (a.len() != b.len()) as u8;
        for (i, x) in a.iter().enumerate() {
            diff |= x ^ b.get(i).copied().unwrap_or(!x);
        }
        diff == 0
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

/// Where a connection of a SASL listener is in authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitHandshake,
    /// PLAIN was chosen; `raw` after a v0 handshake: the token comes as a
    /// bare length-prefixed frame instead of a SaslAuthenticate request.
    AwaitToken {
        raw: bool,
    },
    Authenticated {
        user: String,
    },
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
    users: Arc<Users>,
    state: State,
}

impl Session {
    pub fn new(users: Arc<Users>) -> Self {
        Self {
            users,
            state: State::AwaitHandshake,
        }
    }

    pub fn authenticated(&self) -> Option<&str> {
        match &self.state {
            State::Authenticated { user } => Some(user),
            _ => None,
        }
    }

    /// The next frame is a bare v0 token, not a Kafka request.
    pub fn awaits_raw_token(&self) -> bool {
        self.state == State::AwaitToken { raw: true }
    }

    pub fn handshake(&mut self, req: &SaslHandshakeRequest, version: i16) -> Step {
        let mechanisms = vec![StrBytes::from_static_str(MECHANISM_PLAIN)];
        if self.state != State::AwaitHandshake {
            let resp = SaslHandshakeResponse::default()
                .with_error_code(ILLEGAL_SASL_STATE)
                .with_mechanisms(mechanisms);
            return Step {
                reply: encode(&resp, version),
                close: true,
                why: Some("SaslHandshake after the handshake".into()),
            };
        }
        if req.mechanism.as_str() != MECHANISM_PLAIN {
            // The client may try another mechanism on this connection.
            let resp = SaslHandshakeResponse::default()
                .with_error_code(UNSUPPORTED_SASL_MECHANISM)
                .with_mechanisms(mechanisms);
            return Step {
                reply: encode(&resp, version),
                close: false,
                why: None,
            };
        }
        self.state = State::AwaitToken { raw: version == 0 };
        let resp = SaslHandshakeResponse::default().with_mechanisms(mechanisms);
        Step {
            reply: encode(&resp, version),
            close: false,
            why: None,
        }
    }

    /// Checks a PLAIN token; `Ok(user)` authenticates the connection.
    fn check(&mut self, token: &[u8]) -> Result<String, String> {
        let msg = parse_plain(token).map_err(|e| e.to_string())?;
        if !msg.authzid.is_empty() && msg.authzid != msg.user {
            return Err(format!(
                "user {:?} may not act as {:?} (authorization ids are not supported)",
                msg.user, msg.authzid
            ));
        }
        if !self.users.verify(msg.user, msg.password) {
            return Err(format!(
                "authentication failed for user {:?}: invalid user name or password",
                msg.user
            ));
        }
        self.state = State::Authenticated {
            user: msg.user.to_string(),
        };
        Ok(msg.user.to_string())
    }

    pub fn authenticate(&mut self, req: &SaslAuthenticateRequest, version: i16) -> Step {
        if self.state != (State::AwaitToken { raw: false }) {
            let resp = SaslAuthenticateResponse::default()
                .with_error_code(ILLEGAL_SASL_STATE)
                .with_error_message(Some(StrBytes::from_static_str(
                    "SaslAuthenticate before a SaslHandshake v1 choosing PLAIN",
                )));
            return Step {
                reply: encode(&resp, version),
                close: true,
                why: Some("SaslAuthenticate in the wrong state".into()),
            };
        }
        match self.check(&req.auth_bytes) {
            Ok(_) => Step {
                reply: encode(&SaslAuthenticateResponse::default(), version),
                close: false,
                why: None,
            },
            Err(why) => {
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
        }
    }

    /// A bare token after a v0 handshake: success is answered with an empty
    /// frame, failure by closing the connection (there is no error field).
    pub fn raw_token(&mut self, token: &[u8]) -> Result<String, String> {
        debug_assert!(self.awaits_raw_token());
        self.check(token)
    }
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

    fn authenticate_code(step: &mut Step, version: i16) -> i16 {
        let reply = std::mem::replace(&mut step.reply, Reply::Nothing);
        let Reply::Body(b) = reply else {
            panic!("a body")
        };
        SaslAuthenticateResponse::decode(&mut Bytes::from(b), version)
            .expect("decodes")
            .error_code
    }

    #[test]
    fn session_flow() {
        let hs = |m: &'static str| {
            SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(m))
        };
        let auth = |t: &'static [u8]| {
            SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from_static(t))
        };

        // Authenticating before the handshake closes.
        let mut s = Session::new(users());
        let mut step = s.authenticate(&auth(b"\0alice\0s3cret"), 2);
        assert_eq!(authenticate_code(&mut step, 2), ILLEGAL_SASL_STATE);
        assert!(step.close);

        // SCRAM is refused with the list, and the connection may retry.
        let mut s = Session::new(users());
        let step = s.handshake(&hs("SCRAM-SHA-256"), 1);
        assert!(!step.close);
        assert_eq!(handshake_code(step, 1), UNSUPPORTED_SASL_MECHANISM);
        assert_eq!(handshake_code(s.handshake(&hs("PLAIN"), 1), 1), 0);
        assert!(!s.awaits_raw_token());
        let mut step = s.authenticate(&auth(b"\0alice\0wrong"), 1);
        assert_eq!(authenticate_code(&mut step, 1), SASL_AUTHENTICATION_FAILED);
        assert!(step.close && step.why.is_some_and(|w| w.contains("alice")));
        assert_eq!(s.authenticated(), None);

        let mut s = Session::new(users());
        s.handshake(&hs("PLAIN"), 1);
        let mut step = s.authenticate(&auth(b"alice\0alice\0s3cret"), 0);
        assert_eq!(authenticate_code(&mut step, 0), 0);
        assert!(!step.close);
        assert_eq!(s.authenticated(), Some("alice"));
        // A second handshake after success is a protocol error.
        assert!(s.handshake(&hs("PLAIN"), 1).close);

        // v0: the token comes bare.
        let mut s = Session::new(users());
        s.handshake(&hs("PLAIN"), 0);
        assert!(s.awaits_raw_token());
        assert!(s.raw_token(b"\0bob\0nope").is_err());
        let mut s = Session::new(users());
        s.handshake(&hs("PLAIN"), 0);
        assert_eq!(s.raw_token(b"\0bob\0pa:ss"), Ok("bob".to_string()));
        // Acting as another user is refused.
        let mut s = Session::new(users());
        s.handshake(&hs("PLAIN"), 1);
        let mut step = s.authenticate(&auth(b"alice\0bob\0pa:ss"), 1);
        assert_eq!(authenticate_code(&mut step, 1), SASL_AUTHENTICATION_FAILED);
    }
}
