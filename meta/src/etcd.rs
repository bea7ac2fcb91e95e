use std::time::Duration;

use bytes::Bytes;
use etcd_client::{
    Client, Compare as EtcdCompare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions,
    Txn as EtcdTxn, TxnOp, WatchOptions,
};
use futures::StreamExt;

use crate::embedded::async_stream;
use crate::{
    Compare, Error, Event, KeyValue, LeaseId, MetaStore, Op, Result, Txn, TxnOutcome, Watch,
};

/// Deadline of one etcd request; past it the request counts as failed
/// (and, for a transaction, its outcome as unknown).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between attempts to re-establish a broken watch.
const WATCH_RETRY_PAUSE: Duration = Duration::from_millis(250);

/// The etcd backend. Every key is stored under `prefix/` so several
/// clusters (or tests) can share one etcd.
#[derive(Clone)]
pub struct Etcd {
    client: Client,
    prefix: String,
    endpoints: Vec<String>,
}

fn unavailable(op: &'static str) -> impl FnOnce(etcd_client::Error) -> Error {
    move |e| Error::Unavailable {
        op,
        reason: e.to_string(),
    }
}

fn revision_of(h: Option<&etcd_client::ResponseHeader>) -> u64 {
    h.map_or(0, |h| h.revision().max(0) as u64)
}

impl Etcd {
    pub async fn connect(
        endpoints: Vec<String>,
        prefix: &str,
        security: &crate::EtcdSecurity,
    ) -> Result<Self> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let Some(ca) = &security.ca_pem {
            let mut tls = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(ca));
            if let Some((cert, key)) = &security.client_pem {
                tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(tls);
        }
        if let Some((user, password)) = &security.user {
            opts = opts
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        let client =
            Client::connect(&endpoints, Some(opts))
                .await
                .map_err(|e| Error::Unavailable {
                    op: "connect",
                    reason: format!("{endpoints:?}: {e}"),
                })?;
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        Ok(Self {
            client,
            prefix,
            endpoints,
        })
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    fn kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        let key = kv.key_str().map_err(|e| Error::Corrupt {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            reason: e.to_string(),
        })?;
        Ok(KeyValue {
            key: key.strip_prefix(&self.prefix).unwrap_or(key).to_string(),
            value: Bytes::copy_from_slice(kv.value()),
            create_revision: kv.create_revision().max(0) as u64,
            mod_revision: kv.mod_revision().max(0) as u64,
        })
    }

    fn op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put(k, v) => TxnOp::put(self.full(k), v.to_vec(), None),
            Op::PutLeased(k, v, lease) => TxnOp::put(
                self.full(k),
                v.to_vec(),
                Some(PutOptions::new().with_lease(*lease)),
            ),
            Op::Delete(k) => TxnOp::delete(self.full(k), None),
        }
    }

    fn event(&self, e: &etcd_client::Event) -> Result<Option<Event>> {
        let Some(kv) = e.kv() else {
            return Ok(None);
        };
        let kv = self.kv(kv)?;
        Ok(Some(match e.event_type() {
            EventType::Put => Event::Put(kv),
            EventType::Delete => Event::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            },
        }))
    }
}

#[async_trait::async_trait]
impl MetaStore for Etcd {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let mut c = self.client.clone();
        let r = c
            .get(self.full(key), None)
            .await
            .map_err(unavailable("get"))?;
        r.kvs().first().map(|kv| self.kv(kv)).transpose()
    }

    async fn range(&self, start: &str, end: &str, limit: usize) -> Result<Vec<KeyValue>> {
        if start >= end {
            return Ok(Vec::new());
        }
        let mut c = self.client.clone();
        let opts = GetOptions::new()
            .with_range(self.full(end))
            .with_limit(i64::try_from(limit).unwrap_or(0));
        let r = c
            .get(self.full(start), Some(opts))
            .await
            .map_err(unavailable("range"))?;
        r.kvs().iter().map(|kv| self.kv(kv)).collect()
    }

    async fn txn(&self, txn: Txn) -> Result<TxnOutcome> {
        let ops = txn.compares.len() + txn.success.len().max(txn.failure.len());
        if ops > Txn::OPS_MAX {
            return Err(Error::TooManyOps {
                ops,
                limit: Txn::OPS_MAX,
            });
        }
        let compares: Vec<EtcdCompare> = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision(k, rev) => {
                    EtcdCompare::mod_revision(self.full(k), CompareOp::Equal, *rev as i64)
                }
                Compare::Value(k, v) => {
                    EtcdCompare::value(self.full(k), CompareOp::Equal, v.to_vec())
                }
                Compare::CreateRevision(k, rev) => {
                    EtcdCompare::create_revision(self.full(k), CompareOp::Equal, *rev as i64)
                }
            })
            .collect();
        let t = EtcdTxn::new()
            .when(compares)
            .and_then(txn.success.iter().map(|o| self.op(o)).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(|o| self.op(o)).collect::<Vec<_>>());
        let mut c = self.client.clone();
        let r = c.txn(t).await.map_err(unavailable("txn"))?;
        Ok(TxnOutcome {
            succeeded: r.succeeded(),
            revision: revision_of(r.header()),
        })
    }

    async fn revision(&self) -> Result<u64> {
        let mut c = self.client.clone();
        let r = c
            .get(self.full(""), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(unavailable("revision"))?;
        Ok(revision_of(r.header()))
    }

    async fn watch(&self, prefix: &str, from_revision: u64) -> Result<Watch> {
        let from = if from_revision == 0 {
            self.revision().await? + 1
        } else {
            from_revision
        };
        let me = self.clone();
        let prefix = prefix.to_string();
        let stream = async_stream(move |tx| async move {
            let mut next = from;
            loop {
                let mut c = me.client.clone();
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(next as i64);
                let mut ws = match c.watch(me.full(&prefix), Some(opts)).await {
                    Ok(ws) => ws,
                    Err(e) => {
                        tracing::debug!(error = %e, prefix, "etcd watch failed to start; retrying");
                        if tx.is_closed() {
                            return;
                        }
                        tokio::time::sleep(WATCH_RETRY_PAUSE).await;
                        continue;
                    }
                };
                loop {
                    let msg = match ws.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) | Err(_) => break,
                    };
                    if msg.compact_revision() > 0 && (msg.compact_revision() as u64) >= next {
                        let _ = tx
                            .send(Err(Error::Compacted {
                                prefix: prefix.clone(),
                                revision: next,
                                compacted: msg.compact_revision() as u64,
                            }))
                            .await;
                        return;
                    }
                    for e in msg.events() {
                        match me.event(e) {
                            Ok(Some(ev)) => {
                                next = ev.revision() + 1;
                                if tx.send(Ok(ev)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => {}
                            Err(err) => {
                                let _ = tx.send(Err(err)).await;
                                return;
                            }
                        }
                    }
                    if msg.canceled() {
                        break;
                    }
                }
                if tx.is_closed() {
                    return;
                }
                // The connection broke: resume after the last revision seen.
                tokio::time::sleep(WATCH_RETRY_PAUSE).await;
            }
        });
        Ok(stream.boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        let mut c = self.client.clone();
        let secs = ttl.as_secs().max(1) as i64;
        let r = c
            .lease_grant(secs, None)
            .await
            .map_err(unavailable("lease_grant"))?;
        Ok(r.id())
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        // A lease that expired while this client was cut off is reported
        // either as a zero TTL or as an error saying it is not found; both
        // mean "register again", never "try the same lease later".
        let gone = |e: etcd_client::Error| {
            // etcd says "etcdserver: requested lease not found" (a gRPC
            // status) or the client "lease keep alive error: lease not found".
            if e.to_string().contains("lease not found") {
                Error::LeaseExpired { lease }
            } else {
                unavailable("keep_alive")(e)
            }
        };
        let mut c = self.client.clone();
        let (mut keeper, mut stream) = c.lease_keep_alive(lease).await.map_err(gone)?;
        keeper.keep_alive().await.map_err(gone)?;
        match stream.message().await.map_err(gone)? {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(Error::LeaseExpired { lease }),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut c = self.client.clone();
        c.lease_revoke(lease)
            .await
            .map_err(unavailable("lease_revoke"))?;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "etcd://{}/{}",
            self.endpoints.join(","),
            self.prefix.trim_end_matches('/')
        )
    }
}
