//! Which brokers a client is told about, at which address, and which one
//! "leads" each partition (or coordinates each consumer group).
//!
//! floe has no real leaders: any broker serves any partition. What a client
//! sees is decided per client, from its [`ClientView`]:
//!
//! 1. **Agent group**: only brokers of the answering broker's group, so a
//!    client that bootstrapped through group A never learns of group B.
//! 2. **Listener**: each broker's advertised address for the listener the
//!    client came in on; brokers without that listener are left out.
//! 3. **Zone**: a client that states its zone sees only that zone's brokers
//!    (all of them when its zone has none); an unzoned client sees all.
//! 4. **Per-client host override** (`host_override=` in `client.id`): that
//!    host replaces every broker's host, ports unchanged.
//! 5. **Load-balancer mode**: brokers left sharing one host:port (all behind
//!    one load balancer) get the letter case of that host varied per node
//!    id, so clients that key connections by address keep one per broker.
//!
//! Among the visible brokers, a partition's "leader" and a group's
//! coordinator are chosen by rendezvous hashing ([`leader`],
//! [`coordinator`]): every client of a partition in one zone meets on one
//! broker (its read cache), load spreads evenly, and a broker joining or
//! leaving moves only its own share. Every broker computes the same answer
//! from the same membership, so it does not matter which one a client asks.

use floe_meta::schema::{BrokerRecord, ListenerRecord};

use crate::broker::Broker;
use crate::client_id::ClientFeatures;

/// The agent group of a broker that registered none.
pub const DEFAULT_GROUP: &str = "default";

/// What floe knows about a client, which decides the brokers it sees.
/// Owned by the client's connection (see `conn`), read by handlers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientView {
    /// Lower-case name of the listener the client connected to.
    pub listener: String,
    /// The client's zone: from `client.id` features, else the `rack_id` it
    /// sent in Fetch.
    pub zone: Option<String>,
    /// Host to advertise instead of each broker's (ports unchanged).
    pub host_override: Option<String>,
}

impl ClientView {
    /// A view for a client of `listener` with no stated features.
    pub fn on_listener(listener: &str) -> Self {
        Self {
            listener: listener.to_string(),
            ..Self::default()
        }
    }

    /// This view with the features of a client id applied; `rack` (from
    /// Fetch) is the zone when the client id states none.
    pub fn with_features(&self, features: &ClientFeatures, rack: Option<&str>) -> Self {
        Self {
            listener: self.listener.clone(),
            zone: features
                .zone
                .clone()
                .or_else(|| rack.filter(|r| !r.is_empty()).map(str::to_string)),
            host_override: features.host_override.clone(),
        }
    }
}

/// A broker as one client must see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub node_id: i32,
    pub host: String,
    pub port: u16,
    /// The broker's zone (Kafka's rack), if it has one.
    pub rack: Option<String>,
    /// Whether it can serve: partitions are led only by ready brokers.
    pub ready: bool,
}

fn group_of(b: &BrokerRecord) -> &str {
    if b.group.is_empty() {
        DEFAULT_GROUP
    } else {
        &b.group
    }
}

/// This broker's own record: it is answering, so it is live whatever the
/// membership view says (which lags a few milliseconds at start-up), and
/// ready as its own health says now.
pub fn self_record(broker: &Broker) -> BrokerRecord {
    let st = &broker.settings;
    BrokerRecord {
        node_id: st.node_id,
        host: st.advertise_host.clone(),
        port: st.advertise_port,
        zone: st.zone.clone(),
        group: st.group.clone(),
        listeners: st.listeners.clone(),
        ready: broker.engine.unready_reason().is_none(),
    }
}

/// The brokers `view`'s client may use, by node id, at the addresses it
/// must use. Never empty when this broker has the client's listener.
pub fn visible_brokers(broker: &Broker, view: &ClientView) -> Vec<Advertised> {
    let live = broker.engine.live_brokers();
    select(&live, &self_record(broker), view)
}

/// Brokers that left the membership not long ago and that `view`'s client
/// would see were they live, for Metadata's broker list only: they lead no
/// partition, coordinate nothing and are never the controller, because
/// [`leader`], [`coordinator`] and the controller choice only look at
/// [`visible_brokers`]. See `floe_engine::cluster::Members::departed` for
/// why they stay listed.
pub fn departed_brokers(
    broker: &Broker,
    view: &ClientView,
    visible: &[Advertised],
) -> Vec<Advertised> {
    let departed = broker.engine.departed_brokers();
    if departed.is_empty() {
        return Vec::new();
    }
    select_departed(&departed, &self_record(broker), view, visible)
}

/// [`departed_brokers`] as a pure function: the departed records a client
/// with `view` would see, given what it sees of the live ones (`visible`,
/// from [`select`]), at the addresses it would use.
pub fn select_departed(
    departed: &[BrokerRecord],
    me: &BrokerRecord,
    view: &ClientView,
    visible: &[Advertised],
) -> Vec<Advertised> {
    let group = group_of(me);
    // The zone rule as `select` applied it: a zoned client sees its
    // zone's brokers when it has live ones there.
    let zone_kept = view
        .zone
        .as_deref()
        .filter(|z| visible.iter().any(|a| a.rack.as_deref() == Some(*z)));
    let mut all: Vec<Advertised> = visible.to_vec();
    let first_departed = all.len();
    for b in departed {
        if b.node_id == me.node_id
            || group_of(b) != group
            || visible.iter().any(|a| a.node_id == b.node_id)
            || zone_kept.is_some_and(|z| b.zone != z)
        {
            continue;
        }
        all.extend(advertise(b, view, false));
    }
    // Load-balancer mode over the whole list, so a departed broker keeps
    // the letter case it had while live.
    vary_shared_hosts(&mut all);
    all.split_off(first_departed)
}

/// [`visible_brokers`] as a pure function of the membership, the answering
/// broker's record and the client's view.
///
/// Brokers that are not ready stay in the list (marked), so that clients
/// keep their connections to them: librdkafka fails the requests in
/// flight to a broker that leaves Metadata as "not persisted", although
/// their commits may still land, and an idempotent producer then re-sends
/// them under a new epoch, as duplicates. Only partition leadership moves
/// away from them (see [`leader`]), and clients drain their requests to
/// the old leader before using the new one.
pub fn select(live: &[BrokerRecord], me: &BrokerRecord, view: &ClientView) -> Vec<Advertised> {
    let group = group_of(me);
    let mut candidates: Vec<&BrokerRecord> = live
        .iter()
        .filter(|b| b.node_id != me.node_id && group_of(b) == group)
        .collect();
    candidates.push(me);
    // Reachability through the client's listener first, so a zone whose
    // brokers all lack that listener falls back to the others.
    candidates.retain(|b| b.address(&view.listener).is_some());
    candidates.sort_by_key(|b| b.node_id);
    let in_zone = |b: &&BrokerRecord| view.zone.as_deref().is_some_and(|z| b.zone == z);
    if candidates.iter().any(in_zone) {
        candidates.retain(in_zone);
    }
    let mut out: Vec<Advertised> = candidates
        .into_iter()
        .filter_map(|b| advertise(b, view, b.ready))
        .collect();
    vary_shared_hosts(&mut out);
    out
}

/// `b` at the address `view`'s client must use, if it has that listener.
fn advertise(b: &BrokerRecord, view: &ClientView, ready: bool) -> Option<Advertised> {
    let (host, port) = b.address(&view.listener)?;
    Some(Advertised {
        node_id: b.node_id,
        host: view
            .host_override
            .clone()
            .unwrap_or_else(|| host.to_string()),
        port,
        rack: (!b.zone.is_empty()).then(|| b.zone.clone()),
        ready,
    })
}

/// Load-balancer mode: brokers sharing a host:port get distinct letter
/// cases of that host (DNS and /etc/hosts ignore case, clients' connection
/// maps do not).
fn vary_shared_hosts(brokers: &mut [Advertised]) {
    let key = |a: &Advertised| (a.host.to_ascii_lowercase(), a.port);
    let shared: Vec<bool> = brokers
        .iter()
        .map(|a| brokers.iter().filter(|b| key(b) == key(a)).count() > 1)
        .collect();
    for (a, shared) in brokers.iter_mut().zip(shared) {
        if shared {
            a.host = vary_case(&a.host, a.node_id);
        }
    }
}

/// `host` with its i-th letter upper-cased when bit i of `node_id` is set:
/// distinct for node ids below 2^(letters in host). A host without letters
/// (an IP address) cannot vary; see docs/network.md on load-balancer mode.
pub fn vary_case(host: &str, node_id: i32) -> String {
    let bits = node_id as u32 as u64;
    let mut letter = 0u32;
    host.chars()
        .map(|c| {
            if !c.is_ascii_alphabetic() {
                return c;
            }
            let upper = letter < 64 && bits >> letter & 1 == 1;
            letter += 1;
            if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect()
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finalizer: a stable, well-spread 64-bit hash.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The visible broker with the highest rendezvous weight for `key`.
fn rendezvous(brokers: &[Advertised], key: u64) -> Option<&Advertised> {
    brokers
        .iter()
        .max_by_key(|b| (mix(key ^ mix(b.node_id as u64)), b.node_id))
}

/// The broker named leader of a partition among the ready brokers of
/// `visible` (among all of them when none is ready, as when the metadata
/// store is away from every broker: moving then would help nobody).
pub fn leader(visible: &[Advertised], topic_id: uuid::Uuid, partition: u32) -> Option<i32> {
    let (hi, lo) = topic_id.as_u64_pair();
    let key = mix(hi ^ mix(lo ^ mix(u64::from(partition))));
    let ready: Vec<Advertised> = visible.iter().filter(|b| b.ready).cloned().collect();
    let pool = if ready.is_empty() { visible } else { &ready };
    rendezvous(pool, key).map(|b| b.node_id)
}

/// The broker that coordinates `key` (a consumer group id, a transactional
/// id) among `visible`: rendezvous hashing of the key's bytes.
pub fn coordinator<'a>(visible: &'a [Advertised], key: &[u8]) -> Option<&'a Advertised> {
    // FNV-1a: stable across processes and versions, unlike std's hasher.
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    rendezvous(visible, mix(h))
}

/// The listener records of this broker, for registration.
pub fn listener_records(listeners: &[crate::listener::Listener]) -> Vec<ListenerRecord> {
    listeners
        .iter()
        .map(|l| ListenerRecord {
            name: l.name.clone(),
            host: l.advertised_host.clone(),
            port: l.advertised_port,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: i32, zone: &str, group: &str) -> BrokerRecord {
        BrokerRecord {
            node_id: id,
            host: format!("legacy{id}"),
            port: 9000,
            zone: zone.into(),
            group: group.into(),
            listeners: vec![
                ListenerRecord {
                    name: "internal".into(),
                    host: format!("10.0.0.{id}"),
                    port: 9092,
                },
                ListenerRecord {
                    name: "external".into(),
                    host: format!("b{id}.example.com"),
                    port: 9094,
                },
            ],
            ready: true,
        }
    }

    fn adv(id: i32) -> Advertised {
        Advertised {
            node_id: id,
            host: "h".into(),
            port: 1,
            rack: None,
            ready: true,
        }
    }

    fn ids(v: &[Advertised]) -> Vec<i32> {
        v.iter().map(|a| a.node_id).collect()
    }

    fn view(listener: &str, zone: Option<&str>) -> ClientView {
        ClientView {
            listener: listener.into(),
            zone: zone.map(str::to_string),
            host_override: None,
        }
    }

    #[test]
    fn brokers_that_are_not_ready_lead_nothing_but_stay_listed() {
        let mut live = vec![rec(1, "", ""), rec(2, "", ""), rec(3, "", "")];
        live[1].ready = false;
        let visible = select(&live, &live[0], &view("internal", None));
        assert_eq!(ids(&visible), [1, 2, 3], "still listed");
        let topic = uuid::Uuid::from_u128(7);
        let leaders: Vec<i32> = (0..64).filter_map(|p| leader(&visible, topic, p)).collect();
        assert!(!leaders.contains(&2), "an unready broker leads nothing");
        assert!(leaders.contains(&1) && leaders.contains(&3));
        // Partitions of ready brokers do not move (rendezvous hashing).
        let all_ready = select(
            &[rec(1, "", ""), rec(2, "", ""), rec(3, "", "")],
            &live[0],
            &view("internal", None),
        );
        for p in 0..64 {
            let before = leader(&all_ready, topic, p);
            if before != Some(2) {
                assert_eq!(leader(&visible, topic, p), before);
            }
        }
        // Nobody ready: leadership stays where it was.
        for b in &mut live {
            b.ready = false;
        }
        let none_ready = select(&live, &live[0], &view("internal", None));
        for p in 0..64 {
            assert_eq!(leader(&none_ready, topic, p), leader(&all_ready, topic, p));
        }
    }

    #[test]
    fn departed_brokers_are_listed_as_the_client_would_see_them_and_lead_nothing() {
        let live = vec![rec(1, "a", ""), rec(2, "b", "")];
        let departed = vec![
            rec(2, "b", ""),      // back already: not listed twice
            rec(3, "b", ""),      // listed
            rec(4, "a", "batch"), // another agent group: never
            rec(5, "c", ""),      // listed unless the client's zone has live brokers
        ];
        let me = live[0].clone();
        let v = view("external", None);
        let visible = select(&live, &me, &v);
        let gone = select_departed(&departed, &me, &v, &visible);
        assert_eq!(ids(&gone), [3, 5]);
        assert!(gone.iter().all(|a| !a.ready));
        assert_eq!(
            gone[0].host, "b3.example.com",
            "the client's listener's address"
        );
        // A client in zone b sees zone b's departed brokers only.
        let vb = view("external", Some("b"));
        let visible_b = select(&live, &me, &vb);
        assert_eq!(ids(&select_departed(&departed, &me, &vb, &visible_b)), [3]);
        // Leaders and coordinators are chosen among the live only: listing
        // the departed changes neither.
        let topic = uuid::Uuid::from_u128(9);
        for p in 0..64 {
            let l = leader(&visible, topic, p).expect("a leader");
            assert!(l == 1 || l == 2);
        }
        // This broker never lists itself as departed, even if the
        // membership it last saw says it left.
        let mine = select_departed(std::slice::from_ref(&me), &me, &v, &visible);
        assert!(mine.is_empty());
        // Behind one load balancer a departed broker keeps its letter case.
        let mut lb = v.clone();
        lb.host_override = Some("lb".into());
        let visible_lb = select(&live, &me, &lb);
        let gone_lb = select_departed(&departed, &me, &lb, &visible_lb);
        let all_three = select(&[live[1].clone(), departed[1].clone()], &me, &lb);
        assert_eq!(gone_lb[0].host, all_three[2].host);
    }

    #[test]
    fn zones_groups_and_listeners() {
        let live = vec![
            rec(1, "a", ""),
            rec(2, "b", "default"),
            rec(3, "b", "default"),
            rec(4, "a", "batch"),
        ];
        let me = live[0].clone();
        assert_eq!(ids(&select(&live, &me, &view("internal", None))), [1, 2, 3]);
        assert_eq!(ids(&select(&live, &me, &view("internal", Some("a")))), [1]);
        assert_eq!(
            ids(&select(&live, &me, &view("internal", Some("b")))),
            [2, 3]
        );
        // A zone with no broker: all of the group.
        assert_eq!(
            ids(&select(&live, &me, &view("internal", Some("c")))),
            [1, 2, 3]
        );
        // Group `batch` sees only itself, even from zone b.
        let batch = select(&live, &live[3], &view("external", Some("b")));
        assert_eq!(ids(&batch), [4]);
        assert_eq!(batch[0].host, "b4.example.com");
        assert_eq!(batch[0].rack.as_deref(), Some("a"));
        // Addresses are the client's listener's.
        let ext = select(&live, &me, &view("external", None));
        assert_eq!(ext[1].host, "b2.example.com");
        assert_eq!(ext[1].port, 9094);
        // A listener nobody has: nobody (not even a wrong address).
        assert!(select(&live, &me, &view("other", None)).is_empty());
        // Zone a's only other broker lacks the client's listener: zone a
        // still has broker 1; a zone whose brokers all lack it falls back.
        let mut only_internal = rec(5, "c", "");
        only_internal.listeners.truncate(1);
        let mut live2 = live.clone();
        live2.push(only_internal);
        assert_eq!(
            ids(&select(&live2, &me, &view("external", Some("c")))),
            [1, 2, 3]
        );
        assert_eq!(ids(&select(&live2, &me, &view("internal", Some("c")))), [5]);
        // This broker is visible even before membership shows it.
        assert_eq!(
            ids(&select(&live[1..3], &me, &view("internal", None))),
            [1, 2, 3]
        );
    }

    #[test]
    fn older_records_use_their_single_address() {
        let mut old = rec(2, "", "");
        old.listeners.clear();
        let me = rec(1, "", "");
        let v = select(&[old], &me, &view("external", None));
        assert_eq!(v[1].host, "legacy2");
        assert_eq!(v[1].port, 9000);
    }

    #[test]
    fn host_override_keeps_ports_and_shared_hosts_vary_in_case() {
        let live = vec![rec(1, "", ""), rec(2, "", ""), rec(3, "", "")];
        let mut v = view("internal", None);
        v.host_override = Some("localhost".into());
        let seen = select(&live, &live[0], &v);
        let hosts: Vec<_> = seen.iter().map(|a| a.host.as_str()).collect();
        // All three share localhost:9092 now: load-balancer mode.
        assert_eq!(hosts, ["Localhost", "lOcalhost", "LOcalhost"]);
        assert!(seen.iter().all(|a| a.port == 9092));
        // Distinct hosts are left alone.
        let ext = select(&live, &live[0], &view("external", None));
        assert_eq!(ext[0].host, "b1.example.com");
    }

    #[test]
    fn case_variants_are_distinct_per_node() {
        let mut seen = std::collections::HashSet::new();
        for id in 0..1024 {
            let h = vary_case("lb.example.com", id);
            assert!(h.eq_ignore_ascii_case("lb.example.com"));
            assert!(seen.insert(h), "node {id} collides");
        }
        assert_eq!(vary_case("10.0.0.5", 3), "10.0.0.5");
    }

    #[test]
    fn spreads_evenly_and_moves_little() {
        let three = [adv(1), adv(2), adv(3)];
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
        let two = [adv(1), adv(3)];
        for (p, was) in before.iter().enumerate() {
            let now = leader(&two, topic, p as u32).expect("a leader");
            if *was != 2 {
                assert_eq!(now, *was, "partition {p} moved without need");
            }
        }
        assert_eq!(leader(&[], topic, 0), None);
    }

    #[test]
    fn coordinators_spread_and_are_stable() {
        let three = [adv(1), adv(2), adv(3)];
        let mut count = [0usize; 4];
        for g in 0..3000 {
            let key = format!("group-{g}");
            let c = coordinator(&three, key.as_bytes()).expect("one");
            assert_eq!(coordinator(&three, key.as_bytes()), Some(c));
            count[c.node_id as usize] += 1;
        }
        for n in 1..=3 {
            assert!((800..1200).contains(&count[n]), "uneven: {count:?}");
        }
        assert!(coordinator(&[], b"g").is_none());
    }
}
