use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};

use crate::{validate_key, Error, ObjectMeta, ObjectStore, Result};

/// In-memory backend for unit tests and fault injection. Passes the same
/// conformance suite as the durable backends.
#[derive(Debug, Default)]
pub struct Memory {
    /// Each object with the time it was put.
    objects: Mutex<BTreeMap<String, (Bytes, SystemTime)>>,
}

impl Memory {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (Bytes, SystemTime)>> {
        // A poisoned lock only means another test thread panicked while
        // holding it; the map itself is always consistent.
        self.objects.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait::async_trait]
impl ObjectStore for Memory {
    async fn put(&self, key: &str, parts: Vec<Bytes>) -> Result<()> {
        validate_key(key)?;
        let len = parts.iter().map(Bytes::len).sum();
        let mut whole = BytesMut::with_capacity(len);
        for p in &parts {
            whole.extend_from_slice(p);
        }
        self.lock()
            .insert(key.to_string(), (whole.freeze(), SystemTime::now()));
        Ok(())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let obj = self.get(key).await?;
        let size = obj.len() as u64;
        if range.start > range.end || range.end > size {
            return Err(Error::RangeOutOfBounds {
                key: key.to_string(),
                range,
                size,
            });
        }
        Ok(obj.slice(range.start as usize..range.end as usize))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        validate_key(key)?;
        self.lock()
            .get(key)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| Error::NotFound {
                key: key.to_string(),
            })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        validate_key(key)?;
        self.lock().remove(key);
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        Ok(self
            .lock()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, at))| ObjectMeta {
                key: k.clone(),
                size: v.len() as u64,
                last_modified: *at,
            })
            .collect())
    }

    fn describe(&self) -> String {
        "memory://".to_string()
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn conformance() {
        crate::conformance::run(&super::Memory::default()).await;
    }
}
