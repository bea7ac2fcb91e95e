//! The conformance suite every [`MetaStore`] backend passes.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::Bytes;

use crate::{prefix_end, Compare, MetaStore, Op, Txn};

/// Runs every check against an empty store. Panics on the first violation.
pub async fn run(store: Arc<dyn MetaStore>) {
    put_get_and_revisions(&*store).await;
    range_by_prefix(&*store).await;
    cas_branches(&*store).await;
    concurrent_cas_has_one_winner(store.clone()).await;
    op_limit(&*store).await;
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
    let keys = |v: Vec<crate::KeyValue>| v.into_iter().map(|kv| kv.key).collect::<Vec<_>>();
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

async fn op_limit(s: &dyn MetaStore) {
    let ops = (0..=Txn::OPS_MAX)
        .map(|i| put(&format!("lim/{i}"), "v"))
        .collect();
    assert!(s.txn(Txn::default().and_then(ops)).await.is_err());
    assert!(s.get("lim/0").await.unwrap().is_none(), "no partial apply");
}
