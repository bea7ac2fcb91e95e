//! SASL/SCRAM-SHA-256 and SCRAM-SHA-512 (RFC 5802, RFC 7677) as Kafka
//! serves them: no channel binding (`n,,` or `n,a=<user>,`), the user name
//! as the SASL name (`=2C`, `=3D` escaped), extensions refused (Kafka's
//! only one, `tokenauth`, is for delegation tokens, which floe does not
//! issue), 4096..=16384 iterations.
//!
//! The cryptography is aws-lc-rs (already built for TLS): PBKDF2, HMAC and
//! the digests. This module is the message exchange on top of it and the
//! derivation of stored credentials; pure logic, no I/O. Credentials come
//! from the metadata store ([`floe_meta::schema::ScramUserRecord`]).

use aws_lc_rs::{digest, hmac, pbkdf2, rand};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use floe_meta::schema::ScramCredential;

/// Kafka's bounds on a SCRAM credential's iteration count.
pub const ITERATIONS_MIN: u32 = 4096;
pub const ITERATIONS_MAX: u32 = 16384;
/// Salt length of credentials floe derives itself (`floe users set`).
pub const SALT_BYTES: usize = 32;
/// Random bytes in the server's part of the nonce.
const SERVER_NONCE_BYTES: usize = 24;
/// Longest client message accepted (a user name, a nonce and a proof).
const MESSAGE_BYTES_MAX: usize = 4096;

/// The two SCRAM mechanisms Kafka defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mechanism {
    Sha256,
    Sha512,
}

impl Mechanism {
    pub const ALL: [Mechanism; 2] = [Mechanism::Sha256, Mechanism::Sha512];

    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Sha256 => "SCRAM-SHA-256",
            Mechanism::Sha512 => "SCRAM-SHA-512",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The `mechanism` field of Describe/AlterUserScramCredentials.
    pub fn wire(self) -> i8 {
        match self {
            Mechanism::Sha256 => 1,
            Mechanism::Sha512 => 2,
        }
    }

    pub fn from_wire(v: i8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.wire() == v)
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Mechanism::Sha256 => &digest::SHA256,
            Mechanism::Sha512 => &digest::SHA512,
        }
    }

    fn hmac(self) -> hmac::Algorithm {
        match self {
            Mechanism::Sha256 => hmac::HMAC_SHA256,
            Mechanism::Sha512 => hmac::HMAC_SHA512,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Mechanism::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Mechanism::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn len(self) -> usize {
        self.digest().output_len()
    }

    fn mac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        hmac::sign(&hmac::Key::new(self.hmac(), key), data)
            .as_ref()
            .to_vec()
    }

    /// `Hi(password, salt, i)`: the salted password.
    pub fn salted_password(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.len()];
        let n = std::num::NonZeroU32::new(iterations.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        pbkdf2::derive(self.pbkdf2(), n, salt, password, &mut out);
        out
    }

    /// What the broker keeps of a salted password (AlterUserScramCredentials
    /// sends the salted password, never the password).
    pub fn credential(self, salted: &[u8], salt: &[u8], iterations: u32) -> ScramCredential {
        let client_key = self.mac(salted, b"Client Key");
        let stored_key = digest::digest(self.digest(), &client_key);
        let server_key = self.mac(salted, b"Server Key");
        ScramCredential {
            salt: STANDARD.encode(salt),
            stored_key: STANDARD.encode(stored_key.as_ref()),
            server_key: STANDARD.encode(server_key),
            iterations,
        }
    }

    /// A credential for `password` with a fresh random salt.
    pub fn credential_for_password(
        self,
        password: &str,
        iterations: u32,
    ) -> Result<ScramCredential, String> {
        let mut salt = [0u8; SALT_BYTES];
        rand::fill(&mut salt).map_err(|_| "the system's random source failed".to_string())?;
        let salted = self.salted_password(password.as_bytes(), &salt, iterations);
        Ok(self.credential(&salted, &salt, iterations))
    }

    /// Whether `password` is the one `cred` was made from (SASL/PLAIN
    /// checked against stored SCRAM credentials). Costs one PBKDF2.
    pub fn verify_password(self, cred: &ScramCredential, password: &str) -> bool {
        let Ok(keys) = Keys::decode(cred) else {
            return false;
        };
        let salted = self.salted_password(password.as_bytes(), &keys.salt, cred.iterations);
        let client_key = self.mac(&salted, b"Client Key");
        let stored = digest::digest(self.digest(), &client_key);
        constant_time_eq(stored.as_ref(), &keys.stored_key)
    }
}

/// Checks an iteration count against Kafka's bounds.
pub fn check_iterations(iterations: i32) -> Result<u32, String> {
    if iterations < ITERATIONS_MIN as i32 {
        return Err(format!(
            "Too few iterations: {iterations} (at least {ITERATIONS_MIN})"
        ));
    }
    if iterations > ITERATIONS_MAX as i32 {
        return Err(format!(
            "Too many iterations: {iterations} (at most {ITERATIONS_MAX})"
        ));
    }
    Ok(iterations as u32)
}

/// Equality that takes as long however many bytes match (aws-lc-rs).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// A stored credential's binary parts.
struct Keys {
    salt: Vec<u8>,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

impl Keys {
    fn decode(cred: &ScramCredential) -> Result<Self, String> {
        let d = |what: &str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|e| format!("stored SCRAM {what} is not base64: {e}"))
        };
        Ok(Self {
            salt: d("salt", &cred.salt)?,
            stored_key: d("stored key", &cred.stored_key)?,
            server_key: d("server key", &cred.server_key)?,
        })
    }
}

/// Undoes the SASL name escaping of RFC 5802 (`=2C` is `,`, `=3D` is `=`).
fn unescape_name(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        let esc = rest.get(i..i + 3);
        match esc {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(format!("invalid escape in the user name {s:?}")),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// `key=value` attributes of a SCRAM message, in order.
fn attributes(msg: &str) -> Result<Vec<(char, &str)>, String> {
    msg.split(',')
        .map(|part| {
            let mut chars = part.chars();
            match (chars.next(), chars.next()) {
                (Some(k), Some('=')) if k.is_ascii_alphabetic() => Ok((k, &part[2..])),
                _ => Err(format!("malformed attribute {part:?}")),
            }
        })
        .collect()
}

/// What the server learnt from the client's first message.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientFirst {
    /// The whole GS2 header (`n,,` or `n,a=…,`), echoed in the final message.
    pub gs2_header: String,
    pub user: String,
    pub nonce: String,
    /// `client-first-message-bare`, part of the AuthMessage.
    pub bare: String,
}

pub fn parse_client_first(token: &[u8]) -> Result<ClientFirst, String> {
    if token.len() > MESSAGE_BYTES_MAX {
        return Err(format!("client-first message of {} bytes", token.len()));
    }
    let msg = std::str::from_utf8(token).map_err(|_| "client-first message is not UTF-8")?;
    let mut parts = msg.splitn(3, ',');
    let (Some(flag), Some(authzid), Some(bare)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("client-first message lacks the GS2 header".into());
    };
    match flag {
        "n" => {}
        // "y": the client could bind but thinks we cannot; "p=<type>":
        // it wants to. Kafka serves neither (no SCRAM-…-PLUS).
        "y" => {}
        _ if flag.starts_with("p=") => {
            return Err("channel binding is not supported (use SCRAM without -PLUS)".into());
        }
        _ => return Err(format!("invalid GS2 flag {flag:?}")),
    }
    let authzid = match authzid {
        "" => None,
        a => Some(unescape_name(
            a.strip_prefix("a=").ok_or("invalid authzid")?,
        )?),
    };
    let mut fields = bare.split(',');
    let (Some(name), Some(nonce)) = (
        fields.next().and_then(|f| f.strip_prefix("n=")),
        fields.next().and_then(|f| f.strip_prefix("r=")),
    ) else {
        return Err("client-first message must start with n=<user>,r=<nonce>".into());
    };
    if let Some(ext) = fields.next() {
        let key = ext.split('=').next().unwrap_or(ext);
        return Err(format!(
            "unsupported SCRAM extension {key:?} (delegation tokens are not served)"
        ));
    }
    let user = unescape_name(name)?;
    if user.is_empty() {
        return Err("empty user name".into());
    }
    if nonce.is_empty() || !nonce.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err("invalid client nonce".into());
    }
    if let Some(a) = authzid {
        if a != user {
            return Err(format!(
                "user {user:?} may not act as {a:?} (authorization ids are not supported)"
            ));
        }
    }
    Ok(ClientFirst {
        gs2_header: format!("{flag},{},", msg.split(',').nth(1).unwrap_or("")),
        user,
        nonce: nonce.to_string(),
        bare: bare.to_string(),
    })
}

/// The server's side of one exchange, after the client-first message:
/// holds what the final message is checked against.
pub struct Exchange {
    mechanism: Mechanism,
    user: String,
    gs2_header: String,
    nonce: String,
    /// client-first-message-bare + "," + server-first-message
    auth_prefix: String,
    keys: Keys,
}

impl Exchange {
    /// Starts an exchange for `first` with the user's stored credential;
    /// returns the server-first message.
    pub fn start(
        mechanism: Mechanism,
        first: ClientFirst,
        cred: &ScramCredential,
    ) -> Result<(Self, Vec<u8>), String> {
        let keys = Keys::decode(cred)?;
        if keys.stored_key.len() != mechanism.len() || keys.server_key.len() != mechanism.len() {
            return Err(format!(
                "the stored credential of {:?} is not a {} credential",
                first.user,
                mechanism.name()
            ));
        }
        let mut random = [0u8; SERVER_NONCE_BYTES];
        rand::fill(&mut random).map_err(|_| "the system's random source failed".to_string())?;
        let nonce = format!("{}{}", first.nonce, URL_SAFE_NO_PAD.encode(random));
        let server_first = format!("r={nonce},s={},i={}", cred.salt, cred.iterations);
        let ex = Self {
            mechanism,
            user: first.user,
            gs2_header: first.gs2_header,
            nonce,
            auth_prefix: format!("{},{server_first}", first.bare),
            keys,
        };
        Ok((ex, server_first.into_bytes()))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn mechanism(&self) -> Mechanism {
        self.mechanism
    }

    /// Checks the client-final message; on success returns the
    /// server-final message (`v=<signature>`).
    pub fn finish(&self, token: &[u8]) -> Result<Vec<u8>, String> {
        if token.len() > MESSAGE_BYTES_MAX {
            return Err(format!("client-final message of {} bytes", token.len()));
        }
        let msg = std::str::from_utf8(token).map_err(|_| "client-final message is not UTF-8")?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or("client-final message has no proof")?;
        let attrs = attributes(without_proof)?;
        let mut it = attrs.iter();
        let (Some(('c', binding)), Some(('r', nonce)), None) = (it.next(), it.next(), it.next())
        else {
            return Err("client-final message must be c=…,r=…,p=…".into());
        };
        if STANDARD.decode(binding).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err("channel binding does not match the GS2 header".into());
        }
        // Kafka accepts any nonce that *ends with* the server-first one:
        // librdkafka 2.0.x sends its client nonce once more in front of
        // it. The proof covers the message as sent, and the server's part
        // still binds it to this exchange.
        if !nonce.ends_with(self.nonce.as_str()) {
            return Err("invalid nonce in the client-final message".into());
        }
        let proof = STANDARD
            .decode(proof)
            .map_err(|_| "the client proof is not base64")?;
        let m = self.mechanism;
        if proof.len() != m.len() {
            return Err("the client proof has the wrong length".into());
        }
        let auth_message = format!("{},{without_proof}", self.auth_prefix);
        let signature = m.mac(&self.keys.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let stored = digest::digest(m.digest(), &client_key);
        if !constant_time_eq(stored.as_ref(), &self.keys.stored_key) {
            return Err(format!(
                "invalid credentials for user {:?} with {}",
                self.user,
                m.name()
            ));
        }
        let server_signature = m.mac(&self.keys.server_key, auth_message.as_bytes());
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's side, as RFC 5802 describes it, to drive the server.
    fn client_final(
        m: Mechanism,
        password: &str,
        first_bare: &str,
        server_first: &str,
        gs2: &str,
        nonce_prefix: &str,
    ) -> (String, Vec<u8>) {
        let attrs = attributes(server_first).unwrap();
        let nonce = format!("{nonce_prefix}{}", attrs[0].1);
        let salt = STANDARD.decode(attrs[1].1).unwrap();
        let iters: u32 = attrs[2].1.parse().unwrap();
        let salted = m.salted_password(password.as_bytes(), &salt, iters);
        let client_key = m.mac(&salted, b"Client Key");
        let stored = digest::digest(m.digest(), &client_key);
        let without = format!("c={},r={nonce}", STANDARD.encode(gs2));
        let auth = format!("{first_bare},{server_first},{without}");
        let sig = m.mac(stored.as_ref(), auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(&sig).map(|(a, b)| a ^ b).collect();
        let server_sig = m.mac(&m.mac(&salted, b"Server Key"), auth.as_bytes());
        (
            format!("{without},p={}", STANDARD.encode(proof)),
            format!("v={}", STANDARD.encode(server_sig)).into_bytes(),
        )
    }

    /// Client messages from anyone: every input is answered Ok or Err,
    /// never a panic (the cargo-fuzz target `sasl_messages` runs the same
    /// parsers for longer). Inputs are arbitrary bytes and mutations of
    /// valid messages (a byte changed, cut short), so the generator reaches
    /// past the first checks.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        const FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
        const FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";

        fn exchange() -> Exchange {
            let m = Mechanism::Sha256;
            let cred = m.credential(&[7; 32], b"salt", 4096);
            let first = parse_client_first(FIRST.as_bytes()).unwrap();
            Exchange::start(m, first, &cred).unwrap().0
        }

        fn mutated(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
            (
                any::<prop::sample::Index>(),
                any::<u8>(),
                any::<prop::sample::Index>(),
            )
                .prop_map(move |(at, byte, cut)| {
                    let mut v = valid.as_bytes().to_vec();
                    let i = at.index(v.len());
                    v[i] = byte;
                    v.truncate(cut.index(v.len() + 1).max(i + 1));
                    v
                })
        }

        fn inputs(valid: &'static str) -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![prop::collection::vec(any::<u8>(), 0..300), mutated(valid)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn client_first_is_total(token in inputs(FIRST)) {
                if let Ok(f) = parse_client_first(&token) {
                    prop_assert!(!f.user.is_empty() && !f.nonce.is_empty());
                }
            }

            #[test]
            fn client_final_is_total(token in inputs(FINAL)) {
                // No random input carries a valid proof.
                prop_assert!(exchange().finish(&token).is_err());
            }

            #[test]
            fn plain_and_oauthbearer_are_total(token in prop::collection::vec(any::<u8>(), 0..300)) {
                let _ = crate::sasl::parse_plain(&token);
                let _ = crate::oauth::parse_initial_response(&token);
            }
        }
    }

    #[test]
    fn rfc7677_test_vector() {
        // RFC 7677 section 3: user "user", password "pencil".
        let m = Mechanism::Sha256;
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = m.salted_password(b"pencil", &salt, 4096);
        let cred = m.credential(&salted, &salt, 4096);
        let bare = "n=user,r=rOprNGfwEbeRWgbNEkqO";
        let server_first = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let final_msg = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        let keys = Keys::decode(&cred).unwrap();
        let ex = Exchange {
            mechanism: m,
            user: "user".into(),
            gs2_header: "n,,".into(),
            nonce: "rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            auth_prefix: format!("{bare},{server_first}"),
            keys,
        };
        assert_eq!(
            ex.finish(final_msg.as_bytes()).unwrap(),
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".to_vec()
        );
        assert!(m.verify_password(&cred, "pencil"));
        assert!(!m.verify_password(&cred, "pencil!"));
    }

    #[test]
    fn exchanges_both_mechanisms() {
        for m in Mechanism::ALL {
            let cred = m.credential_for_password("s3cret", 4096).unwrap();
            for gs2 in ["n,,", "n,a=al=2Cice,"] {
                let first = format!("{gs2}n=al=2Cice,r=abcdef");
                let cf = parse_client_first(first.as_bytes()).unwrap();
                assert_eq!(cf.user, "al,ice");
                let bare = cf.bare.clone();
                let (ex, sf) = Exchange::start(m, cf, &cred).unwrap();
                let sf = String::from_utf8(sf).unwrap();
                assert!(sf.starts_with("r=abcdef"));
                let (good, expect) = client_final(m, "s3cret", &bare, &sf, gs2, "");
                assert_eq!(ex.finish(good.as_bytes()).unwrap(), expect, "{m:?}");
                // librdkafka 2.0's form: its nonce once more in front.
                let (lrk, expect) = client_final(m, "s3cret", &bare, &sf, gs2, "abcdef");
                assert_eq!(ex.finish(lrk.as_bytes()).unwrap(), expect, "{m:?}");
                let (bad, _) = client_final(m, "wrong", &bare, &sf, gs2, "");
                assert!(ex
                    .finish(bad.as_bytes())
                    .unwrap_err()
                    .contains("invalid credentials"));
                // A replay against a new exchange (new server nonce) fails.
                let cf = parse_client_first(first.as_bytes()).unwrap();
                let (ex2, _) = Exchange::start(m, cf, &cred).unwrap();
                assert!(ex2.finish(good.as_bytes()).unwrap_err().contains("nonce"));
            }
        }
        // A SHA-256 credential is not a SHA-512 one.
        let cred = Mechanism::Sha256
            .credential_for_password("x", 4096)
            .unwrap();
        let cf = parse_client_first(b"n,,n=u,r=n").unwrap();
        assert!(Exchange::start(Mechanism::Sha512, cf, &cred).is_err());
    }

    #[test]
    fn malformed_client_messages() {
        for (bad, says) in [
            (&b"p=tls-unique,,n=u,r=x"[..], "channel binding"),
            (b"q,,n=u,r=x", "GS2 flag"),
            (b"n,,r=x,n=u", "must start"),
            (b"n,,n=u,r=x,tokenauth=true", "extension \"tokenauth\""),
            (b"n,,n=u,r=x,t=true", "extension"),
            (b"n,,n=,r=x", "empty user"),
            (b"n,,n=u=2,r=x", "escape"),
            (b"n,a=v,n=u,r=x", "may not act"),
            (b"n,,n=u,r=", "nonce"),
            (b"n,,", "must start"),
            (b"n", "GS2"),
            (&[0xff, 0xfe], "UTF-8"),
        ] {
            let e = parse_client_first(bad).unwrap_err();
            assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(bad));
        }
        let cred = Mechanism::Sha256
            .credential_for_password("pw", 4096)
            .unwrap();
        let cf = parse_client_first(b"n,,n=u,r=abc").unwrap();
        let (ex, sf) = Exchange::start(Mechanism::Sha256, cf, &cred).unwrap();
        let nonce = String::from_utf8(sf).unwrap()[2..]
            .split(',')
            .next()
            .unwrap()
            .to_string();
        for bad in [
            format!("c=biws,r={nonce}"),
            format!("c=eSws,r={nonce},p=AAAA"),
            format!("c=biws,r={nonce}x,p=AAAA"),
            format!("c=biws,r=x{},p=AAAA", &nonce[1..]),
            format!("c=biws,r={nonce},p=!!"),
            format!("c=biws,r={nonce},p=AAAA"),
            "garbage".to_string(),
        ] {
            assert!(ex.finish(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            check_iterations(4095).unwrap_err(),
            "Too few iterations: 4095 (at least 4096)"
        );
        assert!(check_iterations(16385).is_err());
        assert_eq!(check_iterations(8192), Ok(8192));
        assert_eq!(Mechanism::from_wire(2), Some(Mechanism::Sha512));
        assert_eq!(Mechanism::from_wire(0), None);
        assert_eq!(Mechanism::parse("SCRAM-SHA-256"), Some(Mechanism::Sha256));
    }
}
