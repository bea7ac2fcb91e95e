//! floe-bench: the Kafka load generator and latency recorder (issue 7).
//!
//! Empty for now: the first figures in the README come from librdkafka's
//! `rdkafka_performance`, the standard tool, run against `floe serve`.
