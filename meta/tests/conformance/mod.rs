//! The conformance suite every [`MetaStore`] backend passes. Test code
//! only: the backends' unit tests include it from `src/lib.rs`, and the
//! integration test against a real etcd with `mod conformance;`. Either way
//! it names the crate `floe_meta`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use floe_meta::{prefix_end, take_next, Compare, Event, KeyValue, MetaStore, Op, Txn, Watch};
use futures::StreamExt;

/// Runs every check against an empty store. Panics on the first violation.
pub async fn run(store: Arc<dyn MetaStore>) {
    put_get_and_revisions(&*store).await;
    range_by_prefix(&*store).await;
    cas_branches(&*store).await;
    concurrent_cas_has_one_winner(store.clone()).await;
    counters_hand_out_distinct_values(store.clone()).await;
    op_limit(&*store).await;
    watch_delivers_changes_in_order(&*store).await;
    watch_replays_from_a_past_revision(&*store).await;
    leases(&*store).await;
}

/// Bound on waiting for a watch event in the suite.
const EVENT_WAIT: Duration = Duration::from_secs(10);

async fn next_event(w: &mut Watch) -> Event {
    tokio::time::timeout(EVENT_WAIT, w.next())
        .await
        .expect("watch event within the wait")
        .expect("watch still open")
        .expect("watch event, not an error")
}

async fn watch_delivers_changes_in_order(s: &dyn MetaStore) {
    let mut w = s.watch("w/", 0).await.unwrap();
    let mut expected = Vec::new();
    for i in 0..20 {
        let key = format!("w/{}", i % 3);
        let r = s
            .txn(Txn::default().and_then(vec![put(&key, &i.to_string())]))
            .await
            .unwrap();
        expected.push((key, r.revision, true));
        // Outside the prefix: never delivered.
        s.txn(Txn::default().and_then(vec![put("wx", "n")]))
            .await
            .unwrap();
    }
    let r = s
        .txn(Txn::default().and_then(vec![Op::Delete("w/1".into())]))
        .await
        .unwrap();
    expected.push(("w/1".into(), r.revision, false));
    let mut last = 0;
    for (key, rev, is_put) in expected {
        let e = next_event(&mut w).await;
        assert_eq!(e.key(), key);
        assert_eq!(e.revision(), rev);
        assert!(e.revision() > last, "revisions must increase");
        last = e.revision();
        assert_eq!(matches!(e, Event::Put(_)), is_put);
    }
}

async fn watch_replays_from_a_past_revision(s: &dyn MetaStore) {
    // What a watcher that lost its connection does: start again after the
    // last revision it saw, and get everything since, in order.
    let first = s
        .txn(Txn::default().and_then(vec![put("rw/a", "1")]))
        .await
        .unwrap();
    let second = s
        .txn(Txn::default().and_then(vec![put("rw/b", "2"), put("rw/c", "3")]))
        .await
        .unwrap();
    let third = s
        .txn(Txn::default().and_then(vec![put("rw/a", "4")]))
        .await
        .unwrap();
    let mut w = s.watch("rw/", first.revision + 1).await.unwrap();
    let got: Vec<(String, u64)> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            let e = next_event(&mut w).await;
            v.push((e.key().to_string(), e.revision()));
        }
        v
    };
    assert_eq!(
        got,
        vec![
            ("rw/b".to_string(), second.revision),
            ("rw/c".to_string(), second.revision),
            ("rw/a".to_string(), third.revision)
        ]
    );
    // And it continues live.
    let fourth = s
        .txn(Txn::default().and_then(vec![put("rw/d", "5")]))
        .await
        .unwrap();
    let e = next_event(&mut w).await;
    assert_eq!((e.key(), e.revision()), ("rw/d", fourth.revision));
}

async fn leases(s: &dyn MetaStore) {
    // Kept alive: the key stays past its TTL.
    let kept = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    let short = s.grant_lease(Duration::from_secs(2)).await.unwrap();
    s.txn(Txn::default().and_then(vec![
        Op::PutLeased("l/kept".into(), Bytes::from("k"), kept),
        Op::PutLeased("l/short".into(), Bytes::from("s"), short),
    ]))
    .await
    .unwrap();
    let mut w = s.watch("l/short", 0).await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.keep_alive(kept).await.unwrap();
    }
    assert!(
        s.get("l/kept").await.unwrap().is_some(),
        "a kept-alive lease keeps its key"
    );
    // Expired: its key is deleted, and watchers see the delete.
    assert!(
        s.get("l/short").await.unwrap().is_none(),
        "an expired lease removes its key"
    );
    assert!(matches!(next_event(&mut w).await, Event::Delete { .. }));
    assert!(
        s.keep_alive(short).await.is_err(),
        "an expired lease cannot be kept alive"
    );
    assert!(
        s.txn(Txn::default().and_then(vec![Op::PutLeased(
            "l/late".into(),
            Bytes::from("x"),
            short
        )]))
        .await
        .is_err(),
        "puts under an expired lease fail"
    );
    // Revoked: its key goes at once.
    s.revoke_lease(kept).await.unwrap();
    assert!(
        s.get("l/kept").await.unwrap().is_none(),
        "revoking a lease removes its key"
    );
}

fn put(k: &str, v: &str) -> Op {
    Op::Put(k.to_string(), Bytes::from(v.to_string()))
}

async fn put_get_and_revisions(s: &dyn MetaStore) {
    assert!(s.get("a/x").await.unwrap().is_none());
    let r1 = s
        .txn(Txn::default().and_then(vec![put("a/x", "1")]))
        .await
        .unwrap();
    assert!(r1.succeeded);
    let r2 = s
        .txn(Txn::default().and_then(vec![put("a/x", "2")]))
        .await
        .unwrap();
    assert!(r2.revision > r1.revision, "revisions must increase");
    let kv = s.get("a/x").await.unwrap().unwrap();
    assert_eq!(&kv.value[..], b"2");
    assert_eq!(kv.create_revision, r1.revision);
    assert_eq!(kv.mod_revision, r2.revision);
    s.txn(Txn::default().and_then(vec![Op::Delete("a/x".into())]))
        .await
        .unwrap();
    assert!(s.get("a/x").await.unwrap().is_none());
}

async fn range_by_prefix(s: &dyn MetaStore) {
    let ops = ["r/a", "r/b", "r/c", "rz"].map(|k| put(k, k)).to_vec();
    s.txn(Txn::default().and_then(ops)).await.unwrap();
    let keys = |v: Vec<KeyValue>| v.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
    let all = s.range("r/", &prefix_end("r/"), usize::MAX).await.unwrap();
    assert_eq!(keys(all), ["r/a", "r/b", "r/c"]);
    let two = s.range("r/", &prefix_end("r/"), 2).await.unwrap();
    assert_eq!(keys(two), ["r/a", "r/b"]);
    let from_b = s.range("r/b", &prefix_end("r/"), 10).await.unwrap();
    assert_eq!(keys(from_b), ["r/b", "r/c"]);
}

async fn cas_branches(s: &dyn MetaStore) {
    // Create-if-absent.
    let absent = Txn::when(vec![Compare::ModRevision("c/k".into(), 0)])
        .and_then(vec![put("c/k", "first")])
        .or_else(vec![put("c/lost", "1")]);
    assert!(s.txn(absent.clone()).await.unwrap().succeeded);
    assert!(!s.txn(absent).await.unwrap().succeeded);
    assert!(
        s.get("c/lost").await.unwrap().is_some(),
        "failure branch runs"
    );
    assert_eq!(&s.get("c/k").await.unwrap().unwrap().value[..], b"first");
    // Compare on value.
    let wrong = Txn::when(vec![Compare::Value("c/k".into(), Bytes::from("nope"))])
        .and_then(vec![put("c/k", "x")]);
    assert!(!s.txn(wrong).await.unwrap().succeeded);
    let right = Txn::when(vec![Compare::Value("c/k".into(), Bytes::from("first"))])
        .and_then(vec![put("c/k", "second")]);
    assert!(s.txn(right).await.unwrap().succeeded);
    // Compare on the create revision: rewrites keep it, a delete and a
    // new put change it.
    let created = s.get("c/k").await.unwrap().unwrap().create_revision;
    assert!(created > 0);
    let fenced = |rev| {
        Txn::when(vec![Compare::CreateRevision("c/k".into(), rev)]).and_then(vec![put("c/f", "1")])
    };
    assert!(s.txn(fenced(created)).await.unwrap().succeeded);
    s.txn(Txn::default().and_then(vec![Op::Delete("c/k".into())]))
        .await
        .unwrap();
    assert!(!s.txn(fenced(created)).await.unwrap().succeeded);
    assert!(s.txn(fenced(0)).await.unwrap().succeeded, "0 means absent");
    s.txn(Txn::default().and_then(vec![put("c/k", "again")]))
        .await
        .unwrap();
    assert!(
        !s.txn(fenced(created)).await.unwrap().succeeded,
        "created again"
    );
}

async fn concurrent_cas_has_one_winner(s: Arc<dyn MetaStore>) {
    const CONTENDERS: usize = 20;
    let base = s
        .get("cas/head")
        .await
        .unwrap()
        .map_or(0, |kv| kv.mod_revision);
    let mut tasks = Vec::new();
    for i in 0..CONTENDERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let t = Txn::when(vec![Compare::ModRevision("cas/head".into(), base)])
                .and_then(vec![put("cas/head", &i.to_string())]);
            s.txn(t).await.unwrap().succeeded
        }));
    }
    let mut winners = 0;
    for t in tasks {
        winners += usize::from(t.await.unwrap());
    }
    assert_eq!(winners, 1, "exactly one concurrent CAS must win");
}

async fn counters_hand_out_distinct_values(s: Arc<dyn MetaStore>) {
    assert_eq!(take_next(&*s, "ctr/a", 5).await.unwrap(), 5);
    assert_eq!(take_next(&*s, "ctr/a", 5).await.unwrap(), 6);
    let mut tasks = Vec::new();
    // Four contenders: each take succeeds within a few CAS attempts, far
    // inside COUNTER_ATTEMPTS_MAX.
    for _ in 0..4 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..4 {
                got.push(take_next(&*s, "ctr/b", 1).await.unwrap());
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    assert_eq!(
        all,
        (1..=16).collect::<Vec<i64>>(),
        "every take gets its own value"
    );
}

async fn op_limit(s: &dyn MetaStore) {
    let ops = (0..=Txn::OPS_MAX)
        .map(|i| put(&format!("lim/{i}"), "v"))
        .collect();
    assert!(s.txn(Txn::default().and_then(ops)).await.is_err());
    assert!(s.get("lim/0").await.unwrap().is_none(), "no partial apply");
}
