use std::future::Future;
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

tokio::task_local! {
    static PURPOSE: Purpose;
}

/// Runs `fut` with every object-store request it makes counted under
/// `purpose`. Without it a backend that counts its own requests files puts
/// under intake, gets under fetch, and deletes and lists under cleanup.
pub async fn with_purpose<F: Future>(purpose: Purpose, fut: F) -> F::Output {
    PURPOSE.scope(purpose, fut).await
}

/// The purpose set by [`with_purpose`] around the current task, if any.
pub fn current_purpose() -> Option<Purpose> {
    PURPOSE.try_with(|p| *p).ok()
}

/// Request and byte counters for one purpose. Shared by all shards of a
/// process; updated once per object request, never per record.
///
/// The first group (`puts` … `errors`) is what the engine counts per call of
/// the port. A backend that counts its own wire requests ([`Accounting`])
/// uses all fields: there `puts` counts PutObject requests only, multipart
/// uploads are counted part by part, and every retry and hedged read is a
/// request of its own.
#[derive(Debug, Default)]
pub struct RequestCounters {
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub lists: AtomicU64,
    pub errors: AtomicU64,
    /// HEAD requests (object size for an empty or out-of-bounds range).
    pub heads: AtomicU64,
    /// CreateMultipartUpload requests.
    pub multipart_creates: AtomicU64,
    /// UploadPart requests (their bytes are in `put_bytes`).
    pub multipart_parts: AtomicU64,
    /// CompleteMultipartUpload requests.
    pub multipart_completes: AtomicU64,
    /// AbortMultipartUpload requests.
    pub multipart_aborts: AtomicU64,
    /// Requests sent again after a retriable failure.
    pub retries: AtomicU64,
    /// Ranged reads that started a second, hedging request.
    pub hedges: AtomicU64,
    /// Hedged reads answered by the hedging request first.
    pub hedge_wins: AtomicU64,
    /// Failures that were the store asking us to slow down.
    pub throttled: AtomicU64,
    /// Requests that got no answer within their time limit.
    pub timeouts: AtomicU64,
}

/// One kind of wire request, for [`RequestCounters::requests_by_op`].
pub const REQUEST_OPS: [&str; 9] = [
    "put_object",
    "create_multipart",
    "upload_part",
    "complete_multipart",
    "abort_multipart",
    "get",
    "head",
    "delete",
    "list",
];

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
    /// Adds one to `counter` (any field of `self`).
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }
    /// Wire requests by kind, in [`REQUEST_OPS`] order.
    pub fn requests_by_op(&self) -> [(&'static str, u64); 9] {
        let v = [
            &self.puts,
            &self.multipart_creates,
            &self.multipart_parts,
            &self.multipart_completes,
            &self.multipart_aborts,
            &self.gets,
            &self.heads,
            &self.deletes,
            &self.lists,
        ];
        std::array::from_fn(|i| (REQUEST_OPS[i], v[i].load(Relaxed)))
    }
    /// All wire requests of every kind.
    pub fn requests_total(&self) -> u64 {
        self.requests_by_op().iter().map(|(_, v)| v).sum()
    }
}

/// A backend's own count of the requests it sent, per purpose. Unlike the
/// engine's per-call counters this sees multipart parts, retries and hedged
/// reads: what the store bills.
#[derive(Debug, Default)]
pub struct Accounting {
    intake: RequestCounters,
    fetch: RequestCounters,
    cleanup: RequestCounters,
}

impl Accounting {
    pub fn of(&self, purpose: Purpose) -> &RequestCounters {
        match purpose {
            Purpose::Intake => &self.intake,
            Purpose::Fetch => &self.fetch,
            Purpose::Cleanup => &self.cleanup,
        }
    }

    /// The counters for a request whose operation implies `default`, unless
    /// the caller set a purpose with [`with_purpose`].
    pub fn current(&self, default: Purpose) -> &RequestCounters {
        self.of(current_purpose().unwrap_or(default))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn purpose_scope_overrides_the_default() {
        let a = Accounting::default();
        RequestCounters::bump(&a.current(Purpose::Fetch).gets);
        with_purpose(Purpose::Cleanup, async {
            RequestCounters::bump(&a.current(Purpose::Fetch).gets);
        })
        .await;
        assert_eq!(a.of(Purpose::Fetch).requests_total(), 1);
        assert_eq!(a.of(Purpose::Cleanup).requests_by_op()[5], ("get", 1));
    }
}
