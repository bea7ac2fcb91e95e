//! The S3 backend against a real S3 server: moto (`tests/install-deps.sh`
//! puts `moto_server` in `tests/.venv`). Starts moto on a free loopback
//! port, runs the port's conformance suite with and without a key prefix,
//! uploads in parts, forces a multipart failure, checks with
//! ListMultipartUploads/ListParts that nothing is left over, and has the
//! stale-upload sweep find and abort an upload left behind. Stops moto by
//! PID at the end, panics included.
//!
//! Without moto the test is skipped with a printed reason, unless
//! `FLOE_REQUIRE_S3=1` (set by `tests/run-all.sh`): then it fails.

// Test code: a panic is the test failing, with the error as its message.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use floe_objstore::s3::PART_BYTES_MIN;
use floe_objstore::{Error, ObjectStore, Purpose, RequestCounters, S3Options, S3};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpResponseBody, HttpService,
    ReqwestConnector,
};
use object_store::ClientOptions;

mod conformance;

/// Longest wait for moto to answer after start.
const MOTO_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running moto_server; killed by PID when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn moto_path() -> PathBuf {
    match std::env::var_os("FLOE_MOTO_SERVER") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/.venv/bin/moto_server"),
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Starts moto, or returns None (test skipped) when it is not installed and
/// FLOE_REQUIRE_S3 is not 1.
fn start_moto() -> Option<Moto> {
    let path = moto_path();
    if !path.exists() {
        let why = format!(
            "moto_server not found at {} (run tests/install-deps.sh, or set FLOE_MOTO_SERVER)",
            path.display()
        );
        if std::env::var("FLOE_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("{why}; FLOE_REQUIRE_S3=1 requires the S3 tests to run");
        }
        eprintln!("SKIPPED s3_conformance: {why}");
        return None;
    }
    let port = free_port();
    let child = Command::new(&path)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
    let mut moto = Moto { child, port };
    let deadline = Instant::now() + MOTO_START_TIMEOUT;
    loop {
        if let Ok((200, _)) = http(port, "GET", "/") {
            return Some(moto);
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            panic!("moto_server exited with {status} before answering");
        }
        assert!(
            Instant::now() < deadline,
            "moto_server did not answer within {MOTO_START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One unsigned HTTP/1.1 request to moto (which accepts any credentials,
/// or none); returns status and body.
fn http(port: u16, method: &str, target: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response: {text:.200}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn create_bucket(moto: &Moto, bucket: &str) {
    let (status, body) = http(moto.port, "PUT", &format!("/{bucket}")).unwrap();
    assert_eq!(status, 200, "creating bucket {bucket}: {body}");
}

/// Incomplete multipart uploads in `bucket` (ListMultipartUploads).
fn open_uploads(moto: &Moto, bucket: &str) -> usize {
    let (status, body) = http(moto.port, "GET", &format!("/{bucket}?uploads")).unwrap();
    assert_eq!(status, 200, "ListMultipartUploads: {body}");
    body.matches("<Upload>").count()
}

/// Whether ListParts still knows upload `id` of `key`.
fn upload_exists(moto: &Moto, bucket: &str, key: &str, id: &str) -> bool {
    let (status, body) = http(moto.port, "GET", &format!("/{bucket}/{key}?uploadId={id}")).unwrap();
    match status {
        200 => true,
        404 => {
            assert!(body.contains("NoSuchUpload"), "ListParts: {body}");
            false
        }
        s => panic!("ListParts answered {s}: {body}"),
    }
}

fn options(moto: &Moto) -> S3Options {
    S3Options {
        endpoint: Some(format!("http://127.0.0.1:{}", moto.port)),
        region: Some("us-east-1".into()),
        multipart_threshold_bytes: PART_BYTES_MIN + 1,
        part_bytes: PART_BYTES_MIN,
        part_concurrency: 3,
        retry_max: 2,
        ..S3Options::default()
    }
}

/// Passes requests to moto, except UploadPart number `fail_part`, which
/// gets a 500 without reaching it; remembers the upload ids it saw.
#[derive(Debug, Clone)]
struct FailPart {
    fail_part: u32,
    inner: Arc<Mutex<Option<HttpClient>>>,
    upload_ids: Arc<Mutex<Vec<String>>>,
}

impl HttpConnector for FailPart {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        *self.inner.lock().unwrap() = Some(ReqwestConnector::default().connect(options)?);
        Ok(HttpClient::new(self.clone()))
    }
}

#[async_trait::async_trait]
impl HttpService for FailPart {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let query = req.uri().query().unwrap_or("").to_string();
        for kv in query.split('&') {
            if let Some(id) = kv.strip_prefix("uploadId=") {
                let mut ids = self.upload_ids.lock().unwrap();
                if !ids.iter().any(|i| i == id) {
                    ids.push(id.to_string());
                }
            }
        }
        if query.contains(&format!("partNumber={}&", self.fail_part))
            || query.ends_with(&format!("partNumber={}", self.fail_part))
        {
            let body = "<Error><Code>InternalError</Code><Message>injected</Message></Error>";
            return Ok(http::Response::builder()
                .status(500)
                .body(HttpResponseBody::from(Bytes::from_static(body.as_bytes())))
                .unwrap());
        }
        let inner = self.inner.lock().unwrap().clone().unwrap();
        inner.execute(req).await
    }
}

/// Blocks of distinct content and uneven sizes, as a segment's parts are.
fn segment_parts(total: usize) -> Vec<Bytes> {
    let mut parts = Vec::new();
    let mut made = 0;
    let mut i = 0u32;
    while made < total {
        let len = (100_003 * (i as usize % 7 + 1)).min(total - made);
        let block: Vec<u8> = (0..len)
            .map(|j| (j as u32).wrapping_mul(31).wrapping_add(i) as u8)
            .collect();
        parts.push(Bytes::from(block));
        made += len;
        i += 1;
    }
    parts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_against_moto() {
    let Some(moto) = start_moto() else {
        return;
    };
    // moto accepts any keys; static ones keep the credential chain local.
    std::env::set_var("AWS_ACCESS_KEY_ID", "floe-test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "floe-test");

    // The conformance suite, without and with a prefix.
    create_bucket(&moto, "conf-root");
    let root = S3::open("s3://conf-root", &options(&moto)).unwrap();
    conformance::run(&root).await;

    create_bucket(&moto, "conf-prefix");
    let prefixed = S3::open("s3://conf-prefix/some/prefix/", &options(&moto)).unwrap();
    conformance::run(&prefixed).await;
    let (_, listing) = http(moto.port, "GET", "/conf-prefix?list-type=2").unwrap();
    assert!(listing.contains("<Key>some/prefix/c/a</Key>"), "{listing}");
    assert!(!listing.contains("<Key>c/a</Key>"), "{listing}");

    // A multipart upload round trip: 17 MiB in 5 MiB parts, 3 in flight.
    create_bucket(&moto, "multi");
    let s3 = S3::open("s3://multi/floe", &options(&moto)).unwrap();
    let parts = segment_parts(17 << 20);
    let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    s3.put("segments/big", parts).await.unwrap();
    assert_eq!(
        s3.get("segments/big").await.unwrap(),
        Bytes::from(whole.clone())
    );
    let across = (5 << 20) - 100..(10 << 20) + 100;
    assert_eq!(
        &s3.get_range("segments/big", across.clone()).await.unwrap()[..],
        &whole[across.start as usize..across.end as usize]
    );
    let c = s3.requests().of(Purpose::Intake);
    assert_eq!(c.multipart_creates.load(Relaxed), 1);
    assert_eq!(c.multipart_parts.load(Relaxed), 4);
    assert_eq!(c.multipart_completes.load(Relaxed), 1);
    assert_eq!(c.put_bytes.load(Relaxed), 17 << 20);
    assert_eq!(c.puts.load(Relaxed), 0);
    assert_eq!(open_uploads(&moto, "multi"), 0);
    let (status, head) = http(moto.port, "HEAD", "/multi/floe/segments/big").unwrap();
    assert_eq!(status, 200, "{head}");

    // A part that keeps failing: bounded retries, then the upload is
    // aborted and nothing is left in the bucket.
    let faults = FailPart {
        fail_part: 2,
        inner: Arc::default(),
        upload_ids: Arc::default(),
    };
    let failing =
        S3::open_with_connector("s3://multi/floe", &options(&moto), faults.clone()).unwrap();
    let e = failing
        .put("segments/doomed", segment_parts(12 << 20))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::RetriesExhausted {
                op: "upload_part",
                attempts: 3,
                ..
            }
        ),
        "{e}"
    );
    let c = failing.requests().of(Purpose::Intake);
    assert_eq!(c.multipart_aborts.load(Relaxed), 1);
    assert_eq!(c.retries.load(Relaxed), 2);
    assert_eq!(c.multipart_completes.load(Relaxed), 0);
    let ids = faults.upload_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert!(!upload_exists(
        &moto,
        "multi",
        "floe/segments/doomed",
        &ids[0]
    ));
    assert_eq!(open_uploads(&moto, "multi"), 0);
    assert!(matches!(
        s3.get("segments/doomed").await,
        Err(Error::NotFound { .. })
    ));

    // A bucket that does not exist is named as such.
    let missing = S3::open("s3://no-such-bucket", &options(&moto)).unwrap();
    let e = missing
        .put("x", vec![Bytes::from_static(b"x")])
        .await
        .unwrap_err();
    assert!(matches!(e, Error::BucketNotFound { .. }), "{e}");
    let e = missing.list("").await.unwrap_err();
    assert!(matches!(e, Error::BucketNotFound { .. }), "{e}");

    // The creates and aborts of check-bucket's multipart probe leave nothing.
    s3.probe_multipart("check/probe").await.unwrap();
    assert_eq!(open_uploads(&moto, "multi"), 0);

    // An upload left behind (a broker killed mid-upload): ListMultipartUploads
    // names it, and the stale-upload sweep aborts it. One outside the
    // store's prefix is neither listed nor touched.
    for target in [
        "/multi/floe/segments/left?uploads",
        "/multi/elsewhere?uploads",
    ] {
        let (status, body) = http(moto.port, "POST", target).unwrap();
        assert_eq!(status, 200, "CreateMultipartUpload: {body}");
    }
    let open = s3.list_uploads(&RequestCounters::default()).await.unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].key, "floe/segments/left");
    assert!(!open[0].upload_id.is_empty());
    // moto reports one fixed Initiated time for every upload (in 2010), so
    // only "a time that parsed, not in the future" is checked here.
    assert!(
        open[0].initiated <= SystemTime::now() + Duration::from_secs(300),
        "initiated {:?} is in the future",
        open[0].initiated
    );
    assert_eq!(s3.abort_stale_uploads(Duration::ZERO).await.unwrap(), 1);
    assert_eq!(open_uploads(&moto, "multi"), 1);
    drop(moto);
}
