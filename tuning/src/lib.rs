//! floe-tuning: the resource model — which CPUs the process may use and
//! how many shards that makes.
//!
//! Owns: reading the host's and cgroup's limits. Must never: start threads
//! or do I/O beyond reading `/proc` and `/sys`.
//!
//! Not yet here (issue 7): cgroup CPU quota and memory limits, memory
//! budgets on the 1 vCPU : 4 GiB model, the instance catalog and `floe size`.

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

/// Default shard count: one per CPU the process may use, bounded by what
/// `available_parallelism` reports (which honours cgroup CPU quotas).
pub fn default_shards() -> usize {
    let quota = std::thread::available_parallelism().map_or(1, |n| n.get());
    cpus_allowed().len().min(quota).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,8,10-11"), vec![0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(parse_cpu_list("5"), vec![5]);
        assert_eq!(parse_cpu_list("x,2"), vec![2]);
        assert!(parse_cpu_list("").is_empty());
        assert!(!cpus_allowed().is_empty());
        assert!(default_shards() >= 1);
    }
}
