//! The sidecar: one small tokio runtime on its own threads, where the
//! tokio-based backends (object store, metadata store) run. Shards reach it
//! by spawning a future and awaiting a one-shot reply; a glommio task is
//! woken from the sidecar thread when the reply lands.

use std::future::Future;

use futures::channel::oneshot;

use crate::{Error, Result};

/// Threads of the sidecar runtime: I/O-bound work only.
pub const SIDECAR_THREADS: usize = 2;
/// Threads of its blocking pool, where the local-directory object store's
/// file calls run (tokio's default allows 512: each idle one lingers 10 s
/// with its stack and, under glibc, a malloc arena that keeps its pages).
pub const SIDECAR_BLOCKING_THREADS: usize = 16;

pub struct Sidecar {
    runtime: tokio::runtime::Runtime,
}

impl Sidecar {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(SIDECAR_THREADS)
            .max_blocking_threads(SIDECAR_BLOCKING_THREADS)
            .thread_name("floe-sidecar")
            .enable_all()
            .build()?;
        Ok(Self { runtime })
    }

    pub fn handle(&self) -> SidecarHandle {
        SidecarHandle {
            handle: self.runtime.handle().clone(),
        }
    }

    /// Runs `f` to completion on the sidecar, blocking the calling thread.
    /// For start-up and shutdown only, never from a shard.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    pub fn shutdown(self) {
        self.runtime
            .shutdown_timeout(std::time::Duration::from_secs(5));
    }
}

/// A cheap, `Send` handle shards use to run work on the sidecar.
#[derive(Clone)]
pub struct SidecarHandle {
    handle: tokio::runtime::Handle,
}

impl SidecarHandle {
    /// Spawns `f` on the sidecar and returns a future, awaitable from any
    /// executor, that resolves to its output.
    pub fn run<F, T>(&self, f: F) -> impl Future<Output = Result<T>> + 'static
    where
        F: Future<Output = Result<T>> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.handle.spawn(async move {
            let _ = tx.send(f.await);
        });
        async move { rx.await.unwrap_or(Err(Error::ShuttingDown)) }
    }

    pub fn spawn<F>(&self, f: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.handle.spawn(f);
    }
}
