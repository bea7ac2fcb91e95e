//! Crash points, for tests only: with `FLOE_TEST_CRASH_AT=<point>` in its
//! environment a broker aborts (as kill -9 would stop it) the first time
//! it reaches that point, so a test can restart it and check that nothing
//! acknowledged was lost. Unset, a crash point costs one comparison.
//!
//! Points: `archive-read` (an archive's intake batches read, nothing
//! uploaded), `archive-uploaded` (the object written, its log entry not
//! sent), `archive-committed` (the entry in the log, the job not told);
//! the same three steps of a compaction pass: `compact-read`,
//! `compact-uploaded`, `compact-committed`; `txn-markers-written` (a
//! transaction's markers in the log, its record not yet complete).

use std::sync::OnceLock;

pub const CRASH_AT_ENV: &str = "FLOE_TEST_CRASH_AT";

/// Aborts the process if the environment names `point`.
pub fn point(name: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    if AT
        .get_or_init(|| std::env::var(CRASH_AT_ENV).ok())
        .as_deref()
        == Some(name)
    {
        eprintln!("{CRASH_AT_ENV}={name}: aborting here (testing only)");
        std::process::abort();
    }
}
