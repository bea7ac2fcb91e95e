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

/// A response the scripted server gives: status, headers, body, the delay
/// before its headers and the delay before its body.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Bytes,
    delay: Duration,
    body_delay: Duration,
}

/// A body whose bytes arrive `delay` after the headers.
struct LateBody {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    body: Option<Bytes>,
}

impl http_body::Body for LateBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, HttpError>>> {
        use std::task::Poll;
        match self.sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => Poll::Ready(self.body.take().map(|b| Ok(http_body::Frame::data(b)))),
        }
    }
}

fn reply(status: u16, body: &str) -> Reply {
    Reply {
        status,
        headers: vec![],
        body: Bytes::from(body.to_string()),
        delay: Duration::ZERO,
        body_delay: Duration::ZERO,
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
        let body = if r.body_delay.is_zero() {
            HttpResponseBody::from(r.body)
        } else {
            HttpResponseBody::new(LateBody {
                sleep: Box::pin(tokio::time::sleep(r.body_delay)),
                body: Some(r.body),
            })
        };
        Ok(b.body(body).unwrap())
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
        body_delay: Duration::ZERO,
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

/// One ranged read of bytes 2..6 with a 20 ms hedge delay, answered by
/// `replies`: what it returned, and its GETs, hedges and hedge wins.
async fn one_hedged_read(replies: Vec<Reply>) -> (Bytes, [u64; 3]) {
    let script = Scripted::new(replies);
    let s3 = store(
        &script,
        S3Options {
            hedge_after: Some(Duration::from_millis(20)),
            ..opts()
        },
    );
    let got = s3.get_range("k", 2..6).await.unwrap();
    let c = s3.requests().of(Purpose::Fetch);
    assert_eq!(c.retries.load(Relaxed), 0);
    assert_eq!(script.seen().len() as u64, c.gets.load(Relaxed));
    let counts = [&c.gets, &c.hedges, &c.hedge_wins].map(|n| n.load(Relaxed));
    (got, counts)
}

#[tokio::test]
async fn slow_ranged_read_is_hedged() {
    let (got, [gets, hedges, wins]) = one_hedged_read(vec![
        range_reply(b"slow", 2, 100, Duration::from_secs(600)),
        range_reply(b"fast", 2, 100, Duration::ZERO),
    ])
    .await;
    assert_eq!(&got[..], b"fast");
    assert_eq!((gets, hedges, wins), (2, 1, 1));
}

#[tokio::test]
async fn read_whose_body_is_slow_is_not_hedged() {
    // The response begins at once; its body takes ten hedge delays (a
    // large read). Hedging races only the wait for the response.
    let mut large = range_reply(b"body", 2, 100, Duration::ZERO);
    large.body_delay = Duration::from_millis(200);
    let (got, [gets, hedges, _]) =
        one_hedged_read(vec![large, range_reply(b"hedg", 2, 100, Duration::ZERO)]).await;
    assert_eq!(&got[..], b"body");
    assert_eq!((gets, hedges), (1, 0));
}

#[tokio::test]
async fn hedges_are_bounded_by_a_budget() {
    // Every response starts late (an overloaded store): after the burst,
    // one read in twenty may be hedged, not every one.
    let reads = 40u64;
    let script = Scripted::new(
        (0..2 * reads)
            .map(|_| range_reply(b"late", 2, 100, Duration::from_millis(15)))
            .collect(),
    );
    let s3 = store(
        &script,
        S3Options {
            hedge_after: Some(Duration::from_millis(1)),
            ..opts()
        },
    );
    for _ in 0..reads {
        assert_eq!(&s3.get_range("k", 2..6).await.unwrap()[..], b"late");
    }
    let c = s3.requests().of(Purpose::Fetch);
    let hedges = c.hedges.load(Relaxed);
    let most = HEDGE_BURST + reads * HEDGE_PER_READ_MILLI / 1000;
    assert!(
        (HEDGE_BURST..=most).contains(&hedges),
        "{hedges} hedges for {reads} late reads (budget {most})"
    );
    assert_eq!(c.gets.load(Relaxed), reads + hedges);
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
