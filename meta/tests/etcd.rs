//! The metadata conformance suite against a real etcd, started here on
//! loopback (data dir in /dev/shm) and stopped by PID when the test ends.
//! With `FLOE_REQUIRE_ETCD=1` (the test command sets it) a missing etcd
//! binary fails the test instead of skipping it.

#![cfg(feature = "etcd")]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
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
    client_port: u16,
    peer_port: u16,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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

impl EtcdServer {
    fn start() -> Option<Self> {
        etcd_binary()?;
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let mut s = Self {
            child: None,
            dir: tempfile::tempdir_in(base).expect("tempdir"),
            client_port: free_port(),
            peer_port: free_port(),
        };
        s.spawn();
        Some(s)
    }

    fn spawn(&mut self) {
        let bin = std::env::var("FLOE_ETCD").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(bin)
            .args(["--name", "n1", "--data-dir"])
            .arg(self.dir.path().join("data"))
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
            .args(["--initial-cluster", &format!("n1={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.client_port)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
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
    let Some(server) = EtcdServer::start() else {
        return;
    };
    let store = Etcd::connect(vec![server.endpoint()], "conformance", &Default::default())
        .await
        .expect("connect");
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumes_across_an_etcd_restart_without_loss() {
    let Some(mut server) = EtcdServer::start() else {
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
    server.spawn();
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
