//! ListMultipartUploads, the one request `object_store` 0.14 does not offer:
//! built and signed here with the crate's own SigV4
//! ([`object_store::aws::AwsAuthorizer`]) and credential chain, sent on a
//! client of its own, its answer read with `quick-xml` (the reader
//! `object_store` uses for S3's other answers).

use object_store::client::{HttpClient, HttpConnector as _, HttpRequest, HttpRequestBody};
use object_store::ClientOptions;
use serde::Deserialize;

use super::{S3Options, S3};
use crate::{Error, RequestCounters, Result};

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

/// The HTTP client [`S3::list_uploads`] sends its requests on.
pub(super) fn http_client(opts: &S3Options) -> Result<HttpClient> {
    object_store::client::ReqwestConnector::default()
        .connect(
            &ClientOptions::new()
                .with_allow_http(true)
                .with_timeout(opts.attempt_timeout),
        )
        .map_err(|e| Error::Config {
            reason: format!("S3 HTTP client: {e}"),
        })
}

impl S3 {
    /// Lists the multipart uploads in progress under the prefix. Not for
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
            // An answer that does not parse is a failed attempt, like one
            // cut short: retried, never read as "no uploads".
            let page = self
                .retry
                .run(c, "list_uploads", &self.prefix, || async {
                    RequestCounters::bump(&c.lists);
                    let body = self.signed_get(&url).await?;
                    parse_uploads(&body).map_err(|e| {
                        self.list_uploads_io(format!("unreadable ListMultipartUploads answer: {e}"))
                    })
                })
                .await?;
            out.extend(page.uploads);
            match page.next {
                Some(next) => marker = Some(next),
                None => return Ok(out),
            }
        }
        Ok(out)
    }

    fn list_uploads_io(&self, reason: String) -> Error {
        Error::Io {
            op: "list_uploads",
            key: self.prefix.clone(),
            source: std::io::Error::other(reason),
        }
    }

    async fn signed_get(&self, url: &str) -> Result<String> {
        let io = |e: String| self.list_uploads_io(e);
        let credential = self
            .store
            .credentials()
            .get_credential()
            .await
            .map_err(|e| io(e.to_string()))?;
        let mut req = HttpRequest::new(HttpRequestBody::empty());
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

/// The fields floe reads of a ListMultipartUploadsResult; the rest
/// (owner, initiator, storage class, common prefixes) is ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListMultipartUploadsResult {
    #[serde(default)]
    is_truncated: bool,
    next_key_marker: Option<String>,
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadEntry>,
}

/// One `<Upload>`. Its fields are optional here so that an entry missing
/// one is skipped rather than failing the page.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadEntry {
    key: Option<String>,
    upload_id: Option<String>,
    /// RFC 3339, UTC (`2026-11-22T07:45:00.000Z`).
    initiated: Option<String>,
}

struct UploadsPage {
    uploads: Vec<OpenUpload>,
    /// (NextKeyMarker, NextUploadIdMarker) when the listing is truncated.
    next: Option<(String, String)>,
}

/// Reads a ListMultipartUploadsResult. An upload whose fields are missing
/// or do not parse is skipped (never aborted on a misreading); a document
/// that is not such a result is an error.
fn parse_uploads(xml: &str) -> Result<UploadsPage, quick_xml::DeError> {
    let result: ListMultipartUploadsResult = quick_xml::de::from_str(xml)?;
    let uploads = result
        .uploads
        .into_iter()
        .filter_map(|u| {
            let initiated = humantime::parse_rfc3339(u.initiated?.trim()).ok()?;
            Some(OpenUpload {
                key: u.key?,
                upload_id: u.upload_id?,
                initiated,
            })
        })
        .collect();
    let next = match (
        result.is_truncated,
        result.next_key_marker,
        result.next_upload_id_marker,
    ) {
        (true, Some(k), Some(id)) if !k.is_empty() => Some((k, id)),
        _ => None,
    };
    Ok(UploadsPage { uploads, next })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn parses_a_list_multipart_uploads_page() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket><IsTruncated>true</IsTruncated>
<NextKeyMarker>floe/segments/2</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
<Upload><Key>floe/segments/1</Key><UploadId>id1</UploadId><Initiator><ID>me</ID></Initiator><Initiated>1970-01-02T00:00:01.000Z</Initiated></Upload>
<Upload><Key>floe/a&amp;b</Key><UploadId>id2</UploadId><Initiated>2026-11-22T07:45:00Z</Initiated></Upload>
<Upload><Key>floe/bad</Key><UploadId>id3</UploadId><Initiated>yesterday</Initiated></Upload>
<Upload><Key>floe/no-id</Key><Initiated>2026-11-22T07:45:00Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let page = parse_uploads(xml).unwrap();
        assert_eq!(
            page.uploads.len(),
            2,
            "an unreadable date or a missing field is skipped, not aborted"
        );
        assert_eq!(page.uploads[0].key, "floe/segments/1");
        assert_eq!(page.uploads[0].upload_id, "id1");
        assert_eq!(
            page.uploads[0].initiated,
            UNIX_EPOCH + Duration::from_secs(86_401)
        );
        assert_eq!(page.uploads[1].key, "floe/a&b");
        assert_eq!(
            page.uploads[1]
                .initiated
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .ok(),
            Some(1_795_333_500)
        );
        assert_eq!(page.next, Some(("floe/segments/2".into(), "id2".into())));
        let last = parse_uploads(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert!(last.uploads.is_empty() && last.next.is_none());
    }

    #[test]
    fn an_unreadable_answer_is_an_error_not_an_empty_page() {
        assert!(parse_uploads("<ListMultipartUploadsResult><Upload><Key>k").is_err());
        assert!(parse_uploads("Service Unavailable").is_err());
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(query_escape("floe/x y"), "floe%2Fx%20y");
    }
}
