//! `floe size`: how many m6in instances per zone a produce throughput
//! needs, and what they and their object-store requests cost (the
//! arithmetic and its assumptions live in `floe_tuning::size`).

use clap::Args;
use floe_tuning::size::{parse_throughput, size, SizingInput};

#[derive(Debug, Clone, Args)]
pub struct SizeArgs {
    /// Produce throughput across the cluster, e.g. 1GiB/s, 500MB/s, 10Gbps.
    #[arg(long, value_parser = parse_throughput)]
    pub throughput: f64,
    /// Availability zones the cluster spans. [default: 3]
    #[arg(long, default_value_t = 3)]
    pub zones: u32,
    /// Hours segments are kept (for the storage cost). [default: 24]
    #[arg(long, default_value_t = 24.0)]
    pub retention_hours: f64,
    /// Consumers reading each produced byte. [default: 1]
    #[arg(long, default_value_t = 1.0)]
    pub read_fanout: f64,
    /// Produce throughput one vCPU sustains; measure it with floe-bench.
    /// [default: 100MiB/s]
    #[arg(long, value_parser = parse_throughput, default_value = "100MiB/s")]
    pub per_vcpu_throughput: f64,
    /// Flush interval the brokers run with. [default: 100, as `floe serve`]
    #[arg(long, default_value_t = 100)]
    pub flush_interval_ms: u64,
    /// Flush size the brokers run with. [default: 8388608, as `floe serve`]
    #[arg(long, default_value_t = 8 << 20)]
    pub flush_bytes: u64,
}

pub fn main(args: SizeArgs) -> std::process::ExitCode {
    let non_negative = |v: f64| v.is_finite() && v >= 0.0;
    if args.zones == 0 || !non_negative(args.retention_hours) || !non_negative(args.read_fanout) {
        eprintln!(
            "floe size: --zones must be at least 1, --retention-hours and --read-fanout at least 0"
        );
        return std::process::ExitCode::from(2);
    }
    let sizing = size(&SizingInput {
        throughput_bytes_per_sec: args.throughput,
        zones: args.zones,
        read_fanout: args.read_fanout,
        retention_hours: args.retention_hours,
        per_vcpu_bytes_per_sec: args.per_vcpu_throughput,
        flush_interval_ms: args.flush_interval_ms,
        flush_bytes: args.flush_bytes,
    });
    // A closed pipe (`floe size ... | head`) ends the output, not a panic.
    use std::io::Write as _;
    let _ = write!(std::io::stdout().lock(), "{sizing}");
    std::process::ExitCode::SUCCESS
}
