use std::io::{ErrorKind, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::{validate_key, Error, ObjectMeta, ObjectStore, Result};

/// Local-directory backend: the embedded default. Each object is a file;
/// a put writes a temporary file, fsyncs it, renames it into place and
/// fsyncs the directory, so an object is either whole or absent after a
/// crash or power loss.
#[derive(Debug)]
pub struct LocalDir {
    root: PathBuf,
}

/// Temporary files carry this marker; `list` skips them.
const TMP_MARKER: &str = ".floe-tmp-";

impl LocalDir {
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "create_dir",
            key: root.display().to_string(),
            source,
        })?;
        Ok(Self { root })
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        Ok(self.root.join(key))
    }
}

fn io<'a>(op: &'static str, key: &'a str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| {
        if source.kind() == ErrorKind::NotFound {
            Error::NotFound {
                key: key.to_string(),
            }
        } else {
            Error::Io {
                op,
                key: key.to_string(),
                source,
            }
        }
    }
}

fn put_blocking(root: &Path, path: &Path, parts: &[Bytes]) -> std::io::Result<()> {
    use std::io::{IoSlice, Write};
    let dir = path.parent().unwrap_or(root);
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        "{}{}{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("obj"),
        TMP_MARKER,
        rand::random::<u64>()
    ));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        let parts: Vec<&[u8]> = parts
            .iter()
            .map(|p| &p[..])
            .filter(|p| !p.is_empty())
            .collect();
        // `next` is the first part not fully written; `skip` the bytes of it
        // already written.
        let (mut next, mut skip) = (0, 0);
        while next < parts.len() {
            let slices: Vec<IoSlice<'_>> = std::iter::once(&parts[next][skip..])
                .chain(parts[next + 1..].iter().copied())
                .take(IOV_MAX)
                .map(IoSlice::new)
                .collect();
            let mut n = f.write_vectored(&slices)?;
            if n == 0 {
                return Err(std::io::Error::new(ErrorKind::WriteZero, "short write"));
            }
            while n > 0 && next < parts.len() {
                let left = parts[next].len() - skip;
                if n >= left {
                    n -= left;
                    next += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory is synced.
        std::fs::File::open(dir)?.sync_all()
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Most buffers passed to one `writev` (Linux's IOV_MAX).
const IOV_MAX: usize = 1024;

#[async_trait::async_trait]
impl ObjectStore for LocalDir {
    async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        let path = self.path(key)?;
        let root = self.root.clone();
        // Blocking std I/O on the sidecar's blocking pool: tokio's File would
        // copy every part into its own buffer; `write_vectored` hands the
        // caller's buffers to the kernel directly.
        tokio::task::spawn_blocking(move || put_blocking(&root, &path, &parts))
            .await
            .map_err(|e| Error::Io {
                op: "put",
                key: key.to_string(),
                source: std::io::Error::other(e),
            })?
            .map_err(io("put", key))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let path = self.path(key)?;
        let mut f = tokio::fs::File::open(&path)
            .await
            .map_err(io("open", key))?;
        let size = f.metadata().await.map_err(io("stat", key))?.len();
        if range.start > range.end || range.end > size {
            return Err(Error::RangeOutOfBounds {
                key: key.to_string(),
                range,
                size,
            });
        }
        f.seek(SeekFrom::Start(range.start))
            .await
            .map_err(io("seek", key))?;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        f.read_exact(&mut buf).await.map_err(io("read", key))?;
        Ok(Bytes::from(buf))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path(key)?;
        Ok(Bytes::from(
            tokio::fs::read(&path).await.map_err(io("read", key))?,
        ))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("delete", key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let mut rd = match tokio::fs::read_dir(&dir).await {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("list", prefix)(e)),
            };
            while let Some(entry) = rd.next_entry().await.map_err(io("list", prefix))? {
                let ft = entry.file_type().await.map_err(io("list", prefix))?;
                let path = entry.path();
                let Ok(rel) = path.strip_prefix(&self.root) else {
                    continue;
                };
                let key = rel.to_string_lossy().replace('\\', "/");
                if ft.is_dir() {
                    // Descend only where keys under this directory can match.
                    let dir_key = format!("{key}/");
                    if dir_key.starts_with(prefix) || prefix.starts_with(&dir_key) {
                        stack.push(path);
                    }
                } else if key.starts_with(prefix) && !key.contains(TMP_MARKER) {
                    let md = entry.metadata().await.map_err(io("list", prefix))?;
                    let last_modified = md.modified().map_err(io("list", prefix))?;
                    out.push(ObjectMeta {
                        key,
                        size: md.len(),
                        last_modified,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = super::LocalDir::open(dir.path()).expect("open");
        crate::conformance::run(&store).await;
    }
}
