//! The sizing calculator behind `floe size`: for a produce throughput and a
//! number of zones, how many instances of each m6in size, what they cost,
//! and what the object-store requests cost at the default flush settings.
//! Pure arithmetic over stated assumptions; every assumption is printed.

/// One instance size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InstanceType {
    pub name: &'static str,
    pub vcpus: u32,
    pub memory_gib: u32,
    /// Sustained network bandwidth, each direction.
    pub baseline_gbps: f64,
    /// "Up to" bandwidth (burst on credits for 4xlarge and smaller).
    pub burst_gbps: f64,
    /// On-demand Linux price, us-east-1, USD per hour.
    pub usd_per_hour: f64,
}

/// The m6in family (network-optimised, 1 vCPU : 4 GiB).
///
/// Source: AWS EC2 "General purpose instances — network specifications"
/// (docs.aws.amazon.com/ec2/latest/instancetypes/gp.html, m6in rows) and
/// the EC2 on-demand price list for us-east-1, as of 2024. Written down by
/// hand; check them before buying.
pub const M6IN: [InstanceType; 9] = [
    it("m6in.large", 2, 8, 3.125, 25.0, 0.139_23),
    it("m6in.xlarge", 4, 16, 6.25, 30.0, 0.278_46),
    it("m6in.2xlarge", 8, 32, 12.5, 40.0, 0.556_92),
    it("m6in.4xlarge", 16, 64, 25.0, 50.0, 1.113_84),
    it("m6in.8xlarge", 32, 128, 50.0, 50.0, 2.227_68),
    it("m6in.12xlarge", 48, 192, 75.0, 75.0, 3.341_52),
    it("m6in.16xlarge", 64, 256, 100.0, 100.0, 4.455_36),
    it("m6in.24xlarge", 96, 384, 150.0, 150.0, 6.683_04),
    it("m6in.32xlarge", 128, 512, 200.0, 200.0, 8.910_72),
];

const fn it(
    name: &'static str,
    vcpus: u32,
    memory_gib: u32,
    baseline_gbps: f64,
    burst_gbps: f64,
    usd_per_hour: f64,
) -> InstanceType {
    InstanceType {
        name,
        vcpus,
        memory_gib,
        baseline_gbps,
        burst_gbps,
        usd_per_hour,
    }
}

/// S3 Standard request and storage prices, us-east-1 (stated assumptions).
pub const S3_PUT_USD_PER_1000: f64 = 0.005;
pub const S3_GET_USD_PER_1000: f64 = 0.0004;
pub const S3_STORAGE_USD_PER_GB_MONTH: f64 = 0.023;
pub const HOURS_PER_MONTH: f64 = 730.0;
/// Plan instances to run at most this share of their CPU or network.
pub const UTILISATION_TARGET: f64 = 0.6;

/// What to size for.
#[derive(Debug, Clone, PartialEq)]
pub struct SizingInput {
    /// Produce throughput, bytes per second, across the cluster.
    pub throughput_bytes_per_sec: f64,
    pub zones: u32,
    /// Consumers reading each byte (fan-out).
    pub read_fanout: f64,
    /// How long segments are kept.
    pub retention_hours: f64,
    /// Produce throughput one vCPU (one shard) sustains.
    pub per_vcpu_bytes_per_sec: f64,
    pub flush_interval_ms: u64,
    pub flush_bytes: u64,
}

/// One row of the sizing: the cluster built from one instance size.
#[derive(Debug, Clone, PartialEq)]
pub struct SizingRow {
    pub instance: InstanceType,
    pub per_zone: u32,
    pub total: u32,
    /// "cpu" or "network": which resource set the count.
    pub bound_by: &'static str,
    pub puts_per_sec: f64,
    pub gets_per_sec: f64,
    pub compute_usd_month: f64,
    pub requests_usd_month: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sizing {
    pub input: SizingInput,
    pub rows: Vec<SizingRow>,
    pub storage_usd_month: f64,
}

/// Parses a throughput such as `1GiB/s`, `500MB/s`, `750MiB` or `1e9`.
pub fn parse_throughput(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: expected a number with a unit, e.g. 1GiB/s"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "Gbit" | "Gb" => 1e9 / 8.0,
        "Mbit" | "Mb" => 1e6 / 8.0,
        u => return Err(format!("{text:?}: unknown unit {u:?}")),
    };
    if !(n.is_finite() && n > 0.0) {
        return Err(format!("{text:?}: throughput must be positive"));
    }
    Ok(n * mult)
}

/// Sizes the cluster for every m6in size.
pub fn size(input: &SizingInput) -> Sizing {
    let zones = input.zones.max(1);
    // Survive the loss of one zone: the others carry all the traffic.
    let serving_zones = if zones > 1 { zones - 1 } else { 1 };
    let per_zone_bytes = input.throughput_bytes_per_sec / f64::from(serving_zones);
    // Out of each broker: one copy to the object store plus the fetches.
    let out_factor = 1.0 + input.read_fanout;
    let flush_interval_s = input.flush_interval_ms.max(1) as f64 / 1000.0;
    let rows = M6IN
        .iter()
        .map(|inst| {
            let cpu_bytes = inst.vcpus as f64 * input.per_vcpu_bytes_per_sec * UTILISATION_TARGET;
            let net_bytes = inst.baseline_gbps * 1e9 / 8.0 / out_factor * UTILISATION_TARGET;
            let (cap, bound_by) = if cpu_bytes <= net_bytes {
                (cpu_bytes, "cpu")
            } else {
                (net_bytes, "network")
            };
            let per_zone = ((per_zone_bytes / cap).ceil() as u32).max(1);
            let total = per_zone * zones;
            // Each shard seals a segment at the flush interval or when it
            // holds flush_bytes, whichever comes first, while it has data.
            let shards = f64::from(total) * f64::from(inst.vcpus);
            let per_shard = input.throughput_bytes_per_sec / shards;
            let seals_per_shard =
                (1.0 / flush_interval_s).max(per_shard / input.flush_bytes as f64);
            let puts_per_sec = shards * seals_per_shard;
            // Each zone's serving brokers read every segment once.
            let gets_per_sec = puts_per_sec * f64::from(zones);
            let month_s = HOURS_PER_MONTH * 3600.0;
            SizingRow {
                instance: *inst,
                per_zone,
                total,
                bound_by,
                puts_per_sec,
                gets_per_sec,
                compute_usd_month: f64::from(total) * inst.usd_per_hour * HOURS_PER_MONTH,
                requests_usd_month: (puts_per_sec * S3_PUT_USD_PER_1000
                    + gets_per_sec * S3_GET_USD_PER_1000)
                    / 1000.0
                    * month_s,
            }
        })
        .collect();
    let stored_gb = input.throughput_bytes_per_sec * input.retention_hours * 3600.0 / 1e9;
    Sizing {
        input: input.clone(),
        rows,
        storage_usd_month: stored_gb * S3_STORAGE_USD_PER_GB_MONTH,
    }
}

fn human_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", UNITS[i])
}

impl std::fmt::Display for Sizing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let i = &self.input;
        writeln!(
            f,
            "sizing for {}/s produced, read {}x, {} zone(s), {} h retention",
            human_bytes(i.throughput_bytes_per_sec),
            i.read_fanout,
            i.zones,
            i.retention_hours
        )?;
        writeln!(
            f,
            "{:<14} {:>5} {:>5} {:>13} {:>9} {:>6} {:>8} {:>9} {:>9} {:>12} {:>12}",
            "instance",
            "vCPU",
            "GiB",
            "Gbps base/up",
            "per zone",
            "total",
            "bound",
            "PUT/s",
            "GET/s",
            "compute $/mo",
            "requests $/mo"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<14} {:>5} {:>5} {:>13} {:>9} {:>6} {:>8} {:>9.0} {:>9.0} {:>12.0} {:>12.0}",
                r.instance.name,
                r.instance.vcpus,
                r.instance.memory_gib,
                format!("{}/{}", r.instance.baseline_gbps, r.instance.burst_gbps),
                r.per_zone,
                r.total,
                r.bound_by,
                r.puts_per_sec,
                r.gets_per_sec,
                r.compute_usd_month,
                r.requests_usd_month
            )?;
        }
        writeln!(
            f,
            "storage: {:.0} $/mo ({:.1} TB at S3 Standard {} $/GB-month)",
            self.storage_usd_month,
            i.throughput_bytes_per_sec * i.retention_hours * 3600.0 / 1e12,
            S3_STORAGE_USD_PER_GB_MONTH
        )?;
        writeln!(f, "assumptions:")?;
        writeln!(
            f,
            "  - one shard per vCPU sustains {}/s of produce; instances planned at {:.0} % of CPU and baseline network",
            human_bytes(i.per_vcpu_bytes_per_sec),
            UTILISATION_TARGET * 100.0
        )?;
        writeln!(
            f,
            "  - with more than one zone, the other zones carry all traffic when one zone is lost"
        )?;
        writeln!(
            f,
            "  - each broker sends every produced byte once to the object store and {}x to consumers",
            i.read_fanout
        )?;
        writeln!(
            f,
            "  - each shard seals a segment every {} ms or every {} bytes; each zone reads every segment once",
            i.flush_interval_ms, i.flush_bytes
        )?;
        writeln!(
            f,
            "  - S3 Standard us-east-1: PUT {} $/1000, GET {} $/1000; m6in on-demand us-east-1 prices (2024); {} h/month",
            S3_PUT_USD_PER_1000, S3_GET_USD_PER_1000, HOURS_PER_MONTH
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(throughput: f64, zones: u32) -> SizingInput {
        SizingInput {
            throughput_bytes_per_sec: throughput,
            zones,
            read_fanout: 1.0,
            retention_hours: 24.0,
            per_vcpu_bytes_per_sec: 100.0 * 1024.0 * 1024.0,
            flush_interval_ms: 100,
            flush_bytes: 8 << 20,
        }
    }

    #[test]
    fn parses_throughputs() {
        assert_eq!(parse_throughput("1GiB/s"), Ok(1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse_throughput("500MB/s"), Ok(5e8));
        assert_eq!(parse_throughput("10Gbps"), Ok(1.25e9));
        assert_eq!(parse_throughput("2048"), Ok(2048.0));
        assert!(parse_throughput("fast").is_err());
        assert!(parse_throughput("1PB/s").is_err());
        assert!(parse_throughput("-1MB/s").is_err());
    }

    #[test]
    fn catalog_is_the_model() {
        for i in M6IN {
            assert_eq!(i.memory_gib, i.vcpus * 4, "{}", i.name);
            assert!(i.burst_gbps >= i.baseline_gbps);
        }
    }

    #[test]
    fn one_gib_per_second_in_three_zones() {
        let s = size(&input(1024.0 * 1024.0 * 1024.0, 3));
        assert_eq!(s.rows.len(), M6IN.len());
        let large = &s.rows[0];
        // 512 MiB/s per surviving zone; a large does min(2*100*0.6 = 120
        // MiB/s cpu, 3.125 Gbit/s/2*0.6 ≈ 112 MiB/s network) = network.
        assert_eq!(large.bound_by, "network");
        assert_eq!(large.per_zone, 5);
        assert_eq!(large.total, 15);
        // 30 shards at ~34 MiB/s each: under 8 MiB per 100 ms, so 10 seals/s each.
        assert!((large.puts_per_sec - 300.0).abs() < 1e-6);
        assert!((large.gets_per_sec - 900.0).abs() < 1e-6);
        // Bigger instances need fewer of them, never zero.
        assert!(s.rows.iter().all(|r| r.per_zone >= 1));
        assert!(s.rows.windows(2).all(|w| w[0].per_zone >= w[1].per_zone));
        let text = s.to_string();
        assert!(
            text.contains("m6in.4xlarge") && text.contains("assumptions"),
            "{text}"
        );
        assert!(s.storage_usd_month > 0.0);
    }

    #[test]
    fn saturated_shards_seal_by_size() {
        let mut i = input(100e9, 1);
        i.per_vcpu_bytes_per_sec = 1e9;
        i.read_fanout = 0.0;
        i.flush_interval_ms = 1000;
        let s = size(&i);
        let r = &s.rows[0];
        let shards = f64::from(r.total * r.instance.vcpus);
        let per_shard = 100e9 / shards;
        assert!(per_shard > (8 << 20) as f64);
        assert!((r.puts_per_sec - 100e9 / (8 << 20) as f64).abs() < 1e-3);
    }
}
