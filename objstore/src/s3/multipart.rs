//! Multipart uploads: S3's part limits, how an object is cut into parts
//! (slices of the caller's buffers, never copies), and the create, upload,
//! complete and (on failure) abort requests of one upload.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::PutPayload;

use super::S3;
use crate::{Purpose, RequestCounters, Result};

/// S3's smallest part (all but the last part of an upload).
pub const PART_BYTES_MIN: usize = 5 << 20;
/// S3's largest part.
pub const PART_BYTES_MAX: usize = 5 << 30;
/// S3's most parts in one upload.
pub const PARTS_MAX: usize = 10_000;
/// Most parts of one upload in flight at once.
pub const PART_CONCURRENCY_MAX: usize = 64;
const _: () = assert!(PART_BYTES_MIN <= PART_BYTES_MAX);

impl S3 {
    /// Starts a multipart upload of `key` and aborts it: proves the
    /// credentials may CreateMultipartUpload and AbortMultipartUpload
    /// (`floe check-bucket`). Leaves nothing behind when both succeed.
    pub async fn probe_multipart(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        let c = self.accounting.current(Purpose::Cleanup);
        let id = self.create_multipart(c, key, &path).await?;
        self.abort_multipart(c, key, &path, &id).await
    }

    /// A multipart upload: parts of `part_bytes` sliced (never copied) out
    /// of `parts`, at most `part_concurrency` in flight; aborted on failure.
    pub(super) async fn put_multipart(
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

    pub(super) async fn abort_multipart(
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
}

/// Groups `parts` into payloads of exactly `part_bytes` (the last may be
/// shorter) by slicing the `Bytes`: no payload byte is copied.
fn split_parts(parts: Vec<Bytes>, part_bytes: usize) -> Vec<PutPayload> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
