//! Start-up checks that turn "io_uring is unavailable" into one message
//! naming the cause and the fix, before any shard starts. Without them the
//! symptom is a shard thread that dies with glommio's `MemLockLimit(a/b)` or
//! a bare `Operation not permitted`, far from its cause.
//!
//! Three things matter (the first two stop the shards from starting):
//! - `io_uring_setup` is refused: a seccomp profile answers EPERM or ENOSYS
//!   (the defaults of Docker 25+ and containerd 2.0+ block io_uring:
//!   moby#46762, containerd#9320); the `kernel.io_uring_disabled` sysctl
//!   (Linux 6.6+) answers EPERM; a kernel older than 5.1 or built without
//!   io_uring answers ENOSYS.
//! - The memory-lock limit: kernels before 5.12 charge every ring to
//!   RLIMIT_MEMLOCK (ENOMEM from `io_uring_setup`); and glommio refuses to
//!   start an executor when the soft limit is under 512 KiB, whatever the
//!   kernel (its `MIN_MEMLOCK_LIMIT`).
//! - Registered buffers: glommio pins a 10 MiB buffer per shard in each of
//!   its three rings, charged to RLIMIT_MEMLOCK unless the process has
//!   CAP_IPC_LOCK. When that fails glommio logs a warning and goes on without
//!   them; floe does no direct file I/O, the only user of those buffers, so
//!   that is reported as a note, not an error.

use std::io;

/// glommio's minimum soft RLIMIT_MEMLOCK for one executor
/// (`MIN_MEMLOCK_LIMIT` in glommio 0.9 `sys/uring.rs`).
pub const GLOMMIO_MEMLOCK_BYTES_MIN: u64 = 512 * 1024;
/// Locked memory glommio's buffer registration needs per shard: its default
/// 10 MiB `io_memory`, registered in each of its three rings.
pub const GLOMMIO_REGISTERED_BYTES_PER_SHARD: u64 = 3 * (10 << 20);
/// Exit status for a failed preflight (sysexits' EX_CONFIG): the host or
/// container must change, so restarting cannot help. The systemd unit lists
/// it in RestartPreventExitStatus.
pub const EXIT_STATUS: u8 = 78;

const EPERM: i32 = 1;
const ENOMEM: i32 = 12;
const EACCES: i32 = 13;
const ENOSYS: i32 = 38;

const SECCOMP_FIX: &str = "run the container with floe's seccomp profile \
(deploy/container/seccomp-io_uring.json: docker run --security-opt seccomp=deploy/container/seccomp-io_uring.json, \
or a Kubernetes seccompProfile of type Localhost), or remove the SystemCallFilter that blocks io_uring_* in the systemd unit";
const MEMLOCK_FIX: &str = "raise the memory-lock limit: LimitMEMLOCK=infinity in the systemd unit, \
`ulimit -l unlimited` in the shell, `docker run --ulimit memlock=-1`, or a memlock limit in the container runtime's configuration";

/// Why floe cannot run its io_uring shards here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Unavailable {
    #[error(
        "io_uring is disabled by the kernel.io_uring_disabled sysctl (value {value}): \
         set it to 0 (sysctl -w kernel.io_uring_disabled=0, and in /etc/sysctl.d to keep it), \
         or with value 1 add floe's group to kernel.io_uring_group"
    )]
    DisabledBySysctl { value: u8 },
    #[error(
        "io_uring_setup was refused with EPERM (operation not permitted), most likely by a seccomp \
         profile (the default profiles of Docker 25+ and containerd 2.0+ block io_uring): {SECCOMP_FIX}"
    )]
    BlockedBySeccomp,
    #[error(
        "io_uring_setup failed with ENOSYS: the kernel has no io_uring (floe needs Linux 5.8 or later \
         built with CONFIG_IO_URING) or a seccomp profile answers ENOSYS for it; on a recent kernel, {SECCOMP_FIX}"
    )]
    NoSyscall,
    #[error(
        "io_uring_setup failed with ENOMEM: this kernel (before 5.12) charges io_uring rings to the \
         memory-lock limit, which is {limit} here; {MEMLOCK_FIX}, or grant CAP_IPC_LOCK"
    )]
    RingMemory { limit: String },
    #[error(
        "the memory-lock limit (ulimit -l) is {limit_bytes} bytes; glommio, floe's io_uring runtime, \
         needs at least {GLOMMIO_MEMLOCK_BYTES_MIN} bytes per process even with CAP_IPC_LOCK; {MEMLOCK_FIX}"
    )]
    MemlockTooLow { limit_bytes: u64 },
    #[error("io_uring_setup failed: {message} (errno {errno}); floe needs io_uring (Linux 5.8+)")]
    Other { errno: i32, message: String },
}

/// What the process may do, read from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Host {
    /// `kernel.io_uring_disabled`; `None` before Linux 6.6 (no such sysctl).
    pub io_uring_disabled: Option<u8>,
    /// Soft RLIMIT_MEMLOCK in bytes; `None` is unlimited.
    pub memlock_bytes: Option<u64>,
    /// The effective capability set holds CAP_IPC_LOCK.
    pub cap_ipc_lock: bool,
}

impl Host {
    pub fn read() -> Host {
        let io_uring_disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Host {
            io_uring_disabled,
            memlock_bytes: parse_memlock(&limits),
            cap_ipc_lock: parse_cap_ipc_lock(&status),
        }
    }
}

/// The soft "Max locked memory" of /proc/self/limits; `None` when unlimited
/// (or unreadable, which glommio would then find out for itself).
fn parse_memlock(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))?;
    let soft = line
        .trim_start_matches("Max locked memory")
        .split_whitespace()
        .next()?;
    soft.parse().ok()
}

/// Bit 14 of CapEff in /proc/self/status.
fn parse_cap_ipc_lock(status: &str) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Creates and drops one small ring: the same `io_uring_setup` call that
/// glommio makes for each shard.
pub fn probe_io_uring() -> Result<(), io::Error> {
    io_uring::IoUring::new(4).map(drop)
}

/// The cause of a failed probe, or of a limit that would stop glommio;
/// `Ok` carries notes worth one log line each.
pub fn diagnose(
    probe: Result<(), &io::Error>,
    host: &Host,
    shards: usize,
) -> Result<Vec<String>, Unavailable> {
    if let Err(e) = probe {
        let errno = e.raw_os_error().unwrap_or(0);
        return Err(match errno {
            EPERM | EACCES => match host.io_uring_disabled {
                Some(v @ 2) => Unavailable::DisabledBySysctl { value: v },
                // With 1 only CAP_SYS_ADMIN or kernel.io_uring_group may.
                Some(v @ 1) => Unavailable::DisabledBySysctl { value: v },
                _ => Unavailable::BlockedBySeccomp,
            },
            ENOSYS => Unavailable::NoSyscall,
            ENOMEM => Unavailable::RingMemory {
                limit: host
                    .memlock_bytes
                    .map_or("unlimited".into(), |b| format!("{b} bytes")),
            },
            _ => Unavailable::Other {
                errno,
                message: e.to_string(),
            },
        });
    }
    let mut notes = Vec::new();
    if let Some(limit_bytes) = host.memlock_bytes {
        if limit_bytes < GLOMMIO_MEMLOCK_BYTES_MIN {
            return Err(Unavailable::MemlockTooLow { limit_bytes });
        }
        let wanted = GLOMMIO_REGISTERED_BYTES_PER_SHARD * shards as u64;
        if !host.cap_ipc_lock && limit_bytes < wanted {
            notes.push(format!(
                "the memory-lock limit ({limit_bytes} bytes) is below the {wanted} bytes glommio \
                 would pin for {shards} shard(s), so it will log that registering buffers failed \
                 and run without them: harmless for floe, which does no direct file I/O \
                 (LimitMEMLOCK=infinity or CAP_IPC_LOCK silences it)"
            ));
        }
    }
    Ok(notes)
}

/// Probes io_uring and the limits glommio checks; logs the notes.
pub fn check(shards: usize) -> Result<(), Unavailable> {
    let probe = probe_io_uring();
    let notes = diagnose(probe.as_ref().map(|_| ()), &Host::read(), shards)?;
    for n in notes {
        tracing::info!("{n}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNLIMITED: Host = Host {
        io_uring_disabled: Some(0),
        memlock_bytes: None,
        cap_ipc_lock: false,
    };

    fn err(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    #[test]
    fn parses_proc_files() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max open files            1024                 524288               files     \n\
                      Max locked memory         65536                8388608              bytes     \n";
        assert_eq!(parse_memlock(limits), Some(65536));
        let unlimited =
            "Max locked memory         unlimited            unlimited            bytes\n";
        assert_eq!(parse_memlock(unlimited), None);
        assert!(parse_cap_ipc_lock(
            "Name:\tfloe\nCapEff:\t000001ffffffffff\n"
        ));
        assert!(!parse_cap_ipc_lock("CapEff:\t0000000000000000\n"));
        assert!(!parse_cap_ipc_lock("no caps line"));
    }

    #[test]
    fn eperm_is_the_sysctl_when_it_is_set_else_seccomp() {
        for v in [1u8, 2] {
            let host = Host {
                io_uring_disabled: Some(v),
                ..UNLIMITED
            };
            let e = diagnose(Err(&err(EPERM)), &host, 1).unwrap_err();
            assert_eq!(e, Unavailable::DisabledBySysctl { value: v });
            assert!(e.to_string().contains("kernel.io_uring_disabled"), "{e}");
        }
        for sysctl in [Some(0), None] {
            let host = Host {
                io_uring_disabled: sysctl,
                ..UNLIMITED
            };
            let e = diagnose(Err(&err(EPERM)), &host, 1).unwrap_err();
            assert_eq!(e, Unavailable::BlockedBySeccomp);
            assert!(e.to_string().contains("seccomp-io_uring.json"), "{e}");
        }
    }

    #[test]
    fn enosys_and_enomem_name_their_fix() {
        let e = diagnose(Err(&err(ENOSYS)), &UNLIMITED, 1).unwrap_err();
        assert!(e.to_string().contains("ENOSYS"), "{e}");
        let host = Host {
            memlock_bytes: Some(65536),
            ..UNLIMITED
        };
        let e = diagnose(Err(&err(ENOMEM)), &host, 1).unwrap_err();
        assert_eq!(
            e,
            Unavailable::RingMemory {
                limit: "65536 bytes".into()
            }
        );
        assert!(e.to_string().contains("LimitMEMLOCK"), "{e}");
        let e = diagnose(Err(&err(22)), &UNLIMITED, 1).unwrap_err();
        assert!(matches!(e, Unavailable::Other { errno: 22, .. }), "{e}");
    }

    #[test]
    fn memlock_below_glommios_minimum_fails_even_with_cap_ipc_lock() {
        let host = Host {
            memlock_bytes: Some(GLOMMIO_MEMLOCK_BYTES_MIN - 4096),
            cap_ipc_lock: true,
            ..UNLIMITED
        };
        let e = diagnose(Ok(()), &host, 1).unwrap_err();
        assert!(e.to_string().contains("ulimit -l"), "{e}");
        let host = Host {
            memlock_bytes: Some(GLOMMIO_MEMLOCK_BYTES_MIN),
            ..host
        };
        assert_eq!(diagnose(Ok(()), &host, 1), Ok(vec![]));
    }

    #[test]
    fn too_little_for_registered_buffers_is_a_note() {
        let host = Host {
            memlock_bytes: Some(8 << 20),
            ..UNLIMITED
        };
        let notes = diagnose(Ok(()), &host, 2).expect("runs");
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("registering buffers"), "{notes:?}");
        let with_cap = Host {
            cap_ipc_lock: true,
            ..host
        };
        assert_eq!(diagnose(Ok(()), &with_cap, 2), Ok(vec![]));
        assert_eq!(diagnose(Ok(()), &UNLIMITED, 64), Ok(vec![]));
    }

    #[test]
    fn this_machine_can_run_io_uring() {
        // The test machines run floe's end-to-end suite, so io_uring works
        // here; a failure names the cause instead of failing later.
        let probe = probe_io_uring();
        let verdict = diagnose(probe.as_ref().map(|_| ()), &Host::read(), 1);
        assert!(verdict.is_ok(), "{verdict:?}");
    }
}
