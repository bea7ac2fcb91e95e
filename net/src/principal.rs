//! Who a connection is: Kafka's principal (`User:NAME`). SASL logins give
//! their user name; on SSL listeners a client certificate gives its
//! subject's distinguished name in RFC 2253 form (Java's
//! `X500Principal.getName()`, what Kafka uses), mapped by Kafka's
//! `ssl.principal.mapping.rules`; anyone else is `User:ANONYMOUS`.

use regex::Regex;

pub const ANONYMOUS: &str = "User:ANONYMOUS";

/// The RFC 2253 string of a certificate's subject: the last RDN first,
/// `,` between RDNs and `+` inside one, the usual short names (CN, L, ST,
/// O, OU, C, STREET, DC, UID) and the dotted OID for any other type.
pub fn subject_dn(cert_der: &[u8]) -> Result<String, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| format!("the client certificate does not parse: {e}"))?;
    let mut rdns = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let parts: Vec<String> = rdn
            .iter()
            .map(|atv| {
                let oid = atv.attr_type().to_id_string();
                let key = match oid.as_str() {
                    "2.5.4.3" => "CN".to_string(),
                    "2.5.4.6" => "C".to_string(),
                    "2.5.4.7" => "L".to_string(),
                    "2.5.4.8" => "ST".to_string(),
                    "2.5.4.9" => "STREET".to_string(),
                    "2.5.4.10" => "O".to_string(),
                    "2.5.4.11" => "OU".to_string(),
                    "0.9.2342.19200300.100.1.25" => "DC".to_string(),
                    "0.9.2342.19200300.100.1.1" => "UID".to_string(),
                    _ => oid,
                };
                let value = match atv.as_str() {
                    Ok(s) => escape(s),
                    Err(_) => format!("#{}", hex(atv.as_slice())),
                };
                format!("{key}={value}")
            })
            .collect();
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    Ok(rdns.join(","))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// RFC 2253 section 2.4.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One of Kafka's `ssl.principal.mapping.rules`.
#[derive(Debug, Clone)]
enum Rule {
    Default,
    Map {
        pattern: Regex,
        replacement: String,
        case: Option<char>,
    },
}

/// Kafka's `ssl.principal.mapping.rules`: `RULE:pattern/replacement/[LU]`
/// and `DEFAULT`, comma-separated, tried in order; the first rule whose
/// pattern matches the whole DN gives the name.
#[derive(Debug, Clone)]
pub struct MappingRules {
    rules: Vec<Rule>,
    text: String,
}

impl PartialEq for MappingRules {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for MappingRules {}

impl Default for MappingRules {
    fn default() -> Self {
        Self {
            rules: vec![Rule::Default],
            text: "DEFAULT".into(),
        }
    }
}

/// Reads up to an unescaped `/`; returns the part (escapes kept, but
/// `\/` becomes `/`) and the rest after the slash.
fn until_slash(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, '/')) => out.push('/'),
                Some((_, n)) => {
                    out.push('\\');
                    out.push(n);
                }
                None => out.push('\\'),
            },
            '/' => return Some((out, &s[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

impl MappingRules {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        let mut rest = text.trim();
        // Java's `$1` is a group number; Rust would read `$1x` as a group
        // named "1x": replacements are rewritten to `${1}`.
        let group = Regex::new(r"\$(\d+)").map_err(|e| e.to_string())?;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("DEFAULT") {
                rules.push(Rule::Default);
                rest = r;
            } else if let Some(r) = rest.strip_prefix("RULE:") {
                let (pattern, r) =
                    until_slash(r).ok_or_else(|| format!("rule {rest:?} lacks its replacement"))?;
                let (replacement, r) =
                    until_slash(r).ok_or_else(|| format!("rule {rest:?} lacks its closing /"))?;
                let (case, r) = match r.chars().next() {
                    Some(c @ ('L' | 'U')) => (Some(c), &r[1..]),
                    _ => (None, r),
                };
                let pattern = Regex::new(&format!("^(?:{pattern})$"))
                    .map_err(|e| format!("rule pattern {pattern:?}: {e}"))?;
                let replacement = group.replace_all(&replacement, "$${$1}").into_owned();
                rules.push(Rule::Map {
                    pattern,
                    replacement,
                    case,
                });
                rest = r;
            } else {
                return Err(format!(
                    "expected RULE:pattern/replacement/[LU] or DEFAULT at {rest:?}"
                ));
            }
            rest = rest.trim_start();
            rest = match rest.strip_prefix(',') {
                Some(r) => r.trim_start(),
                None if rest.is_empty() => rest,
                None => return Err(format!("expected ',' between rules at {rest:?}")),
            };
        }
        if rules.is_empty() {
            return Err("no rules".into());
        }
        Ok(Self {
            rules,
            text: text.trim().to_string(),
        })
    }

    /// The name the first matching rule gives `dn`.
    pub fn apply(&self, dn: &str) -> Result<String, String> {
        for rule in &self.rules {
            match rule {
                Rule::Default => return Ok(dn.to_string()),
                Rule::Map {
                    pattern,
                    replacement,
                    case,
                } => {
                    if pattern.is_match(dn) {
                        let name = pattern.replace_all(dn, replacement.as_str()).into_owned();
                        return Ok(match case {
                            Some('L') => name.to_lowercase(),
                            Some('U') => name.to_uppercase(),
                            _ => name,
                        });
                    }
                }
            }
        }
        Err(format!(
            "no ssl.principal.mapping.rules rule matches {dn:?} (rules: {})",
            self.text
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_mapping_rules() {
        let r = MappingRules::parse(
            r"RULE:^CN=(.*?),OU=ServiceUsers.*$/$1/, RULE:^CN=(.*?),OU=(.*?),O=(.*?),L=(.*?),ST=(.*?),C=(.*?)$/$1@$2/L, RULE:^.*[Cc][Nn]=([a-zA-Z0-9.]*).*$/$1/U, DEFAULT",
        )
        .unwrap();
        assert_eq!(
            r.apply("CN=kafka-svc,OU=ServiceUsers,O=Unknown,L=Unknown,ST=Unknown,C=Unknown")
                .unwrap(),
            "kafka-svc"
        );
        assert_eq!(
            r.apply("CN=Duke,OU=JavaSoft,O=Sun Microsystems,L=Santa Clara,ST=CA,C=US")
                .unwrap(),
            "duke@javasoft"
        );
        assert_eq!(r.apply("OU=x,CN=adminUser,O=y").unwrap(), "ADMINUSER");
        assert_eq!(r.apply("O=nothing").unwrap(), "O=nothing");
        // No DEFAULT: an unmatched DN has no principal.
        let strict = MappingRules::parse(r"RULE:^CN=([^,]*)$/$1/L").unwrap();
        assert_eq!(strict.apply("CN=Alice").unwrap(), "alice");
        assert!(strict
            .apply("CN=a,O=b")
            .unwrap_err()
            .contains("no ssl.principal.mapping.rules"));
        // An escaped slash in a pattern; $1 followed by text.
        let r = MappingRules::parse(r"RULE:^CN=a\/(.*)$/$1x/").unwrap();
        assert_eq!(r.apply("CN=a/b").unwrap(), "bx");
        for bad in [
            "RULE:^CN=x",
            "RULE:^CN=(x/$1",
            "FOO",
            "RULE:(/x/",
            "DEFAULT DEFAULT",
        ] {
            assert!(MappingRules::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MappingRules::default().apply("CN=x").unwrap(), "CN=x");
    }

    #[test]
    fn rfc2253_escaping() {
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x "), "\\#x\\ ");
        assert_eq!(escape(" a"), "\\ a");
        assert_eq!(escape("plain"), "plain");
    }
}
