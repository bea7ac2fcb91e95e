//! The S3 client against an in-process server that answers from a script:
//! retries, error classification, hedged reads and multipart aborts, each
//! request counted.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
};
use object_store::ClientOptions;

use super::*;
use crate::{Error, ObjectStore, Purpose};

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
        &format!(
            "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>scripted</Message></Error>"
        ),
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
