use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a request was made, so that request counts can be read per purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Intake,
    Fetch,
    Cleanup,
}

impl Purpose {
    pub const ALL: [Purpose; 3] = [Purpose::Intake, Purpose::Fetch, Purpose::Cleanup];
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Intake => "intake",
            Purpose::Fetch => "fetch",
            Purpose::Cleanup => "cleanup",
        }
    }
}

/// Request and byte counters for one purpose. Shared by all shards of a
/// process; updated once per object request, never per record.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub lists: AtomicU64,
    pub errors: AtomicU64,
}

impl RequestCounters {
    pub fn put(&self, bytes: u64) {
        self.puts.fetch_add(1, Relaxed);
        self.put_bytes.fetch_add(bytes, Relaxed);
    }
    pub fn get(&self, bytes: u64) {
        self.gets.fetch_add(1, Relaxed);
        self.get_bytes.fetch_add(bytes, Relaxed);
    }
    pub fn error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
}
