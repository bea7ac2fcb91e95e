//! floe-tuning: the resource model — which CPUs and how much memory the
//! process may use, and the shard count and memory budgets that follow on
//! the 1 vCPU : 4 GiB model of network-optimised instances; plus the
//! instance catalog and sizing calculator behind `floe size`.
//!
//! Owns: reading the host's and cgroup's limits (v2 and v1), and pure
//! functions from those limits to budgets. Must never: start threads or do
//! I/O beyond reading `/proc` and `/sys`. Every parser takes file contents
//! so it can be tested with fixture strings; [`Limits::read`] is the thin
//! reader over the real files.

pub mod size;

/// The model: one vCPU per shard, this much memory per vCPU.
pub const MODEL_MEMORY_PER_VCPU_BYTES: u64 = 4 << 30;
/// Share of a shard's memory given to budgets; the rest is left for the
/// runtime, the sidecar (S3/etcd clients), metadata and allocator slack.
pub const BUDGETED_PERCENT: u64 = 75;
/// S3's smallest multipart part (except the last).
pub const UPLOAD_PART_BYTES_MIN: usize = 5 << 20;
/// Part size the model prefers: big enough that PUT cost stays low, small
/// enough that a shard can keep several in flight.
pub const UPLOAD_PART_BYTES: usize = 8 << 20;
/// Most parts of one segment upload in flight.
pub const UPLOAD_CONCURRENCY_MAX: usize = 8;
/// Budgets never shrink below this, whatever the limit says: below it the
/// broker cannot hold one large produce request.
pub const BUDGET_BYTES_MIN: usize = 16 << 20;
/// Memory per vCPU this far (as a factor) from the model draws a warning.
pub const MODEL_MISMATCH_FACTOR: f64 = 1.5;

/// CPUs this process may run on, from `/proc/self/status`
/// (`Cpus_allowed_list`), falling back to `0..available_parallelism`.
pub fn cpus_allowed() -> Vec<usize> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| parse_cpu_list(v.trim()))
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            (0..n).collect()
        })
}

/// Parses a kernel CPU list such as `0-3,8,10-11`. Malformed parts are
/// skipped.
pub fn parse_cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    cpus.extend(a..=b.min(a + 4096));
                }
            }
            None => cpus.extend(part.parse::<usize>().ok()),
        }
    }
    cpus
}

/// Default shard count: one per CPU the process may use, bounded by the
/// cgroup CPU quota (rounded down, at least one).
pub fn default_shards() -> usize {
    Budgets::from_limits(&Limits::read()).shards
}

/// cgroup v2 `cpu.max` (`"max 100000"` or `"150000 100000"`): the quota in
/// CPUs, `None` when unlimited or unreadable.
pub fn parse_cgroup2_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota = it.next()?;
    let period: f64 = it.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then(|| quota / period)
}

/// cgroup v1 `cpu.cfs_quota_us` and `cpu.cfs_period_us`: the quota in CPUs,
/// `None` when unlimited (`-1`) or unreadable.
pub fn parse_cgroup1_cpu(quota_us: &str, period_us: &str) -> Option<f64> {
    let quota: i64 = quota_us.trim().parse().ok()?;
    let period: i64 = period_us.trim().parse().ok()?;
    (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
}

/// cgroup v2 `memory.max` (`"max"` or bytes).
pub fn parse_cgroup2_memory_max(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" {
        return None;
    }
    t.parse().ok()
}

/// Above this a v1 `memory.limit_in_bytes` means "no limit" (the kernel
/// reports PAGE_COUNTER_MAX rounded to pages, about 2^63).
const CGROUP1_UNLIMITED_BYTES: u64 = 1 << 62;

/// cgroup v1 `memory.limit_in_bytes`.
pub fn parse_cgroup1_memory_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < CGROUP1_UNLIMITED_BYTES).then_some(v)
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut it = line.split_whitespace();
    let v: u64 = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => v.checked_mul(1024),
        Some(_) => None,
    }
}

/// The cgroup paths of `/proc/self/cgroup`: the v2 path (`0::/path`) and,
/// per v1 controller, its path (`4:memory:/path`, `1:cpu,cpuacct:/path`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CgroupPaths {
    pub v2: Option<String>,
    pub v1_cpu: Option<String>,
    pub v1_memory: Option<String>,
}

pub fn parse_proc_self_cgroup(text: &str) -> CgroupPaths {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            paths.v2 = Some(path.to_string());
        }
        for c in controllers.split(',') {
            match c {
                "cpu" => paths.v1_cpu = Some(path.to_string()),
                "memory" => paths.v1_memory = Some(path.to_string()),
                _ => {}
            }
        }
    }
    paths
}

/// Where a limit came from, for the start-up log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    CgroupV2,
    CgroupV1,
    Host,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::CgroupV2 => "cgroup v2",
            Source::CgroupV1 => "cgroup v1",
            Source::Host => "host",
        })
    }
}

/// What the process may use.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// CPUs in the affinity mask.
    pub cpus_allowed: usize,
    /// cgroup CPU quota in CPUs, if any.
    pub cpu_quota: Option<f64>,
    pub cpu_source: Source,
    /// cgroup memory limit, if any.
    pub memory_limit_bytes: Option<u64>,
    pub memory_source: Source,
    /// The host's memory (`MemTotal`).
    pub host_memory_bytes: u64,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The cgroup file `name` for cgroup path `path` under `mount`: the nested
/// path first, then the mount's root (inside a container the cgroup
/// namespace usually makes the process's own cgroup the root).
fn cgroup_file(mount: &str, path: Option<&str>, name: &str) -> Option<String> {
    let nested = path
        .filter(|p| *p != "/")
        .and_then(|p| read(&format!("{mount}{p}/{name}")));
    nested.or_else(|| read(&format!("{mount}/{name}")))
}

impl Limits {
    /// Reads the real limits; anything unreadable falls back to the host.
    pub fn read() -> Limits {
        let paths = read("/proc/self/cgroup")
            .map(|t| parse_proc_self_cgroup(&t))
            .unwrap_or_default();
        let v2 = paths.v2.as_deref();
        let (cpu_quota, cpu_source) = match cgroup_file("/sys/fs/cgroup", v2, "cpu.max")
            .and_then(|t| parse_cgroup2_cpu_max(&t))
        {
            Some(q) => (Some(q), Source::CgroupV2),
            None => {
                let p = paths.v1_cpu.as_deref();
                let quota = ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"]
                    .iter()
                    .find_map(|m| {
                        parse_cgroup1_cpu(
                            &cgroup_file(m, p, "cpu.cfs_quota_us")?,
                            &cgroup_file(m, p, "cpu.cfs_period_us")?,
                        )
                    });
                match quota {
                    Some(q) => (Some(q), Source::CgroupV1),
                    None => (None, Source::Host),
                }
            }
        };
        let (memory_limit_bytes, memory_source) =
            match cgroup_file("/sys/fs/cgroup", v2, "memory.max")
                .and_then(|t| parse_cgroup2_memory_max(&t))
            {
                Some(m) => (Some(m), Source::CgroupV2),
                None => match cgroup_file(
                    "/sys/fs/cgroup/memory",
                    paths.v1_memory.as_deref(),
                    "memory.limit_in_bytes",
                )
                .and_then(|t| parse_cgroup1_memory_limit(&t))
                {
                    Some(m) => (Some(m), Source::CgroupV1),
                    None => (None, Source::Host),
                },
            };
        Limits {
            cpus_allowed: cpus_allowed().len(),
            cpu_quota,
            cpu_source,
            memory_limit_bytes,
            memory_source,
            // Without /proc/meminfo, assume the model's share.
            host_memory_bytes: read("/proc/meminfo")
                .and_then(|t| parse_meminfo_total(&t))
                .unwrap_or(MODEL_MEMORY_PER_VCPU_BYTES),
        }
    }

    /// The memory the process may use: the cgroup limit, at most the host's.
    pub fn memory_bytes(&self) -> u64 {
        self.memory_limit_bytes
            .map_or(self.host_memory_bytes, |m| m.min(self.host_memory_bytes))
    }
}

/// Shard count and per-shard memory budgets chosen from [`Limits`].
#[derive(Debug, Clone, PartialEq)]
pub struct Budgets {
    pub shards: usize,
    /// Memory each shard is planned around (at most the model's 4 GiB).
    pub shard_memory_bytes: u64,
    /// Per shard: request bytes admitted but not yet answered.
    pub inflight_bytes: usize,
    /// Per shard: frame slabs and segments being assembled.
    pub buffer_pool_bytes: usize,
    /// Per shard: recent batches kept for fetches.
    pub read_cache_bytes: usize,
    pub upload_part_bytes: usize,
    /// Parts of one segment upload in flight.
    pub upload_concurrency: usize,
    /// Reasons the limits do not fit the model, for start-up warnings.
    pub warnings: Vec<String>,
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl Budgets {
    pub fn from_limits(l: &Limits) -> Budgets {
        let mut warnings = Vec::new();
        let cpus = l.cpus_allowed.max(1);
        let shards = match l.cpu_quota {
            Some(q) => {
                if q.fract() > 1e-6 {
                    warnings.push(format!(
                        "CPU quota {q:.2} ({}) is fractional: {} shard(s), and the quota will throttle them in bursts; give the pod a whole number of CPUs",
                        l.cpu_source,
                        (q.floor() as usize).max(1)
                    ));
                }
                (q.floor() as usize).clamp(1, cpus)
            }
            None => cpus,
        };
        let memory = l.memory_bytes();
        let per_vcpu = memory / shards as u64;
        match (l.cpu_quota.is_some(), l.memory_limit_bytes.is_some()) {
            (true, false) => warnings.push(
                "a CPU quota but no memory limit: the pod is not Guaranteed QoS; set memory limit = request = 4 GiB per CPU".into(),
            ),
            (false, true) => warnings.push(
                "a memory limit but no CPU quota: the pod is not Guaranteed QoS; set cpu limit = request (whole CPUs)".into(),
            ),
            _ => {}
        }
        let model = MODEL_MEMORY_PER_VCPU_BYTES as f64;
        if (per_vcpu as f64) < model / MODEL_MISMATCH_FACTOR
            || (l.memory_limit_bytes.is_some() && per_vcpu as f64 > model * MODEL_MISMATCH_FACTOR)
        {
            warnings.push(format!(
                "{:.1} GiB of memory per shard ({:.1} GiB for {shards} shard(s), {}) does not match the 1 vCPU : 4 GiB model; budgets are scaled to it",
                gib(per_vcpu),
                gib(memory),
                l.memory_source
            ));
        }
        // More memory than the model is left to the page cache and other
        // processes: on a shared host the broker should not claim it all.
        let shard_memory_bytes = per_vcpu.min(MODEL_MEMORY_PER_VCPU_BYTES);
        let budgeted = shard_memory_bytes * BUDGETED_PERCENT / 100;
        let share = |num: u64, den: u64| ((budgeted / den * num) as usize).max(BUDGET_BYTES_MIN);
        let upload_bytes = share(1, 8);
        let upload_part_bytes = UPLOAD_PART_BYTES;
        Budgets {
            shards,
            shard_memory_bytes,
            read_cache_bytes: share(1, 2),
            inflight_bytes: share(1, 4),
            buffer_pool_bytes: share(1, 8),
            upload_part_bytes,
            upload_concurrency: (upload_bytes / upload_part_bytes).clamp(1, UPLOAD_CONCURRENCY_MAX),
            warnings,
        }
    }
}

impl std::fmt::Display for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: usize| b >> 20;
        write!(
            f,
            "{} shard(s); per shard: {} MiB planned, in-flight {} MiB, buffer pool {} MiB, read cache {} MiB, upload parts {} MiB x {}",
            self.shards,
            self.shard_memory_bytes >> 20,
            mib(self.inflight_bytes),
            mib(self.buffer_pool_bytes),
            mib(self.read_cache_bytes),
            mib(self.upload_part_bytes),
            self.upload_concurrency
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn limits(cpus: usize, quota: Option<f64>, mem: Option<u64>, host: u64) -> Limits {
        Limits {
            cpus_allowed: cpus,
            cpu_quota: quota,
            cpu_source: if quota.is_some() {
                Source::CgroupV2
            } else {
                Source::Host
            },
            memory_limit_bytes: mem,
            memory_source: if mem.is_some() {
                Source::CgroupV2
            } else {
                Source::Host
            },
            host_memory_bytes: host,
        }
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5"), vec![5]);
        assert_eq!(parse_cpu_list("x,2"), vec![2]);
        assert!(parse_cpu_list("").is_empty());
        assert!(!cpus_allowed().is_empty());
        assert!(default_shards() >= 1);
    }

    #[test]
    fn cgroup_v2_files() {
        assert_eq!(parse_cgroup2_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cgroup2_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cgroup2_cpu_max("150000 100000"), Some(1.5));
        assert_eq!(parse_cgroup2_cpu_max("50000"), Some(0.5));
        assert_eq!(parse_cgroup2_cpu_max("x 100000"), None);
        assert_eq!(parse_cgroup2_cpu_max(""), None);
        assert_eq!(parse_cgroup2_memory_max("max\n"), None);
        assert_eq!(parse_cgroup2_memory_max("8589934592\n"), Some(8 * GIB));
        assert_eq!(parse_cgroup2_memory_max("lots"), None);
    }

    #[test]
    fn cgroup_v1_files() {
        assert_eq!(parse_cgroup1_cpu("-1\n", "100000\n"), None);
        assert_eq!(parse_cgroup1_cpu("300000\n", "100000\n"), Some(3.0));
        assert_eq!(parse_cgroup1_cpu("25000", "0"), None);
        assert_eq!(parse_cgroup1_memory_limit("9223372036854771712\n"), None);
        assert_eq!(parse_cgroup1_memory_limit("4294967296\n"), Some(4 * GIB));
        assert_eq!(parse_cgroup1_memory_limit(""), None);
    }

    #[test]
    fn meminfo_and_proc_cgroup() {
        let meminfo = "MemTotal:       24568096 kB\nMemFree:        19000000 kB\n";
        assert_eq!(parse_meminfo_total(meminfo), Some(24_568_096 * 1024));
        assert_eq!(parse_meminfo_total("MemFree: 1 kB\n"), None);
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/k8s/pod1\n0::/\n";
        assert_eq!(
            parse_proc_self_cgroup(hybrid),
            CgroupPaths {
                v2: Some("/".into()),
                v1_cpu: Some("/k8s/pod1".into()),
                v1_memory: Some("/process_api/abc".into()),
            }
        );
        let v2 = "0::/kubepods.slice/pod42\n";
        assert_eq!(
            parse_proc_self_cgroup(v2).v2.as_deref(),
            Some("/kubepods.slice/pod42")
        );
        assert_eq!(parse_proc_self_cgroup("garbage"), CgroupPaths::default());
    }

    #[test]
    fn guaranteed_pod_on_the_model_gets_no_warning() {
        let b = Budgets::from_limits(&limits(8, Some(2.0), Some(8 * GIB), 64 * GIB));
        assert_eq!(b.shards, 2);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(b.shard_memory_bytes, 4 * GIB);
        // 75 % of 4 GiB = 3 GiB: half read cache, a quarter in flight.
        assert_eq!(b.read_cache_bytes, 1536 << 20);
        assert_eq!(b.inflight_bytes, 768 << 20);
        assert_eq!(b.buffer_pool_bytes, 384 << 20);
        assert_eq!(b.upload_part_bytes, 8 << 20);
        assert_eq!(b.upload_concurrency, UPLOAD_CONCURRENCY_MAX);
        assert!(b.upload_part_bytes >= UPLOAD_PART_BYTES_MIN);
    }

    #[test]
    fn fractional_quota_and_missing_memory_limit_warn() {
        let b = Budgets::from_limits(&limits(4, Some(1.5), None, 16 * GIB));
        assert_eq!(b.shards, 1);
        assert!(b.warnings.iter().any(|w| w.contains("fractional")));
        assert!(b.warnings.iter().any(|w| w.contains("Guaranteed QoS")));
        // Less than one CPU still runs one shard.
        let b = Budgets::from_limits(&limits(4, Some(0.5), Some(2 * GIB), 16 * GIB));
        assert_eq!(b.shards, 1);
    }

    #[test]
    fn memory_off_the_model_warns_and_scales() {
        let small = Budgets::from_limits(&limits(2, Some(2.0), Some(2 * GIB), 64 * GIB));
        assert!(small.warnings.iter().any(|w| w.contains("does not match")));
        assert_eq!(small.shard_memory_bytes, GIB);
        assert_eq!(small.inflight_bytes, 192 << 20);
        // Tiny limits keep a floor.
        let tiny = Budgets::from_limits(&limits(1, Some(1.0), Some(32 << 20), 64 * GIB));
        assert_eq!(tiny.inflight_bytes, BUDGET_BYTES_MIN);
        assert_eq!(tiny.upload_concurrency, 2);
        let big = Budgets::from_limits(&limits(2, Some(2.0), Some(64 * GIB), 64 * GIB));
        assert!(big.warnings.iter().any(|w| w.contains("does not match")));
        assert_eq!(big.shard_memory_bytes, 4 * GIB);
    }

    #[test]
    fn host_without_limits_uses_cpus_and_caps_memory_at_the_model() {
        let b = Budgets::from_limits(&limits(2, None, None, 24 * GIB));
        assert_eq!(b.shards, 2);
        assert!(b.warnings.is_empty(), "{:?}", b.warnings);
        assert_eq!(b.shard_memory_bytes, 4 * GIB);
        let line = b.to_string();
        assert!(
            line.contains("2 shard(s)") && line.contains("read cache 1536 MiB"),
            "{line}"
        );
        // A quota above the CPU mask does not add shards.
        assert_eq!(
            Budgets::from_limits(&limits(2, Some(8.0), Some(32 * GIB), 64 * GIB)).shards,
            2
        );
    }

    #[test]
    fn reads_this_machine() {
        let l = Limits::read();
        assert!(l.cpus_allowed >= 1 && l.host_memory_bytes > 0);
        assert!(l.memory_bytes() <= l.host_memory_bytes);
    }
}
