//! Connection balance across shards.
//!
//! Every shard accepts on every listener (SO_REUSEPORT), and the kernel
//! picks the shard by a hash of the connection's addresses. Kafka clients
//! open one connection per broker, so a broker often has a handful of
//! connections, and a hash leaves some shards with all of them: with two
//! producers on two shards, half the runs had both on one shard, which then
//! received, decoded and checked every byte while the other core idled.
//!
//! So a shard that accepts a connection while another shard serves fewer
//! hands it over: it duplicates the socket (`dup`, no unsafe code), closes
//! its own descriptor and sends the duplicate down that shard's channel;
//! the receiving shard wraps it in its own glommio stream and serves it
//! (TLS handshake included). Counts change once per connection, never per
//! request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A connection on its way to another shard.
pub struct Moved {
    /// Index of the listener it arrived on (the same on every shard).
    pub listener: usize,
    pub socket: socket2::Socket,
    pub peer: SocketAddr,
}

/// Live connections per shard, and each shard's inbox for moved ones.
pub struct Balance {
    live: Vec<AtomicUsize>,
    inboxes: Vec<flume::Sender<Moved>>,
}

/// Moved connections a shard may have queued (a bound, not a rate limit:
/// each is taken within one scheduling round).
const INBOX_MAX: usize = 1024;

impl Balance {
    pub fn new(shards: usize) -> (Self, Vec<flume::Receiver<Moved>>) {
        let (inboxes, outs) = (0..shards).map(|_| flume::bounded(INBOX_MAX)).unzip();
        let live = (0..shards).map(|_| AtomicUsize::new(0)).collect();
        (Self { live, inboxes }, outs)
    }

    /// Which shard serves a connection accepted on `here`, counted as open
    /// there from now on (so two shards accepting at once do not both pick
    /// the same idle one). [`Balance::closed`] ends the count.
    pub fn place(&self, here: usize) -> usize {
        let to = least_loaded(&self.loads(), here);
        self.live[to].fetch_add(1, Ordering::Relaxed);
        to
    }

    /// Counts a connection as open on `shard` (one that was not placed,
    /// e.g. a failed hand-over served where it was accepted).
    pub fn opened(&self, shard: usize) {
        self.live[shard].fetch_add(1, Ordering::Relaxed);
    }

    pub fn closed(&self, shard: usize) {
        self.live[shard].fetch_sub(1, Ordering::Relaxed);
    }

    /// Live connections per shard (a gauge for /metrics).
    pub fn loads(&self) -> Vec<usize> {
        self.live
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .collect()
    }

    /// Queues `m` for shard `to`; gives it back when that inbox is full or
    /// gone (shutting down).
    pub fn send(&self, to: usize, m: Moved) -> Result<(), Moved> {
        self.inboxes[to].try_send(m).map_err(|e| e.into_inner())
    }
}

/// The shard with the fewest connections; `here` unless another has
/// strictly fewer, so a balanced broker moves nothing.
pub fn least_loaded(loads: &[usize], here: usize) -> usize {
    let mut best = here;
    for (i, &l) in loads.iter().enumerate() {
        if l < loads[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_unless_another_shard_has_fewer() {
        assert_eq!(least_loaded(&[1, 1], 0), 0);
        assert_eq!(least_loaded(&[1, 1], 1), 1);
        assert_eq!(least_loaded(&[1, 0], 0), 1);
        assert_eq!(least_loaded(&[3, 2, 0, 0], 1), 2);
        assert_eq!(least_loaded(&[0], 0), 0);
    }

    /// Connections accepted on one shard end up spread over all of them.
    #[test]
    fn a_burst_on_one_shard_spreads() {
        let (b, _rx) = Balance::new(4);
        let mut served = [0; 4];
        for _ in 0..10 {
            served[b.place(0)] += 1;
        }
        assert_eq!(served, [3, 3, 2, 2]);
        b.closed(1);
        b.closed(1);
        assert_eq!(b.place(3), 1);
    }
}
