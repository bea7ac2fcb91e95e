//! `floe check-bucket`: proves that the configured object store lets floe
//! do everything it needs — PutObject, GetObject, ListBucket, DeleteObject,
//! and CreateMultipartUpload + AbortMultipartUpload — printing one line per
//! permission and naming exactly what failed. Takes the same flags,
//! environment and config file as `floe serve`, so it checks what serve
//! would use.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use floe_objstore::{Error, ObjectStore, S3Options, S3};

use crate::config::ServeArgs;

/// Retries per request: a diagnosis should answer in seconds, not wait out
/// serve's deadline.
const CHECK_RETRY_MAX: u32 = 2;
const CHECK_RETRY_DEADLINE: Duration = Duration::from_secs(20);
/// Where the probe objects go, under the store's prefix.
const PROBE_PREFIX: &str = "floe-check-bucket/";
const PROBE_BODY: &[u8] = b"floe check-bucket probe object; safe to delete\n";

/// The outcome of one permission check.
enum Outcome {
    Ok,
    NotApplicable(String),
    Failed(String),
    /// Could not be checked because an earlier check failed.
    Blocked(&'static str),
}

pub fn main(args: ServeArgs) -> ExitCode {
    let cfg = match args.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("floe: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = S3Options {
        retry_max: CHECK_RETRY_MAX,
        retry_deadline: CHECK_RETRY_DEADLINE,
        ..cfg.object_store_options()
    };
    let rt = match super::command_runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(check(&cfg.object_store, &opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            println!("cannot open object store {:?}: {e}", cfg.object_store);
            ExitCode::FAILURE
        }
    }
}

/// Runs every check and prints the report; `Ok(true)` when all passed.
pub async fn check(url: &str, opts: &S3Options) -> Result<bool, Error> {
    let s3 = if url.starts_with("s3://") {
        Some(Arc::new(S3::open(url, opts)?))
    } else {
        None
    };
    let store: Arc<dyn ObjectStore> = match &s3 {
        Some(s) => s.clone(),
        None => floe_objstore::open(url, opts)?,
    };
    println!("checking {}", store.describe());
    let key = format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple());

    let mut results: Vec<(&str, Outcome)> = Vec::new();
    let put = match store.put(&key, vec![Bytes::from_static(PROBE_BODY)]).await {
        Ok(()) => Outcome::Ok,
        Err(e) => Outcome::Failed(explain("s3:PutObject", &e)),
    };
    let written = matches!(put, Outcome::Ok);
    results.push(("PutObject", put));

    results.push((
        "GetObject",
        if !written {
            Outcome::Blocked("PutObject")
        } else {
            match store.get(&key).await {
                Ok(b) if b == PROBE_BODY => Outcome::Ok,
                Ok(b) => Outcome::Failed(format!(
                    "read back {} bytes that differ from the {} written",
                    b.len(),
                    PROBE_BODY.len()
                )),
                Err(e) => Outcome::Failed(explain("s3:GetObject", &e)),
            }
        },
    ));

    results.push((
        "ListBucket",
        match store.list(PROBE_PREFIX).await {
            Ok(list) if !written || list.iter().any(|m| m.key == key) => Outcome::Ok,
            Ok(_) => Outcome::Failed(format!(
                "the listing of {PROBE_PREFIX} does not show {key}, just written"
            )),
            Err(e) => Outcome::Failed(explain("s3:ListBucket", &e)),
        },
    ));

    results.push((
        "DeleteObject",
        if !written {
            Outcome::Blocked("PutObject")
        } else {
            match store.delete(&key).await {
                Ok(()) => match store.get(&key).await {
                    Err(Error::NotFound { .. }) => Outcome::Ok,
                    Ok(_) => Outcome::Failed(format!("{key} is still readable after delete")),
                    Err(e) => Outcome::Failed(format!("checking the delete: {e}")),
                },
                Err(e) => Outcome::Failed(explain("s3:DeleteObject", &e)),
            }
        },
    ));

    results.push((
        "CreateMultipartUpload+AbortMultipartUpload",
        match &s3 {
            None => {
                Outcome::NotApplicable(format!("{} has no multipart uploads", store.describe()))
            }
            Some(s3) => match s3.probe_multipart(&format!("{key}-multipart")).await {
                Ok(()) => Outcome::Ok,
                Err(e) => {
                    let (api, permission) = match op_of(&e) {
                        Some("abort_multipart") => {
                            ("AbortMultipartUpload", "s3:AbortMultipartUpload")
                        }
                        _ => ("CreateMultipartUpload", "s3:PutObject"),
                    };
                    Outcome::Failed(format!("{api}: {}", explain(permission, &e)))
                }
            },
        },
    ));

    results.push((
        "ListMultipartUploads",
        match &s3 {
            None => {
                Outcome::NotApplicable(format!("{} has no multipart uploads", store.describe()))
            }
            Some(_) if opts.express => Outcome::NotApplicable(
                "floe does not list uploads in S3 Express directory buckets; give the bucket a rule that aborts incomplete multipart uploads".into(),
            ),
            // The orphan sweep lists open uploads to abort stale ones.
            Some(s3) => match s3
                .list_uploads(&floe_objstore::RequestCounters::default())
                .await
            {
                Ok(_) => Outcome::Ok,
                Err(e) => Outcome::Failed(explain("s3:ListBucketMultipartUploads", &e)),
            },
        },
    ));

    let width = results.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut failed = Vec::new();
    for (name, outcome) in &results {
        let line = match outcome {
            Outcome::Ok => "ok".to_string(),
            Outcome::NotApplicable(why) => format!("not applicable: {why}"),
            Outcome::Failed(why) => {
                failed.push(*name);
                format!("FAILED: {why}")
            }
            Outcome::Blocked(on) => {
                failed.push(*name);
                format!("NOT CHECKED: needs {on}, which failed")
            }
        };
        println!("{name:<width$}  {line}");
    }
    if failed.is_empty() {
        println!("all checks passed");
    } else {
        println!(
            "{} of {} checks failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    Ok(failed.is_empty())
}

/// The operation named in an error, through retry wrappers.
fn op_of(e: &Error) -> Option<&'static str> {
    match e.root() {
        Error::Io { op, .. }
        | Error::Throttled { op, .. }
        | Error::Timeout { op, .. }
        | Error::Truncated { op, .. }
        | Error::Precondition { op, .. }
        | Error::PermissionDenied { op, .. }
        | Error::Rejected { op, .. } => Some(op),
        _ => None,
    }
}

/// Says what a failure means for the permission being checked.
fn explain(permission: &str, e: &Error) -> String {
    match e.root() {
        Error::BucketNotFound { bucket } => format!("bucket {bucket:?} does not exist"),
        Error::PermissionDenied { reason, .. } => {
            format!("access denied: the credentials lack {permission} here ({reason})")
        }
        _ => e.to_string(),
    }
}
