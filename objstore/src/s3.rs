//! The S3 backend (AWS S3, S3 Express One Zone, and S3-compatible servers),
//! built on the `object_store` crate's S3 client with floe's own retry
//! loop, multipart policy, hedged reads and request accounting.
//!
//! `object_store`'s internal retries are switched off so that every attempt
//! is exactly one wire request that floe counts, bounds and classifies.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::client::{HttpConnector, HttpError, HttpErrorKind};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    ClientConfigKey, GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _, PutOptions,
    PutPayload, RetryConfig,
};

use crate::retry::RetryPolicy;
use crate::{
    check_body_len, validate_key, Accounting, Error, ObjectMeta, ObjectStore, Purpose,
    RequestCounters, Result,
};

/// S3's smallest part (all but the last part of an upload).
pub const PART_BYTES_MIN: usize = 5 << 20;
/// S3's largest part.
pub const PART_BYTES_MAX: usize = 5 << 30;
/// S3's most parts in one upload.
pub const PARTS_MAX: usize = 10_000;
/// Most parts of one upload in flight at once.
pub const PART_CONCURRENCY_MAX: usize = 64;
/// Most retries of one request that a configuration may ask for.
pub const RETRY_MAX_LIMIT: u32 = 100;
/// Most ListObjectsV2 pages (1,000 keys each) read by one `list`.
pub const LIST_PAGES_MAX: usize = 100_000;
const _: () = assert!(PART_BYTES_MIN <= PART_BYTES_MAX);

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
    /// than [`PARTS_MAX`] parts).
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

    fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retry_max: self.retry_max,
            deadline: self.retry_deadline,
            attempt_timeout: self.attempt_timeout,
            ..RetryPolicy::default()
        }
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

/// The S3 backend. Shared by all shards (`Send + Sync`); runs on the
/// sidecar's tokio runtime.
#[derive(Debug)]
pub struct S3 {
    store: AmazonS3,
    bucket: String,
    /// Empty, or the URL's prefix with a trailing `/`.
    prefix: String,
    opts: S3Options,
    retry: RetryPolicy,
    accounting: Arc<Accounting>,
    /// For the one request `object_store` 0.14 does not offer:
    /// ListMultipartUploads (see [`S3::list_uploads`]).
    http: object_store::client::HttpClient,
    region: String,
}

impl S3 {
    /// Opens `s3://BUCKET[/PREFIX]` with credentials from the standard AWS
    /// chain (environment, the shared files' profile, web identity, ECS/EKS
    /// container credentials, instance metadata). Sends nothing yet.
    pub fn open(url: &str, opts: &S3Options) -> Result<Self> {
        Self::build(url, opts, None::<object_store::client::ReqwestConnector>)
    }

    /// As [`S3::open`], with HTTP sent through `connector` (tests use it to
    /// inject faults below the S3 client).
    pub fn open_with_connector(
        url: &str,
        opts: &S3Options,
        connector: impl HttpConnector,
    ) -> Result<Self> {
        Self::build(url, opts, Some(connector))
    }

    fn build(url: &str, opts: &S3Options, connector: Option<impl HttpConnector>) -> Result<Self> {
        opts.validate()?;
        let (bucket, prefix) = parse_url(url)?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&bucket)
            // Every attempt is one request: floe retries, counts and bounds.
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: opts.attempt_timeout,
                ..RetryConfig::default()
            })
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                format!("{}ms", opts.attempt_timeout.as_millis()),
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
        if let Some(region) = &opts.region {
            b = b.with_region(region);
        }
        if let Some(endpoint) = &opts.endpoint {
            b = b
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        } else if !opts.express
            && b.get_config_value(&AmazonS3ConfigKey::Endpoint).is_none()
            && b.get_config_value(&AmazonS3ConfigKey::S3Endpoint).is_none()
            && !bucket.contains('.')
        {
            // AWS proper: virtual-hosted style, which AWS recommends (a
            // dotted name would not match the TLS certificate).
            b = b.with_virtual_hosted_style_request(true);
        }
        if opts.express {
            b = b.with_s3_express(true);
        }
        if let Some(c) = connector {
            b = b.with_http_connector(c);
        }
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let http = object_store::client::ReqwestConnector::default()
            .connect(
                &object_store::ClientOptions::new()
                    .with_allow_http(true)
                    .with_timeout(opts.attempt_timeout),
            )
            .map_err(|e| Error::Config {
                reason: format!("S3 HTTP client: {e}"),
            })?;
        let store = b.build().map_err(|e| Error::Config {
            reason: format!("S3 bucket {bucket:?}: {e}"),
        })?;
        Ok(Self {
            store,
            bucket,
            prefix,
            opts: opts.clone(),
            retry: opts.retry_policy(),
            accounting: Arc::new(Accounting::default()),
            http,
            region,
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The backend's own request counters.
    pub fn requests(&self) -> &Arc<Accounting> {
        &self.accounting
    }

    fn path(&self, key: &str) -> Result<Path> {
        validate_key(key)?;
        Path::parse(format!("{}{key}", self.prefix)).map_err(|_| Error::InvalidKey {
            key: key.to_string(),
        })
    }

    /// Starts a multipart upload of `key` and aborts it: proves the
    /// credentials may CreateMultipartUpload and AbortMultipartUpload
    /// (`floe check-bucket`). Leaves nothing behind when both succeed.
    pub async fn probe_multipart(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Cleanup);
        let id = self.create_multipart(c, key, &path).await?;
        self.abort_multipart(c, key, &path, &id).await
    }

    /// Maps an `object_store` error to the port's meaning. Statuses are
    /// read from the error's text: `object_store` 0.14 keeps its
    /// `RetryError` type private.
    fn map_err(&self, op: &'static str, key: &str, e: object_store::Error) -> Error {
        use object_store::Error as O;
        let key = key.to_string();
        let text = error_chain(&e);
        if text.contains("<Code>NoSuchBucket</Code>") {
            return Error::BucketNotFound {
                bucket: self.bucket.clone(),
            };
        }
        match e {
            O::NotFound { .. } => Error::NotFound { key },
            O::Precondition { .. } | O::AlreadyExists { .. } | O::NotModified { .. } => {
                Error::Precondition {
                    op,
                    key,
                    reason: text,
                }
            }
            O::PermissionDenied { .. } | O::Unauthenticated { .. } => Error::PermissionDenied {
                op,
                key,
                reason: text,
            },
            O::InvalidPath { .. } => Error::InvalidKey { key },
            O::NotSupported { .. }
            | O::NotImplemented { .. }
            | O::UnknownConfigurationKey { .. } => Error::Config { reason: text },
            other => classify(op, key, &other, text, self.opts.attempt_timeout),
        }
    }

    async fn create_multipart(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
    ) -> Result<String> {
        self.retry
            .run(c, "create_multipart", key, || async {
                RequestCounters::bump(&c.multipart_creates);
                self.store
                    .create_multipart(path)
                    .await
                    .map_err(|e| self.map_err("create_multipart", key, e))
            })
            .await
    }

    async fn abort_multipart(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
        id: &String,
    ) -> Result<()> {
        self.retry
            .run(c, "abort_multipart", key, || async {
                RequestCounters::bump(&c.multipart_aborts);
                self.store
                    .abort_multipart(path, id)
                    .await
                    .map_err(|e| self.map_err("abort_multipart", key, e))
            })
            .await
    }

    /// One PutObject of all parts as one payload (the parts are not joined).
    async fn put_single(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
        parts: Vec<Bytes>,
    ) -> Result<()> {
        let payload = PutPayload::from_iter(parts);
        let size = payload.content_length() as u64;
        self.retry
            .run(c, "put", key, || {
                let payload = payload.clone();
                async move {
                    RequestCounters::bump(&c.puts);
                    self.store
                        .put_opts(path, payload, PutOptions::default())
                        .await
                        .map_err(|e| self.map_err("put", key, e))?;
                    RequestCounters::add(&c.put_bytes, size);
                    Ok(())
                }
            })
            .await
    }

    /// A multipart upload: parts of `part_bytes` sliced (never copied) out
    /// of `parts`, at most `part_concurrency` in flight; aborted on failure.
    async fn put_multipart(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
        parts: Vec<Bytes>,
        size: usize,
    ) -> Result<()> {
        let part_bytes = self.opts.part_bytes.max(size.div_ceil(PARTS_MAX));
        let payloads = split_parts(parts, part_bytes);
        debug_assert!(payloads.len() <= PARTS_MAX);
        let id = self.create_multipart(c, key, path).await?;
        let uploaded: Result<Vec<PartId>> = futures::stream::iter(payloads.into_iter().enumerate())
            .map(|(idx, payload)| {
                let id = &id;
                async move {
                    self.retry
                        .run(c, "upload_part", key, || {
                            let payload = payload.clone();
                            async move {
                                RequestCounters::bump(&c.multipart_parts);
                                let n = payload.content_length() as u64;
                                let part = self
                                    .store
                                    .put_part(path, id, idx, payload)
                                    .await
                                    .map_err(|e| self.map_err("upload_part", key, e))?;
                                RequestCounters::add(&c.put_bytes, n);
                                Ok(part)
                            }
                        })
                        .await
                }
            })
            .buffered(self.opts.part_concurrency)
            .try_collect()
            .await;
        let completed = match uploaded {
            Ok(ids) => {
                self.retry
                    .run(c, "complete_multipart", key, || {
                        let ids = ids.clone();
                        async {
                            RequestCounters::bump(&c.multipart_completes);
                            self.store
                                .complete_multipart(path, &id, ids)
                                .await
                                .map(|_| ())
                                .map_err(|e| self.map_err("complete_multipart", key, e))
                        }
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = completed {
            // Parts still in flight were dropped with the stream; abort
            // discards what the store already holds. If the abort fails too,
            // the upload is left for lifecycle cleanup of stale uploads.
            if let Err(abort) = self.abort_multipart(c, key, path, &id).await {
                tracing::warn!(key, upload_id = %id, "aborting a failed multipart upload failed: {abort}");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn head_size(&self, c: &RequestCounters, key: &str, path: &Path) -> Result<u64> {
        self.retry
            .run(c, "head", key, || async {
                RequestCounters::bump(&c.heads);
                let meta = self
                    .store
                    .head(path)
                    .await
                    .map_err(|e| self.map_err("head", key, e))?;
                Ok(meta.size)
            })
            .await
    }

    /// One ranged GET; the body must be exactly the range.
    async fn get_range_once(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
        range: Range<u64>,
    ) -> Result<Bytes> {
        RequestCounters::bump(&c.gets);
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let r = self
            .store
            .get_opts(path, options)
            .await
            .map_err(|e| self.map_err("get_range", key, e))?;
        if r.range != range {
            // The store clamps a range reaching past the end.
            return Err(Error::RangeOutOfBounds {
                key: key.to_string(),
                range,
                size: r.meta.size,
            });
        }
        let body = r
            .bytes()
            .await
            .map_err(|e| self.map_err("get_range", key, e))?;
        check_body_len("get_range", key, range.end - range.start, &body)?;
        RequestCounters::add(&c.get_bytes, body.len() as u64);
        Ok(body)
    }

    /// Runs `start()`; if it has not finished after `hedge_after`, runs a
    /// second `start()` and takes the first success.
    async fn hedged<F, Fut>(&self, c: &RequestCounters, mut start: F) -> Result<Bytes>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        let Some(after) = self.opts.hedge_after else {
            return start().await;
        };
        let first = std::pin::pin!(start());
        let delay = std::pin::pin!(tokio::time::sleep(after));
        let first = match select(first, delay).await {
            Either::Left((r, _)) => return r,
            Either::Right(((), first)) => first,
        };
        RequestCounters::bump(&c.hedges);
        let second = std::pin::pin!(start());
        match select(first, second).await {
            Either::Left((Ok(b), _)) => Ok(b),
            Either::Left((Err(e), second)) => {
                tracing::debug!("hedged read: first request failed ({e}); waiting for the second");
                let r = second.await;
                if r.is_ok() {
                    RequestCounters::bump(&c.hedge_wins);
                }
                r
            }
            Either::Right((Ok(b), _)) => {
                RequestCounters::bump(&c.hedge_wins);
                Ok(b)
            }
            Either::Right((Err(e), first)) => {
                tracing::debug!("hedged read: second request failed ({e}); waiting for the first");
                first.await
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectStore for S3 {
    async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Intake);
        let size: usize = parts.iter().map(Bytes::len).sum();
        if size > self.opts.multipart_threshold_bytes {
            self.put_multipart(c, key, &path, parts, size).await
        } else {
            self.put_single(c, key, &path, parts).await
        }
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Fetch);
        let out_of_bounds = |size| Error::RangeOutOfBounds {
            key: key.to_string(),
            range: range.clone(),
            size,
        };
        if range.start >= range.end {
            // S3 cannot express an empty range; its answer is the object's size.
            let size = self.head_size(c, key, &path).await?;
            if range.start > range.end || range.end > size {
                return Err(out_of_bounds(size));
            }
            return Ok(Bytes::new());
        }
        let r = self
            .retry
            .run(c, "get_range", key, || {
                self.hedged(c, || self.get_range_once(c, key, &path, range.clone()))
            })
            .await;
        match r {
            // 416: the range starts at or past the end.
            Err(Error::Rejected { status: 416, .. }) => {
                Err(out_of_bounds(self.head_size(c, key, &path).await?))
            }
            r => r,
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Fetch);
        self.retry
            .run(c, "get", key, || async {
                RequestCounters::bump(&c.gets);
                let r = self
                    .store
                    .get_opts(&path, GetOptions::default())
                    .await
                    .map_err(|e| self.map_err("get", key, e))?;
                let size = r.meta.size;
                let body = r.bytes().await.map_err(|e| self.map_err("get", key, e))?;
                check_body_len("get", key, size, &body)?;
                RequestCounters::add(&c.get_bytes, body.len() as u64);
                Ok(body)
            })
            .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Cleanup);
        self.retry
            .run(c, "delete", key, || async {
                RequestCounters::bump(&c.deletes);
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.map_err("delete", key, e)),
                }
            })
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let c = self.accounting.current(Purpose::Cleanup);
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..LIST_PAGES_MAX {
            let page = self
                .retry
                .run(c, "list", prefix, || {
                    let options = PaginatedListOptions {
                        page_token: token.clone(),
                        ..PaginatedListOptions::default()
                    };
                    let full = (!full.is_empty()).then_some(full.as_str());
                    async move {
                        RequestCounters::bump(&c.lists);
                        self.store
                            .list_paginated(full, options)
                            .await
                            .map_err(|e| self.map_err("list", prefix, e))
                    }
                })
                .await?;
            out.extend(page.result.objects.into_iter().filter_map(|m| {
                let key = m.location.as_ref().strip_prefix(&self.prefix)?;
                Some(ObjectMeta {
                    key: key.to_string(),
                    size: m.size,
                    last_modified: std::time::SystemTime::from(m.last_modified),
                })
            }));
            match page.page_token {
                Some(t) => token = Some(t),
                None => {
                    out.sort_by(|a, b| a.key.cmp(&b.key));
                    return Ok(out);
                }
            }
        }
        Err(Error::Rejected {
            op: "list",
            key: prefix.to_string(),
            status: 0,
            reason: format!("more than {LIST_PAGES_MAX} pages of keys"),
        })
    }

    fn describe(&self) -> String {
        let mut d = format!("s3://{}/{}", self.bucket, self.prefix);
        if let Some(e) = &self.opts.endpoint {
            d.push_str(&format!(" at {e}"));
        }
        if self.opts.express {
            d.push_str(" (S3 Express One Zone)");
        }
        d
    }

    fn accounting(&self) -> Option<Arc<Accounting>> {
        Some(self.accounting.clone())
    }

    async fn abort_stale_uploads(&self, older_than: Duration) -> Result<usize> {
        let c = self.accounting.current(Purpose::Cleanup);
        let now = std::time::SystemTime::now();
        let mut aborted = 0;
        for u in self.list_uploads(c).await? {
            if u.initiated + older_than > now {
                continue;
            }
            let Ok(path) = Path::parse(&u.key) else {
                continue;
            };
            self.abort_multipart(c, &u.key, &path, &u.upload_id).await?;
            aborted += 1;
        }
        Ok(aborted)
    }
}

/// One multipart upload in progress, as ListMultipartUploads names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenUpload {
    /// The whole key, prefix included.
    pub key: String,
    pub upload_id: String,
    pub initiated: std::time::SystemTime,
}

/// Pages of ListMultipartUploads read at most (1,000 uploads each).
const UPLOAD_LIST_PAGES_MAX: usize = 100;

impl S3 {
    /// Lists the multipart uploads in progress under the prefix.
    /// `object_store` 0.14 has no ListMultipartUploads, so this one request
    /// is built here and signed with the crate's own SigV4
    /// ([`object_store::aws::AwsAuthorizer`]) and credential chain. Not for
    /// S3 Express directory buckets (their session auth is not exposed).
    pub async fn list_uploads(&self, c: &RequestCounters) -> Result<Vec<OpenUpload>> {
        if self.opts.express {
            return Err(Error::Config {
                reason:
                    "listing multipart uploads of S3 Express directory buckets is not supported"
                        .into(),
            });
        }
        let base = match &self.opts.endpoint {
            Some(e) => format!("{}/{}", e.trim_end_matches('/'), self.bucket),
            None => format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
        };
        let mut out = Vec::new();
        let mut marker: Option<(String, String)> = None;
        for _ in 0..UPLOAD_LIST_PAGES_MAX {
            let mut url = format!("{base}/?uploads&prefix={}", query_escape(&self.prefix));
            if let Some((k, id)) = &marker {
                url.push_str(&format!(
                    "&key-marker={}&upload-id-marker={}",
                    query_escape(k),
                    query_escape(id)
                ));
            }
            let body = self
                .retry
                .run(c, "list_uploads", &self.prefix, || async {
                    RequestCounters::bump(&c.lists);
                    self.signed_get(&url).await
                })
                .await?;
            let page = parse_uploads(&body);
            out.extend(page.uploads);
            match page.next {
                Some(next) => marker = Some(next),
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    async fn signed_get(&self, url: &str) -> Result<String> {
        let io = |e: String| Error::Io {
            op: "list_uploads",
            key: self.prefix.clone(),
            source: std::io::Error::other(e),
        };
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| io(e.to_string()))?;
        let mut req =
            object_store::client::HttpRequest::new(object_store::client::HttpRequestBody::empty());
        *req.uri_mut() = url.parse().map_err(|e| io(format!("{url}: {e}")))?;
        object_store::aws::AwsAuthorizer::new(&credential, "s3", &self.region)
            .try_authorize(&mut req, None)
            .map_err(|e| io(e.to_string()))?;
        let resp = self
            .http
            .execute(req)
            .await
            .map_err(|e| io(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .bytes()
            .await
            .map_err(|e| io(e.to_string()))?;
        let text = String::from_utf8_lossy(&body).into_owned();
        if status.as_u16() == 403 {
            return Err(Error::PermissionDenied {
                op: "list_uploads",
                key: self.prefix.clone(),
                reason: text,
            });
        }
        if !status.is_success() {
            return Err(io(format!("HTTP {status}: {text}")));
        }
        Ok(text)
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

struct UploadsPage {
    uploads: Vec<OpenUpload>,
    /// (NextKeyMarker, NextUploadIdMarker) when the listing is truncated.
    next: Option<(String, String)>,
}

/// The text of the first `<tag>…</tag>` in `xml`, entities decoded.
fn xml_field(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&format!("</{tag}>"))?;
    Some(
        xml[start..end]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// Reads a ListMultipartUploadsResult. An upload whose fields do not parse
/// is skipped (never aborted on a misreading).
fn parse_uploads(xml: &str) -> UploadsPage {
    let mut uploads = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<Upload>") {
        let Some(j) = rest[i..].find("</Upload>") else {
            break;
        };
        let item = &rest[i..i + j];
        if let (Some(key), Some(upload_id), Some(initiated)) = (
            xml_field(item, "Key"),
            xml_field(item, "UploadId"),
            xml_field(item, "Initiated").and_then(|t| parse_rfc3339(&t)),
        ) {
            uploads.push(OpenUpload {
                key,
                upload_id,
                initiated,
            });
        }
        rest = &rest[i + j..];
    }
    let truncated = xml_field(xml, "IsTruncated").is_some_and(|t| t == "true");
    let next = match (
        truncated,
        xml_field(xml, "NextKeyMarker"),
        xml_field(xml, "NextUploadIdMarker"),
    ) {
        (true, Some(k), Some(id)) if !k.is_empty() => Some((k, id)),
        _ => None,
    };
    UploadsPage { uploads, next }
}

/// `2026-11-22T07:45:00.000Z` (S3's timestamps: UTC, optional fraction).
fn parse_rfc3339(t: &str) -> Option<std::time::SystemTime> {
    let t = t.trim().strip_suffix('Z')?;
    let (date, time) = t.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut h = time.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

#[cfg(test)]
mod upload_listing_tests {
    use super::*;

    #[test]
    fn parses_a_list_multipart_uploads_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult><Bucket>b</Bucket><IsTruncated>true</IsTruncated>
<NextKeyMarker>floe/segments/2</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
<Upload><Key>floe/segments/1</Key><UploadId>id1</UploadId><Initiated>1970-01-02T00:00:01.000Z</Initiated></Upload>
<Upload><Key>floe/a&amp;b</Key><UploadId>id2</UploadId><Initiated>2026-11-22T07:45:00Z</Initiated></Upload>
<Upload><Key>floe/bad</Key><UploadId>id3</UploadId><Initiated>yesterday</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads(xml);
        assert_eq!(
            page.uploads.len(),
            2,
            "an unreadable date is skipped, not aborted"
        );
        assert_eq!(page.uploads[0].key, "floe/segments/1");
        assert_eq!(page.uploads[0].upload_id, "id1");
        assert_eq!(
            page.uploads[0].initiated,
            std::time::UNIX_EPOCH + Duration::from_secs(86_401)
        );
        assert_eq!(page.uploads[1].key, "floe/a&b");
        assert_eq!(
            page.uploads[1]
                .initiated
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .ok(),
            Some(1_795_333_500)
        );
        assert_eq!(page.next, Some(("floe/segments/2".into(), "id2".into())));
        let last = parse_uploads("<IsTruncated>false</IsTruncated>");
        assert!(last.uploads.is_empty() && last.next.is_none());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_escape("floe/x y"), "floe%2Fx%20y");
    }
}

/// Groups `parts` into payloads of exactly `part_bytes` (the last may be
/// shorter) by slicing the `Bytes`: no payload byte is copied.
pub(crate) fn split_parts(parts: Vec<Bytes>, part_bytes: usize) -> Vec<PutPayload> {
    assert!(part_bytes > 0);
    let mut out = Vec::new();
    let mut group: Vec<Bytes> = Vec::new();
    let mut group_len = 0;
    for mut p in parts {
        while !p.is_empty() {
            let take = (part_bytes - group_len).min(p.len());
            group.push(p.split_to(take));
            group_len += take;
            if group_len == part_bytes {
                out.push(PutPayload::from_iter(std::mem::take(&mut group)));
                group_len = 0;
            }
        }
    }
    if group_len > 0 {
        out.push(PutPayload::from_iter(group));
    }
    out
}

/// The error and all its sources, as one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The HTTP status in `object_store`'s message for a non-2xx answer
/// ("Server returned non-2xx status code: 503 Service Unavailable: …").
fn status_in(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// S3 error codes that mean "slow down".
const THROTTLE_CODES: [&str; 5] = [
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
];

/// Classifies a failure that is not one of `object_store`'s named kinds.
fn classify(
    op: &'static str,
    key: String,
    e: &object_store::Error,
    text: String,
    attempt_timeout: Duration,
) -> Error {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return match h.kind() {
                HttpErrorKind::Timeout => Error::Timeout {
                    op,
                    key,
                    after: attempt_timeout,
                },
                _ => Error::Io {
                    op,
                    key,
                    source: std::io::Error::other(text),
                },
            };
        }
        source = s.source();
    }
    let status = status_in(&text);
    if matches!(status, Some(429 | 503)) || THROTTLE_CODES.iter().any(|c| text.contains(c)) {
        return Error::Throttled {
            op,
            key,
            reason: text,
        };
    }
    match status {
        Some(s @ 400..=499) if !text.contains("RequestTimeout") => Error::Rejected {
            op,
            key,
            status: s,
            reason: text,
        },
        // 5xx, S3's RequestTimeout (400), an InternalError inside a 200, a
        // body that failed to decode: the next attempt may succeed.
        _ => Error::Io {
            op,
            key,
            source: std::io::Error::other(text),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Mutex;

    use object_store::client::{
        HttpClient, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
    };
    use object_store::ClientOptions;

    use super::*;

    /// What the scripted server saw: method and path?query.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// A response the scripted server gives: status, headers, body, delay.
    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Bytes,
        delay: Duration,
    }

    fn reply(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: Bytes::from(body.to_string()),
            delay: Duration::ZERO,
        }
    }

    fn s3_error(status: u16, code: &str) -> Reply {
        reply(
            status,
            &format!("<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>scripted</Message></Error>"),
        )
    }

    /// An in-process "S3" answering from a script, in order; what runs out
    /// of script answers 500.
    #[derive(Debug, Clone)]
    struct Scripted {
        replies: Arc<Mutex<VecDeque<Reply>>>,
        seen: Seen,
    }

    impl Scripted {
        fn new(replies: Vec<Reply>) -> Self {
            Self {
                replies: Arc::new(Mutex::new(replies.into())),
                seen: Arc::default(),
            }
        }
        fn seen(&self) -> Vec<String> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl HttpConnector for Scripted {
        fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
            Ok(HttpClient::new(self.clone()))
        }
    }

    #[async_trait::async_trait]
    impl HttpService for Scripted {
        async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
            let uri = req.uri();
            let what = format!(
                "{} {}{}",
                req.method(),
                uri.path(),
                uri.query().map(|q| format!("?{q}")).unwrap_or_default()
            );
            self.seen.lock().unwrap().push(what);
            let next = self.replies.lock().unwrap().pop_front();
            let r = next.unwrap_or_else(|| s3_error(500, "InternalError"));
            if !r.delay.is_zero() {
                tokio::time::sleep(r.delay).await;
            }
            let mut b = http::Response::builder().status(r.status);
            for (k, v) in r.headers {
                b = b.header(k, v);
            }
            Ok(b.body(HttpResponseBody::from(r.body)).unwrap())
        }
    }

    fn opts() -> S3Options {
        S3Options {
            endpoint: Some("http://s3.test".into()),
            region: Some("us-east-1".into()),
            ..Default::default()
        }
    }

    fn store(script: &Scripted, opts: S3Options) -> S3 {
        // Static keys so that no credential provider is consulted. Set once,
        // before any test thread reads the environment.
        static KEYS: std::sync::Once = std::sync::Once::new();
        KEYS.call_once(|| {
            std::env::set_var("AWS_ACCESS_KEY_ID", "test");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
        });
        S3::open_with_connector("s3://bkt/pre", &opts, script.clone()).unwrap()
    }

    fn ok_put() -> Reply {
        Reply {
            headers: vec![("ETag", "\"e\"".into())],
            ..reply(200, "")
        }
    }

    fn range_reply(body: &[u8], start: u64, total: u64, delay: Duration) -> Reply {
        let end = start + body.len() as u64 - 1;
        Reply {
            status: 206,
            headers: vec![
                ("Content-Range", format!("bytes {start}-{end}/{total}")),
                ("Content-Length", body.len().to_string()),
                ("ETag", "\"e\"".into()),
                ("Last-Modified", "Tue, 01 Dec 2026 00:00:00 GMT".into()),
            ],
            body: Bytes::copy_from_slice(body),
            delay,
        }
    }

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

    #[test]
    fn parts_are_slices_not_copies() {
        let a = Bytes::from(vec![1u8; 10]);
        let b = Bytes::from(vec![2u8; 7]);
        let groups = split_parts(vec![a.clone(), b.clone()], 4);
        let sizes: Vec<usize> = groups.iter().map(|p| p.content_length()).collect();
        assert_eq!(sizes, [4, 4, 4, 4, 1]);
        // Every slice points into one of the original buffers.
        let within = |s: &Bytes, o: &Bytes| {
            let (p, q) = (s.as_ptr() as usize, o.as_ptr() as usize);
            p >= q && p + s.len() <= q + o.len()
        };
        for g in &groups {
            for s in g.iter() {
                assert!(within(s, &a) || within(s, &b));
            }
        }
        let joined: Vec<u8> = groups
            .iter()
            .flat_map(|g| g.iter())
            .flat_map(|s| s.to_vec())
            .collect();
        assert_eq!(joined, [&a[..], &b[..]].concat());
    }

    #[tokio::test]
    async fn throttled_put_is_retried_and_counted() {
        let script = Scripted::new(vec![s3_error(503, "SlowDown"), ok_put()]);
        let s3 = store(&script, opts());
        s3.put("k", vec![Bytes::from_static(b"abc")]).await.unwrap();
        let c = s3.requests().of(Purpose::Intake);
        assert_eq!(c.puts.load(Relaxed), 2);
        assert_eq!(c.retries.load(Relaxed), 1);
        assert_eq!(c.throttled.load(Relaxed), 1);
        assert_eq!(c.put_bytes.load(Relaxed), 3);
        assert_eq!(script.seen(), ["PUT /bkt/pre/k", "PUT /bkt/pre/k"]);
    }

    #[tokio::test]
    async fn denied_and_missing_bucket_are_not_retried() {
        let script = Scripted::new(vec![
            s3_error(403, "AccessDenied"),
            s3_error(404, "NoSuchBucket"),
            s3_error(400, "InvalidArgument"),
        ]);
        let s3 = store(&script, opts());
        let e = s3.put("k", vec![]).await.unwrap_err();
        assert!(
            matches!(e, Error::PermissionDenied { op: "put", .. }),
            "{e}"
        );
        let e = s3.get("k").await.unwrap_err();
        assert!(matches!(e, Error::BucketNotFound { .. }), "{e}");
        let e = s3.delete("k").await.unwrap_err();
        assert!(matches!(e, Error::Rejected { status: 400, .. }), "{e}");
        assert_eq!(script.seen().len(), 3);
    }

    #[tokio::test]
    async fn server_errors_exhaust_the_bounded_retries() {
        let script = Scripted::new(vec![]);
        let s3 = store(
            &script,
            S3Options {
                retry_max: 3,
                ..opts()
            },
        );
        let e = s3.get("k").await.unwrap_err();
        let Error::RetriesExhausted {
            attempts, source, ..
        } = &e
        else {
            panic!("{e}");
        };
        assert_eq!(*attempts, 4);
        assert!(matches!(**source, Error::Io { .. }), "{source}");
        assert_eq!(script.seen().len(), 4);
        assert_eq!(s3.requests().of(Purpose::Fetch).retries.load(Relaxed), 3);
    }

    #[tokio::test]
    async fn slow_ranged_read_is_hedged() {
        let script = Scripted::new(vec![
            range_reply(b"slow", 2, 100, Duration::from_secs(600)),
            range_reply(b"fast", 2, 100, Duration::ZERO),
        ]);
        let s3 = store(
            &script,
            S3Options {
                hedge_after: Some(Duration::from_millis(20)),
                ..opts()
            },
        );
        let got = s3.get_range("k", 2..6).await.unwrap();
        assert_eq!(&got[..], b"fast");
        let c = s3.requests().of(Purpose::Fetch);
        assert_eq!(c.gets.load(Relaxed), 2);
        assert_eq!(c.hedges.load(Relaxed), 1);
        assert_eq!(c.hedge_wins.load(Relaxed), 1);
        assert_eq!(c.retries.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn short_body_is_an_error_not_short_data() {
        let mut short = range_reply(b"0123456789", 0, 100, Duration::ZERO);
        short.body = Bytes::from_static(b"01234");
        let script = Scripted::new(vec![short]);
        let s3 = store(
            &script,
            S3Options {
                retry_max: 0,
                hedge_after: None,
                ..opts()
            },
        );
        let e = s3.get_range("k", 0..10).await.unwrap_err();
        assert!(
            matches!(
                e.root(),
                Error::Truncated {
                    expected: 10,
                    got: 5,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn failed_multipart_upload_is_aborted() {
        let init = reply(
            200,
            "<InitiateMultipartUploadResult><Bucket>bkt</Bucket><Key>pre/big</Key><UploadId>U1</UploadId></InitiateMultipartUploadResult>",
        );
        let script = Scripted::new(vec![
            init,
            ok_put(),
            s3_error(400, "EntityTooSmall"),
            reply(204, ""),
        ]);
        let s3 = store(
            &script,
            S3Options {
                multipart_threshold_bytes: 1,
                part_bytes: PART_BYTES_MIN,
                part_concurrency: 1,
                ..opts()
            },
        );
        let part = Bytes::from(vec![7u8; PART_BYTES_MIN]);
        let e = s3
            .put("big", vec![part.clone(), part.slice(..10)])
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Rejected { status: 400, .. }), "{e}");
        let seen = script.seen();
        assert_eq!(seen[0], "POST /bkt/pre/big?uploads=");
        assert!(
            seen[1].starts_with("PUT /bkt/pre/big?partNumber=1&uploadId=U1"),
            "{seen:?}"
        );
        assert!(
            seen[2].starts_with("PUT /bkt/pre/big?partNumber=2&uploadId=U1"),
            "{seen:?}"
        );
        assert_eq!(seen[3], "DELETE /bkt/pre/big?uploadId=U1");
        let c = s3.requests().of(Purpose::Intake);
        assert_eq!(
            (
                c.multipart_creates.load(Relaxed),
                c.multipart_parts.load(Relaxed),
                c.multipart_completes.load(Relaxed),
                c.multipart_aborts.load(Relaxed)
            ),
            (1, 2, 0, 1)
        );
    }
}
