//! The AWS shared files (`~/.aws/credentials`, `~/.aws/config`) and
//! `AWS_PROFILE`, which `object_store`'s credential chain does not read.
//!
//! The AWS SDKs look at the environment first, then the profile, then web
//! identity, container and instance credentials; floe does the same by
//! handing a profile's static keys to the builder only when the environment
//! has none. Profiles that assume roles, use SSO or a `credential_process`
//! are not followed (their keys are not in the files); the caller logs that.

use std::collections::HashMap;
use std::path::PathBuf;

/// Static keys and region of one profile.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    /// Set when the profile gets its credentials some other way
    /// (`role_arn`, `sso_*`, `credential_process`), which floe cannot use.
    pub indirect: Option<String>,
}

/// INI sections and their keys (lower-cased), as the AWS files write them.
fn sections(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim();
            // ~/.aws/config names profiles "profile NAME" (but "default").
            let name = name.strip_prefix("profile ").unwrap_or(name).trim();
            current = Some(name.to_string());
            out.entry(name.to_string()).or_default();
            continue;
        }
        if let (Some(section), Some((k, v))) = (&current, line.split_once('=')) {
            out.entry(section.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

/// The named profile from the two files' contents; `None` if neither has it.
pub fn parse(name: &str, credentials: &str, config: &str) -> Option<Profile> {
    let creds = sections(credentials);
    let conf = sections(config);
    let (c, f) = (creds.get(name), conf.get(name));
    if c.is_none() && f.is_none() {
        return None;
    }
    let get = |k: &str| {
        c.and_then(|s| s.get(k))
            .or_else(|| f.and_then(|s| s.get(k)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let indirect = [
        "role_arn",
        "sso_start_url",
        "sso_session",
        "credential_process",
    ]
    .into_iter()
    .find(|k| get(k).is_some())
    .map(str::to_string);
    Some(Profile {
        name: name.to_string(),
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: f.and_then(|s| s.get("region")).cloned(),
        indirect,
    })
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The profile the environment selects (`AWS_PROFILE`, else `default`),
/// read from `AWS_SHARED_CREDENTIALS_FILE` / `AWS_CONFIG_FILE` or their
/// places under `~/.aws`. Missing files are empty.
pub fn from_env() -> Option<Profile> {
    let name = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".into());
    let path = |var: &str, file: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home().map(|h| h.join(".aws").join(file)))
    };
    let read = |p: Option<PathBuf>| {
        p.and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    };
    parse(
        &name,
        &read(path("AWS_SHARED_CREDENTIALS_FILE", "credentials")),
        &read(path("AWS_CONFIG_FILE", "config")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDS: &str = "
[default]
aws_access_key_id = AKIDEFAULT
aws_secret_access_key = secret0

[ci]
aws_access_key_id=AKICI
aws_secret_access_key=secret1
aws_session_token=tok
";
    const CONFIG: &str = "
[default]
region = eu-west-1
[profile ci]
region=us-west-2
[profile assumed]
role_arn = arn:aws:iam::1:role/x
source_profile = default
";

    #[test]
    fn profiles_come_from_both_files() {
        let d = parse("default", CREDS, CONFIG).expect("default");
        assert_eq!(d.access_key_id.as_deref(), Some("AKIDEFAULT"));
        assert_eq!(d.region.as_deref(), Some("eu-west-1"));
        let ci = parse("ci", CREDS, CONFIG).expect("ci");
        assert_eq!(ci.session_token.as_deref(), Some("tok"));
        assert_eq!(ci.region.as_deref(), Some("us-west-2"));
        assert_eq!(ci.indirect, None);
        let a = parse("assumed", CREDS, CONFIG).expect("assumed");
        assert_eq!(a.access_key_id, None);
        assert_eq!(a.indirect.as_deref(), Some("role_arn"));
        assert_eq!(parse("nope", CREDS, CONFIG), None);
        assert_eq!(parse("default", "", ""), None);
    }
}
