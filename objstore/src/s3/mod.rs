//! The S3 backend (AWS S3, S3 Express One Zone, and S3-compatible servers),
//! built on the `object_store` crate's S3 client with floe's own retry
//! loop, multipart policy, hedged reads and request accounting.
//!
//! `object_store`'s internal retries are switched off so that every attempt
//! is exactly one wire request that floe counts, bounds and classifies.
//!
//! This module holds the [`S3`] client and its [`ObjectStore`]
//! implementation; beside it are the settings and the `object_store`
//! client built from them (`options`), multipart uploads (`multipart`),
//! ListMultipartUploads (`list_uploads`), and how failures become the
//! port's errors (`errors`).

mod errors;
mod list_uploads;
mod multipart;
mod options;

use std::future::Future;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{select, Either};
use object_store::aws::{AmazonS3, AmazonS3ConfigKey};
use object_store::client::HttpConnector;
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, GetResult, ObjectStore as _, ObjectStoreExt as _, PutOptions, PutPayload,
};

pub use list_uploads::OpenUpload;
pub use multipart::{PARTS_MAX, PART_BYTES_MAX, PART_BYTES_MIN, PART_CONCURRENCY_MAX};
pub use options::{parse_url, S3Options, RETRY_MAX_LIMIT};

use crate::retry::RetryPolicy;
use crate::{
    check_body_len, validate_key, Accounting, Error, ObjectMeta, ObjectStore, Purpose,
    RequestCounters, Result,
};

/// Most ListObjectsV2 pages (1,000 keys each) read by one `list`.
pub const LIST_PAGES_MAX: usize = 100_000;

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
    /// Hedges this client may still send, in thousandths (see
    /// [`HEDGE_BURST`]).
    hedge_budget: AtomicU64,
}

/// Hedges a client may send in a burst; every read earns
/// [`HEDGE_PER_READ_MILLI`] thousandths of one more. Hedging is for the
/// slow few: when a loaded store starts every response late, unbounded
/// hedging doubles its load (moto on two cores hedged half its catch-up
/// reads); with the budget at most about 5 % of reads are sent twice.
pub const HEDGE_BURST: u64 = 10;
const HEDGE_PER_READ_MILLI: u64 = 50;

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
        let mut b = opts.client_builder(&bucket);
        if let Some(c) = connector {
            b = b.with_http_connector(c);
        }
        let region = b
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".to_string());
        let http = list_uploads::http_client(opts)?;
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
            hedge_budget: AtomicU64::new(HEDGE_BURST * 1000),
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

    /// Sends one ranged GET and waits for its response to begin (status
    /// and headers); the range it answers must be the one asked.
    async fn get_range_start(
        &self,
        c: &RequestCounters,
        key: &str,
        path: &Path,
        range: Range<u64>,
    ) -> Result<GetResult> {
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
        Ok(r)
    }

    /// Reads a ranged GET's body, which must be exactly the range.
    async fn get_range_body(
        &self,
        c: &RequestCounters,
        key: &str,
        range: Range<u64>,
        r: GetResult,
    ) -> Result<Bytes> {
        let body = r
            .bytes()
            .await
            .map_err(|e| self.map_err("get_range", key, e))?;
        check_body_len("get_range", key, range.end - range.start, &body)?;
        RequestCounters::add(&c.get_bytes, body.len() as u64);
        Ok(body)
    }

    /// Runs `start()`; if it has not finished after `hedge_after`, runs a
    /// second `start()` (when the hedge budget allows) and takes the first
    /// success. Reads race only until their response begins: a large read
    /// whose body takes longer than `hedge_after` to arrive is not slow,
    /// and hedging it doubled every catch-up GET of 16 MiB.
    async fn hedged<T, F, Fut>(&self, c: &RequestCounters, mut start: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let Some(after) = self.opts.hedge_after else {
            return start().await;
        };
        let _ = self.hedge_budget.fetch_update(Relaxed, Relaxed, |b| {
            Some((b + HEDGE_PER_READ_MILLI).min(HEDGE_BURST * 1000))
        });
        let first = std::pin::pin!(start());
        let delay = std::pin::pin!(tokio::time::sleep(after));
        let first = match select(first, delay).await {
            Either::Left((r, _)) => return r,
            Either::Right(((), first)) => first,
        };
        let spent = self
            .hedge_budget
            .fetch_update(Relaxed, Relaxed, |b| b.checked_sub(1000));
        if spent.is_err() {
            return first.await;
        }
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
            .run(c, "get_range", key, || async {
                let r = self
                    .hedged(c, || self.get_range_start(c, key, &path, range.clone()))
                    .await?;
                self.get_range_body(c, key, range.clone(), r).await
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

#[cfg(test)]
mod tests;
