//! The metadata conformance suite against a real etcd, started here on
//! loopback (data dir in /dev/shm) and stopped by PID when the test ends.
//! With `FLOE_REQUIRE_ETCD=1` (the test command sets it) a missing etcd
//! binary fails the test instead of skipping it.

#![cfg(feature = "etcd")]

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use floe_meta::{Etcd, Event, MetaStore, Op, Txn};
use futures::StreamExt;

// Test code: a panic is the test failing, with the error as its message.
#[allow(clippy::unwrap_used)]
mod conformance;

struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// Data directory under `dir`; a fresh one for each start on new ports.
    data: String,
    /// Member name, unique in this process: readiness asks etcd for it, so
    /// a test never mistakes another test's etcd for its own.
    name: String,
    client_port: u16,
    peer_port: u16,
}

/// Ports this process has handed out. The tests of one binary run on
/// parallel threads, and once a `bind(0)` listener is dropped the kernel
/// may hand the same port to the next `bind(0)`: two etcds on one port,
/// one of them exits, both tests talk to the other, and a restart in one
/// test breaks the other (CI, 2026-12-01: "Connection refused" on the
/// conformance suite's first request). No port is given out twice.
static TAKEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if TAKEN.lock().expect("port set").insert(port) {
            return port;
        }
    }
}

fn etcd_binary() -> Option<String> {
    let bin = std::env::var("FLOE_ETCD").unwrap_or_else(|_| "etcd".into());
    let found = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found {
        return Some(bin);
    }
    assert!(
        std::env::var("FLOE_REQUIRE_ETCD").as_deref() != Ok("1"),
        "etcd not found ({bin}); run tests/install-deps.sh"
    );
    eprintln!("skipping: etcd not found ({bin}); set FLOE_REQUIRE_ETCD=1 to make this an error");
    None
}

/// Fresh port pairs tried after a started etcd exited before answering.
const ETCD_START_RETRIES: usize = 3;

/// How long a started etcd may take to answer as itself.
const ETCD_START: Duration = Duration::from_secs(20);

impl EtcdServer {
    /// Starts an etcd on fresh ports; if it exits before answering (a port
    /// taken by a process outside this one), tries fresh ports again.
    async fn start() -> Option<Self> {
        etcd_binary()?;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let mut s = Self {
            child: None,
            dir: tempfile::tempdir_in(base).expect("tempdir"),
            data: "data".into(),
            name: format!(
                "floe-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
            client_port: free_port(),
            peer_port: free_port(),
        };
        let mut attempts = 0;
        loop {
            match s.spawn().await {
                Ok(()) => return Some(s),
                Err(e) if attempts < ETCD_START_RETRIES => {
                    eprintln!(
                        "etcd on ports {}/{}: {e}; fresh ports",
                        s.client_port, s.peer_port
                    );
                    attempts += 1;
                    s.data = format!("data-{attempts}");
                    s.client_port = free_port();
                    s.peer_port = free_port();
                }
                Err(e) => panic!("etcd did not start: {e}"),
            }
        }
    }

    /// Starts etcd on this server's ports and data dir and waits until it
    /// answers a member list naming this server's member.
    async fn spawn(&mut self) -> Result<(), String> {
        let bin = std::env::var("FLOE_ETCD").unwrap_or_else(|_| "etcd".into());
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(bin)
            .args(["--name", &self.name, "--data-dir"])
            .arg(self.dir.path().join(&self.data))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + ETCD_START;
        loop {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.child = None;
                return Err(format!("exited with {status} before answering"));
            }
            if self.answers_as_itself().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "did not answer as {} within {ETCD_START:?}",
                    self.name
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn answers_as_itself(&self) -> bool {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(2));
        let Ok(mut c) = etcd_client::Client::connect([self.endpoint()], Some(opts)).await else {
            return false;
        };
        c.member_list()
            .await
            .is_ok_and(|r| r.members().iter().any(|m| m.name() == self.name))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_real_etcd() {
    let Some(server) = EtcdServer::start().await else {
        return;
    };
    let store = Etcd::connect(vec![server.endpoint()], "conformance", &Default::default())
        .await
        .expect("connect");
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_across_an_etcd_restart_without_loss() {
    let Some(mut server) = EtcdServer::start().await else {
        return;
    };
    let store = Etcd::connect(vec![server.endpoint()], "resume", &Default::default())
        .await
        .expect("connect");
    let mut w = store.watch("k/", 0).await.expect("watch");
    let put = |i: usize| {
        Txn::default().and_then(vec![Op::Put(format!("k/{i}"), Bytes::from(i.to_string()))])
    };
    for i in 0..5 {
        store.txn(put(i)).await.expect("txn");
    }
    server.kill();
    server.spawn().await.expect("etcd restarts on its ports");
    // Writes right after the restart, possibly before the watch reconnects.
    let mut done = 5;
    let deadline = Instant::now() + Duration::from_secs(30);
    while done < 10 {
        match store.txn(put(done)).await {
            Ok(_) => done += 1,
            Err(e) => {
                assert!(Instant::now() < deadline, "etcd not writable again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let mut last = 0;
    for i in 0..10 {
        let e = tokio::time::timeout(Duration::from_secs(30), w.next())
            .await
            .expect("event in time")
            .expect("watch open")
            .expect("not an error");
        match e {
            Event::Put(kv) => {
                assert_eq!(
                    kv.key,
                    format!("k/{i}"),
                    "every change, in order, none twice"
                );
                assert!(kv.mod_revision > last);
                last = kv.mod_revision;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
