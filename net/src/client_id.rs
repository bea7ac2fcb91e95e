//! Features a client states in its `client.id`: `key=value` pairs beside
//! the application's own id, separated by commas (or spaces), e.g.
//! `orders-api,floe_az=us-east-1a` or `ws_az=eu-west-1b,host_override=localhost`.
//!
//! Every spelling users migrate from is accepted, so a client configured
//! for WarpStream, AutoMQ or another diskless Kafka keeps its zone here.
//! Unknown keys and malformed values are ignored (the client id is free
//! text that floe must never reject a connection over).

/// Keys that state the client's availability zone, in order of precedence.
pub const ZONE_KEYS: [&str; 6] = [
    "floe_az",
    "warpstream_az",
    "ws_az",
    "zone",
    "diskless_az",
    "automq_az",
];

/// Keys that ask floe to advertise another host to this client only.
pub const HOST_OVERRIDE_KEYS: [&str; 2] = ["host_override", "ws_host_override"];

/// Longest zone name accepted (longer values are ignored).
pub const ZONE_BYTES_MAX: usize = 128;
/// Longest host name accepted (DNS's limit).
pub const HOST_BYTES_MAX: usize = 253;

/// What a client id says about the client, beyond its application id.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClientFeatures {
    /// The zone the client runs in.
    pub zone: Option<String>,
    /// The host to advertise to this client instead of each broker's.
    pub host_override: Option<String>,
}

fn valid_zone(v: &str) -> bool {
    !v.is_empty() && v.len() <= ZONE_BYTES_MAX && v.chars().all(|c| !c.is_control())
}

/// A host name or an IP address: what a client can put in a socket
/// address. Anything else would only make the client fail later.
fn valid_host(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= HOST_BYTES_MAX
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
}

/// Parses the features of one client id. Total: any input yields a value.
pub fn parse(client_id: &str) -> ClientFeatures {
    let mut zones: [Option<&str>; ZONE_KEYS.len()] = Default::default();
    let mut host_override = None;
    for token in client_id.split(|c: char| c == ',' || c.is_whitespace()) {
        let Some((key, value)) = token.split_once('=') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        if let Some(i) = ZONE_KEYS.iter().position(|k| key.eq_ignore_ascii_case(k)) {
            if valid_zone(value) && zones[i].is_none() {
                zones[i] = Some(value);
            }
        } else if HOST_OVERRIDE_KEYS
            .iter()
            .any(|k| key.eq_ignore_ascii_case(k))
            && valid_host(value)
            && host_override.is_none()
        {
            host_override = Some(value.to_string());
        }
    }
    ClientFeatures {
        zone: zones.iter().flatten().next().map(|z| z.to_string()),
        host_override,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_zone_spelling() {
        for key in ZONE_KEYS {
            let f = parse(&format!("my-app,{key}=us-east-1a"));
            assert_eq!(f.zone.as_deref(), Some("us-east-1a"), "{key}");
            let upper = parse(&format!("{}=z2 app", key.to_uppercase()));
            assert_eq!(upper.zone.as_deref(), Some("z2"), "{key}");
        }
    }

    #[test]
    fn plain_ids_have_no_features() {
        assert_eq!(parse("rdkafka"), ClientFeatures::default());
        assert_eq!(parse(""), ClientFeatures::default());
        assert_eq!(parse("a=b,=c,zone="), ClientFeatures::default());
    }

    #[test]
    fn precedence_and_override() {
        let f = parse("zone=b,floe_az=a,ws_host_override=localhost");
        assert_eq!(f.zone.as_deref(), Some("a"));
        assert_eq!(f.host_override.as_deref(), Some("localhost"));
        let f = parse("host_override=bad/host,host_override=ok.example");
        assert_eq!(f.host_override.as_deref(), Some("ok.example"));
    }

    proptest! {
        #[test]
        fn any_text_parses(s in ".{0,200}") {
            let f = parse(&s);
            if let Some(z) = f.zone { prop_assert!(z.len() <= ZONE_BYTES_MAX); }
            if let Some(h) = f.host_override { prop_assert!(h.len() <= HOST_BYTES_MAX); }
        }
    }
}
