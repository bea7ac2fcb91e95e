//! The S3 backend's settings, checked against S3's limits and floe's
//! bounds, and the `object_store` client configuration built from them.

use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{ClientConfigKey, RetryConfig};

use super::multipart::{PART_BYTES_MAX, PART_BYTES_MIN, PART_CONCURRENCY_MAX};
use crate::retry::RetryPolicy;
use crate::{validate_key, Error, Result};

/// Most retries of one request that a configuration may ask for.
pub const RETRY_MAX_LIMIT: u32 = 100;

/// Settings of the S3 backend. `Default` gives floe's documented defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`). Implies
    /// path-style addressing; allows plain HTTP when the URL says `http://`.
    /// Without it: AWS, or `AWS_ENDPOINT` from the environment.
    pub endpoint: Option<String>,
    /// Region; without it `AWS_REGION`/`AWS_DEFAULT_REGION`, else us-east-1.
    pub region: Option<String>,
    /// The bucket is an S3 Express One Zone directory bucket
    /// (`NAME--AZID--x-s3`).
    pub express: bool,
    /// Objects larger than this are uploaded in parts.
    pub multipart_threshold_bytes: usize,
    /// Size of each part but the last (grown when an object would need more
    /// than [`PARTS_MAX`](super::PARTS_MAX) parts).
    pub part_bytes: usize,
    /// Parts of one upload in flight at once.
    pub part_concurrency: usize,
    /// Retries of one request after the first attempt.
    pub retry_max: u32,
    /// Total time for one request, all attempts and sleeps included.
    pub retry_deadline: Duration,
    /// Time for one attempt.
    pub attempt_timeout: Duration,
    /// Start a second identical ranged read when the first has not finished
    /// after this long; `None` disables hedging.
    pub hedge_after: Option<Duration>,
}

impl Default for S3Options {
    fn default() -> Self {
        let retry = RetryPolicy::default();
        Self {
            endpoint: None,
            region: None,
            express: false,
            multipart_threshold_bytes: 16 << 20,
            part_bytes: 8 << 20,
            part_concurrency: 4,
            retry_max: retry.retry_max,
            retry_deadline: retry.deadline,
            attempt_timeout: retry.attempt_timeout,
            // Bufstream's default.
            hedge_after: Some(Duration::from_millis(250)),
        }
    }
}

impl S3Options {
    /// Checks the settings against S3's limits and floe's bounds.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Config { reason });
        if !(PART_BYTES_MIN..=PART_BYTES_MAX).contains(&self.part_bytes) {
            return bad(format!(
                "upload part size {} must be between {PART_BYTES_MIN} (S3's minimum part) and {PART_BYTES_MAX}",
                self.part_bytes
            ));
        }
        if !(1..=PART_CONCURRENCY_MAX).contains(&self.part_concurrency) {
            return bad(format!(
                "upload concurrency {} must be between 1 and {PART_CONCURRENCY_MAX}",
                self.part_concurrency
            ));
        }
        if self.multipart_threshold_bytes == 0 || self.multipart_threshold_bytes > PART_BYTES_MAX {
            return bad(format!(
                "multipart threshold {} must be between 1 and {PART_BYTES_MAX} (S3's largest single PUT is 5 GiB)",
                self.multipart_threshold_bytes
            ));
        }
        if self.retry_max > RETRY_MAX_LIMIT {
            return bad(format!(
                "retry_max {} is above {RETRY_MAX_LIMIT}",
                self.retry_max
            ));
        }
        if self.retry_deadline.is_zero() || self.attempt_timeout.is_zero() {
            return bad("retry deadline and attempt timeout must be positive".into());
        }
        if self.hedge_after.is_some_and(|d| d.is_zero()) {
            return bad("hedge delay must be positive (None disables hedging)".into());
        }
        if let Some(e) = &self.endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return bad(format!(
                    "S3 endpoint {e:?} must start with http:// or https://"
                ));
            }
        }
        Ok(())
    }

    pub(super) fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retry_max: self.retry_max,
            deadline: self.retry_deadline,
            attempt_timeout: self.attempt_timeout,
            ..RetryPolicy::default()
        }
    }

    /// The `object_store` client for `bucket` with these settings: its own
    /// retries off, credentials from the environment or else the selected
    /// AWS profile, and the addressing style the endpoint calls for.
    pub(super) fn client_builder(&self, bucket: &str) -> AmazonS3Builder {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            // Every attempt is one request: floe retries, counts and bounds.
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: self.attempt_timeout,
                ..RetryConfig::default()
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", self.attempt_timeout.as_millis()),
            )
            // One DELETE per object: `delete` deletes one key, and not every
            // S3-compatible store implements DeleteObjects.
            .with_disable_bulk_delete(true);
        // The environment's keys win; otherwise the selected profile's, as
        // the AWS SDKs order their chain (object_store reads no profiles).
        if b.get_config_value(&AmazonS3ConfigKey::AccessKeyId)
            .is_none()
        {
            if let Some(p) = crate::aws_profile::from_env() {
                match (&p.access_key_id, &p.secret_access_key) {
                    (Some(id), Some(secret)) => {
                        b = b.with_access_key_id(id).with_secret_access_key(secret);
                        if let Some(t) = &p.session_token {
                            b = b.with_token(t);
                        }
                        tracing::info!(profile = %p.name, "S3 credentials from the AWS shared credentials file");
                    }
                    _ => {
                        if let Some(how) = &p.indirect {
                            tracing::warn!(profile = %p.name, "AWS profile gets its credentials through {how}, which floe does not follow; trying web identity, container and instance credentials");
                        }
                    }
                }
                if let Some(r) = &p.region {
                    if b.get_config_value(&AmazonS3ConfigKey::Region).is_none() {
                        b = b.with_region(r);
                    }
                }
            }
        }
        if let Some(region) = &self.region {
            b = b.with_region(region);
        }
        if let Some(endpoint) = &self.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        } else if !self.express
            && b.get_config_value(&AmazonS3ConfigKey::Endpoint).is_none()
            && b.get_config_value(&AmazonS3ConfigKey::S3Endpoint).is_none()
            && !bucket.contains('.')
        {
            // AWS proper: virtual-hosted style, which AWS recommends (a
            // dotted name would not match the TLS certificate).
            b = b.with_virtual_hosted_style_request(true);
        }
        if self.express {
            b = b.with_s3_express(true);
        }
        b
    }
}

/// Splits `s3://BUCKET[/PREFIX]` into the bucket and a key prefix that is
/// empty or ends with `/`.
pub fn parse_url(url: &str) -> Result<(String, String)> {
    let bad = |why: &str| Error::Config {
        reason: format!("object store URL {url:?}: {why} (expected s3://BUCKET[/PREFIX])"),
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() || bucket.contains(['?', '#', ' ']) {
        return Err(bad("no valid bucket name"));
    }
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        return Ok((bucket.to_string(), String::new()));
    }
    validate_key(prefix).map_err(|_| bad("invalid prefix"))?;
    Ok((bucket.to_string(), format!("{prefix}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_options() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(
            parse_url("s3://b/floe/x/").unwrap(),
            ("b".into(), "floe/x/".into())
        );
        for bad in ["s3://", "file:///x", "s3://b/a/../c", "s3:///x"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert!(S3Options::default().validate().is_ok());
        let small = S3Options {
            part_bytes: 1 << 20,
            ..Default::default()
        };
        assert!(matches!(small.validate(), Err(Error::Config { .. })));
    }
}
