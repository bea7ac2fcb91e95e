//! Which brokers a client is told about, and which one "leads" each
//! partition. floe has no real leaders: any broker serves any partition.
//! Naming one per partition by rendezvous hashing makes every client of a
//! partition meet on the same broker (its read cache), spreads partitions
//! evenly, and moves only the partitions of a broker that joins or leaves.

use floe_meta::schema::BrokerRecord;

use crate::broker::Broker;

/// The live brokers to advertise, always including this one (it is
/// answering, whatever the membership view says).
pub fn brokers(broker: &Broker) -> Vec<BrokerRecord> {
    let st = &broker.settings;
    let mut live: Vec<BrokerRecord> = broker.engine.members.live().iter().cloned().collect();
    if !live.iter().any(|b| b.node_id == st.node_id) {
        live.push(BrokerRecord {
            node_id: st.node_id,
            host: st.advertise_host.clone(),
            port: st.advertise_port,
            zone: String::new(),
            group: String::new(),
        });
        live.sort_by_key(|b| b.node_id);
    }
    live
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finalizer: a stable, well-spread 64-bit hash.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Rendezvous (highest random weight) choice of a partition's broker.
pub fn leader(brokers: &[BrokerRecord], topic_id: uuid::Uuid, partition: u32) -> Option<i32> {
    let (hi, lo) = topic_id.as_u64_pair();
    let key = mix(hi ^ mix(lo ^ mix(u64::from(partition))));
    brokers
        .iter()
        .max_by_key(|b| (mix(key ^ mix(b.node_id as u64)), b.node_id))
        .map(|b| b.node_id)
}

/// Rendezvous choice of the broker to coordinate a consumer group, by a
/// stable hash of its id (FNV-1a, then the same mixing as partitions).
pub fn coordinator(brokers: &[BrokerRecord], group: &str) -> Option<i32> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in group.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let key = mix(h);
    brokers
        .iter()
        .max_by_key(|b| (mix(key ^ mix(b.node_id as u64)), b.node_id))
        .map(|b| b.node_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: i32) -> BrokerRecord {
        BrokerRecord {
            node_id: id,
            host: "h".into(),
            port: 1,
            zone: String::new(),
            group: String::new(),
        }
    }

    #[test]
    fn spreads_evenly_and_moves_little() {
        let three = [b(1), b(2), b(3)];
        let topic = uuid::Uuid::from_u128(0x1234_5678);
        let mut count = [0usize; 4];
        let mut before = Vec::new();
        for p in 0..3000 {
            let l = leader(&three, topic, p).expect("a leader");
            count[l as usize] += 1;
            before.push(l);
        }
        for n in 1..=3 {
            assert!((800..1200).contains(&count[n]), "uneven: {count:?}");
        }
        // Broker 2 leaves: only its partitions move.
        let two = [b(1), b(3)];
        for (p, was) in before.iter().enumerate() {
            let now = leader(&two, topic, p as u32).expect("a leader");
            if *was != 2 {
                assert_eq!(now, *was, "partition {p} moved without need");
            }
        }
        assert_eq!(leader(&[], topic, 0), None);
    }
}
