//! The conformance suite every [`ObjectStore`] backend passes. Test code
//! only: the backends' unit tests include it from `src/lib.rs`, and the
//! integration tests against real servers with `mod conformance;`. Either
//! way it names the crate `floe_objstore`.

use bytes::Bytes;
use floe_objstore::{Error, ObjectMeta, ObjectStore};

/// Runs every check against an empty store. Panics on the first violation.
pub async fn run(store: &dyn ObjectStore) {
    put_get_roundtrip(store).await;
    put_is_concatenation_of_parts(store).await;
    ranged_reads(store).await;
    large_ranges_outlive_overwrite_and_delete(store).await;
    overwrite_replaces_whole(store).await;
    missing_and_delete(store).await;
    list_by_prefix(store).await;
    list_reports_last_modified(store).await;
    rejects_bad_keys(store).await;
}

async fn put_get_roundtrip(s: &dyn ObjectStore) {
    s.put("c/a", vec![Bytes::from_static(b"hello")])
        .await
        .unwrap();
    assert_eq!(s.get("c/a").await.unwrap(), Bytes::from_static(b"hello"));
    s.put("c/empty", vec![]).await.unwrap();
    assert_eq!(s.get("c/empty").await.unwrap().len(), 0);
}

async fn put_is_concatenation_of_parts(s: &dyn ObjectStore) {
    let parts: Vec<Bytes> = (0..50u8)
        .map(|i| Bytes::from(vec![i; i as usize]))
        .collect();
    let whole: Vec<u8> = parts.iter().flat_map(|p| p.iter().copied()).collect();
    s.put("c/parts", parts).await.unwrap();
    assert_eq!(s.get("c/parts").await.unwrap(), Bytes::from(whole));
}

async fn ranged_reads(s: &dyn ObjectStore) {
    let data: Vec<u8> = (0..=255u8).collect();
    s.put("c/range", vec![Bytes::from(data.clone())])
        .await
        .unwrap();
    assert_eq!(
        &s.get_range("c/range", 10..20).await.unwrap()[..],
        &data[10..20]
    );
    assert_eq!(s.get_range("c/range", 7..7).await.unwrap().len(), 0);
    assert_eq!(
        &s.get_range("c/range", 0..256).await.unwrap()[..],
        &data[..]
    );
    assert!(matches!(
        s.get_range("c/range", 250..300).await,
        Err(Error::RangeOutOfBounds { .. })
    ));
}

/// Large ranges (catch-up reads; the local store maps these) at offsets
/// that are not page-aligned, and bytes already read keep their contents
/// when the object is then overwritten or deleted.
async fn large_ranges_outlive_overwrite_and_delete(s: &dyn ObjectStore) {
    let data: Vec<u8> = (0..(1 << 20) + 123u32).map(|i| (i % 251) as u8).collect();
    s.put("c/large", vec![Bytes::from(data.clone())])
        .await
        .unwrap();
    let across = 4097..4097 + 300_000;
    let held = s.get_range("c/large", across.clone()).await.unwrap();
    assert_eq!(&held[..], &data[across.start as usize..across.end as usize]);
    let whole = s.get_range("c/large", 0..data.len() as u64).await.unwrap();
    assert_eq!(&whole[..], &data[..]);
    let tail = (data.len() - 400_000) as u64..data.len() as u64;
    assert_eq!(
        &s.get_range("c/large", tail.clone()).await.unwrap()[..],
        &data[tail.start as usize..]
    );
    s.put("c/large", vec![Bytes::from(vec![7u8; data.len()])])
        .await
        .unwrap();
    assert_eq!(&held[..], &data[across.start as usize..across.end as usize]);
    s.delete("c/large").await.unwrap();
    assert_eq!(&whole[..], &data[..]);
    assert!(matches!(
        s.get_range("c/large", across).await,
        Err(Error::NotFound { .. })
    ));
}

async fn overwrite_replaces_whole(s: &dyn ObjectStore) {
    s.put("c/ow", vec![Bytes::from_static(b"long original")])
        .await
        .unwrap();
    s.put("c/ow", vec![Bytes::from_static(b"short")])
        .await
        .unwrap();
    assert_eq!(s.get("c/ow").await.unwrap(), Bytes::from_static(b"short"));
}

async fn missing_and_delete(s: &dyn ObjectStore) {
    assert!(matches!(s.get("c/nope").await, Err(Error::NotFound { .. })));
    assert!(matches!(
        s.get_range("c/nope", 0..1).await,
        Err(Error::NotFound { .. })
    ));
    s.put("c/del", vec![Bytes::from_static(b"x")])
        .await
        .unwrap();
    s.delete("c/del").await.unwrap();
    assert!(matches!(s.get("c/del").await, Err(Error::NotFound { .. })));
    s.delete("c/del").await.unwrap();
}

async fn list_by_prefix(s: &dyn ObjectStore) {
    for k in ["l/a/1", "l/a/2", "l/b/1", "l/ab"] {
        s.put(k, vec![Bytes::from(k.as_bytes().to_vec())])
            .await
            .unwrap();
    }
    let keys = |v: Vec<ObjectMeta>| v.into_iter().map(|m| m.key).collect::<Vec<_>>();
    assert_eq!(keys(s.list("l/a/").await.unwrap()), ["l/a/1", "l/a/2"]);
    assert_eq!(
        keys(s.list("l/a").await.unwrap()),
        ["l/a/1", "l/a/2", "l/ab"]
    );
    assert_eq!(s.list("l/").await.unwrap().len(), 4);
    assert!(s.list("zzz/").await.unwrap().is_empty());
    let m = s.list("l/b/").await.unwrap();
    assert_eq!(m[0].size, 5);
}

/// `last_modified` is when the object was written: lifecycle deletes
/// uncommitted objects by age, so a backend that reported the epoch (or a
/// time in the future) would make every fresh upload look abandoned (or
/// none ever). Servers' clocks may differ from ours by a little, and S3
/// keeps whole seconds.
async fn list_reports_last_modified(s: &dyn ObjectStore) {
    use std::time::{Duration, SystemTime};
    let slack = Duration::from_secs(300);
    let before = SystemTime::now();
    s.put("m/new", vec![Bytes::from_static(b"x")])
        .await
        .unwrap();
    let after = SystemTime::now();
    let m = s.list("m/").await.unwrap();
    assert_eq!(m.len(), 1);
    let at = m[0].last_modified;
    assert!(
        at + slack >= before && at <= after + slack,
        "last_modified {at:?} is not near the put ({before:?}..{after:?})"
    );
    // An overwrite is a new write: its time does not go backwards.
    s.put("m/new", vec![Bytes::from_static(b"y")])
        .await
        .unwrap();
    let again = s.list("m/").await.unwrap()[0].last_modified;
    assert!(again >= at, "{again:?} < {at:?}");
}

async fn rejects_bad_keys(s: &dyn ObjectStore) {
    for k in ["", "/x", "a/../b"] {
        assert!(matches!(
            s.put(k, vec![]).await,
            Err(Error::InvalidKey { .. })
        ));
    }
}
