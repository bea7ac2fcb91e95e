//! `floe groups list|describe`: consumer groups as any Kafka client sees
//! them, through the Kafka protocol (so it works against any broker of the
//! cluster, or any Kafka-compatible broker): members, assignments,
//! committed offsets and lag.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Buf;
use clap::{Args, Subcommand};
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::consumer_group_describe_request::ConsumerGroupDescribeRequest;
use kafka_protocol::messages::consumer_group_describe_response::ConsumerGroupDescribeResponse;
use kafka_protocol::messages::describe_groups_request::DescribeGroupsRequest;
use kafka_protocol::messages::describe_groups_response::DescribeGroupsResponse;
use kafka_protocol::messages::find_coordinator_request::FindCoordinatorRequest;
use kafka_protocol::messages::find_coordinator_response::FindCoordinatorResponse;
use kafka_protocol::messages::list_groups_request::ListGroupsRequest;
use kafka_protocol::messages::list_groups_response::ListGroupsResponse;
use kafka_protocol::messages::list_offsets_request::{
    ListOffsetsPartition, ListOffsetsRequest, ListOffsetsTopic,
};
use kafka_protocol::messages::list_offsets_response::ListOffsetsResponse;
use kafka_protocol::messages::metadata_request::MetadataRequest;
use kafka_protocol::messages::metadata_response::MetadataResponse;
use kafka_protocol::messages::offset_fetch_request::{OffsetFetchRequest, OffsetFetchRequestGroup};
use kafka_protocol::messages::offset_fetch_response::OffsetFetchResponse;
use kafka_protocol::messages::{ApiKey, BrokerId, ConsumerProtocolAssignment, GroupId, TopicName};
use kafka_protocol::protocol::{Decodable, StrBytes};

use crate::kafka_client::{split_host_port, ClientError, KafkaConn};

/// Who holds each partition: (topic, partition) -> client id.
type Holders = BTreeMap<(String, i32), String>;

/// Longest wait for any one answer.
const IO_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Args)]
pub struct GroupsArgs {
    #[command(subcommand)]
    pub command: GroupsCommand,
}

#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Every consumer group of the cluster, with its state.
    List {
        /// Any broker of the cluster, HOST:PORT.
        #[arg(long)]
        bootstrap: String,
    },
    /// One group: its members and their assignments, and per partition
    /// the committed offset, the end offset and the lag.
    Describe {
        group: String,
        /// Any broker of the cluster, HOST:PORT.
        #[arg(long)]
        bootstrap: String,
    },
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{addr:?} is not HOST:PORT")]
    Address { addr: String },
    #[error("{0}")]
    Kafka(String),
}

/// Connects to `addr` (HOST:PORT).
fn open(addr: &str) -> Result<KafkaConn, CliError> {
    let (host, port) = split_host_port(addr).ok_or_else(|| CliError::Address {
        addr: addr.to_string(),
    })?;
    Ok(KafkaConn::connect(host, port, "floe-groups", IO_TIMEOUT)?)
}

fn s(v: &str) -> StrBytes {
    StrBytes::from_string(v.to_string())
}

fn kafka_error(code: i16, context: &str) -> Result<(), CliError> {
    if code == 0 {
        return Ok(());
    }
    let name = kafka_protocol::error::ResponseError::try_from_code(code)
        .map(|e| format!("{e:?}"))
        .unwrap_or_else(|| format!("error {code}"));
    Err(CliError::Kafka(format!("{context}: {name}")))
}

fn brokers(conn: &mut KafkaConn) -> Result<Vec<(i32, String)>, CliError> {
    let md: MetadataResponse = conn.call(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(Some(vec![])),
    )?;
    Ok(md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
        .collect())
}

fn list(bootstrap: &str) -> Result<(), CliError> {
    let mut conn = open(bootstrap)?;
    let mut groups = BTreeMap::new();
    // Each broker lists the groups it answers for; ask them all.
    for (id, addr) in brokers(&mut conn)? {
        let mut c = match open(&addr) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("warning: broker {id} ({addr}) unreachable: {e}");
                continue;
            }
        };
        // v5 names each group's type (classic or consumer).
        let r: ListGroupsResponse = c.call(ApiKey::ListGroups, 5, &ListGroupsRequest::default())?;
        kafka_error(r.error_code, &format!("ListGroups on broker {id}"))?;
        for g in r.groups {
            groups.insert(
                g.group_id.to_string(),
                (g.group_state.to_string(), g.group_type.to_string(), id),
            );
        }
    }
    println!("{:<40} {:<20} {:<10} COORDINATOR", "GROUP", "STATE", "TYPE");
    for (g, (state, kind, id)) in groups {
        println!("{g:<40} {state:<20} {kind:<10} {id}");
    }
    Ok(())
}

fn describe(group: &str, bootstrap: &str) -> Result<(), CliError> {
    let mut conn = open(bootstrap)?;
    // The batched forms (FindCoordinator v4, OffsetFetch v8) are what
    // current clients send; using them here keeps them tested end to end.
    let fc: FindCoordinatorResponse = conn.call(
        ApiKey::FindCoordinator,
        4,
        &FindCoordinatorRequest::default().with_coordinator_keys(vec![s(group)]),
    )?;
    let Some(fc) = fc.coordinators.into_iter().next() else {
        return Err(CliError::Kafka("FindCoordinator: empty answer".into()));
    };
    kafka_error(fc.error_code, "FindCoordinator")?;
    let coord_addr = format!("{}:{}", fc.host, fc.port);
    let mut coord = open(&coord_addr)?;
    let owner = match describe_consumer_protocol(&mut coord, group, &coord_addr, fc.node_id.0)? {
        Some(owner) => owner,
        None => {
            // A broker without the API may have closed the connection.
            coord = open(&coord_addr)?;
            describe_classic(&mut coord, group, &coord_addr, fc.node_id.0)?
        }
    };
    offsets_and_lag(&mut conn, &mut coord, group, owner)
}

/// A consumer-protocol (KIP-848) group through ConsumerGroupDescribe:
/// its members and what each holds (partition -> client id); `None` when
/// the group is not one (a classic group, or a broker without the API).
fn describe_consumer_protocol(
    coord: &mut KafkaConn,
    group: &str,
    coord_addr: &str,
    coord_id: i32,
) -> Result<Option<Holders>, CliError> {
    let req = ConsumerGroupDescribeRequest::default().with_group_ids(vec![GroupId(s(group))]);
    let Ok(r) =
        coord.call::<_, ConsumerGroupDescribeResponse>(ApiKey::ConsumerGroupDescribe, 0, &req)
    else {
        return Ok(None);
    };
    let Some(d) = r.groups.into_iter().next() else {
        return Ok(None);
    };
    // ConsumerGroupDescribe's answer for a classic group.
    if d.error_code == ResponseError::GroupIdNotFound.code() {
        return Ok(None);
    }
    kafka_error(d.error_code, "ConsumerGroupDescribe")?;
    println!(
        "GROUP {group}  STATE {}  PROTOCOL consumer/{}  EPOCH {}  COORDINATOR {coord_id} ({coord_addr})",
        d.group_state, d.assignor_name, d.group_epoch
    );
    let mut owner = BTreeMap::new();
    println!("MEMBERS");
    for m in &d.members {
        let mut assigned = Vec::new();
        for tp in &m.assignment.topic_partitions {
            for p in &tp.partitions {
                owner.insert((tp.topic_name.to_string(), *p), m.client_id.to_string());
                assigned.push(format!("{}-{p}", tp.topic_name.as_str()));
            }
        }
        println!(
            "  {}  epoch={}  instance={}  client={}  host={}  assigned=[{}]",
            m.member_id,
            m.member_epoch,
            m.instance_id.as_deref().unwrap_or("-"),
            m.client_id,
            m.client_host,
            assigned.join(",")
        );
    }
    Ok(Some(owner))
}

/// A classic group through DescribeGroups (partition -> client id).
fn describe_classic(
    coord: &mut KafkaConn,
    group: &str,
    coord_addr: &str,
    coord_id: i32,
) -> Result<Holders, CliError> {
    let dg: DescribeGroupsResponse = coord.call(
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![GroupId(s(group))]),
    )?;
    let Some(d) = dg.groups.into_iter().next() else {
        return Err(CliError::Kafka("DescribeGroups: empty answer".into()));
    };
    kafka_error(d.error_code, "DescribeGroups")?;
    println!(
        "GROUP {group}  STATE {}  PROTOCOL {}/{}  COORDINATOR {coord_id} ({coord_addr})",
        d.group_state, d.protocol_type, d.protocol_data
    );
    let mut owner = Holders::new();
    println!("MEMBERS");
    for m in &d.members {
        let mut assigned = Vec::new();
        if d.protocol_type.as_str() == "consumer" && m.member_assignment.len() >= 2 {
            let mut b = m.member_assignment.clone();
            let v = b.get_i16();
            if let Ok(a) = ConsumerProtocolAssignment::decode(&mut b, v.clamp(0, 3)) {
                for tp in a.assigned_partitions {
                    for p in &tp.partitions {
                        owner.insert((tp.topic.to_string(), *p), m.client_id.to_string());
                        assigned.push(format!("{}-{p}", tp.topic.as_str()));
                    }
                }
            }
        }
        println!(
            "  {}  instance={}  client={}  host={}  assigned=[{}]",
            m.member_id,
            m.group_instance_id.as_deref().unwrap_or("-"),
            m.client_id,
            m.client_host,
            assigned.join(",")
        );
    }
    Ok(owner)
}

/// Committed offsets, log ends and lag of every partition the group has
/// an offset for or holds.
fn offsets_and_lag(
    conn: &mut KafkaConn,
    coord: &mut KafkaConn,
    group: &str,
    owner: Holders,
) -> Result<(), CliError> {
    let of: OffsetFetchResponse = coord.call(
        ApiKey::OffsetFetch,
        8,
        &OffsetFetchRequest::default().with_groups(vec![OffsetFetchRequestGroup::default()
            .with_group_id(GroupId(s(group)))
            .with_topics(None)]),
    )?;
    let Some(of) = of.groups.into_iter().next() else {
        return Err(CliError::Kafka("OffsetFetch: empty answer".into()));
    };
    kafka_error(of.error_code, "OffsetFetch")?;
    let mut committed: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for t in &of.topics {
        for p in &t.partitions {
            if p.committed_offset >= 0 {
                committed.insert((t.name.to_string(), p.partition_index), p.committed_offset);
            }
        }
    }
    for k in owner.keys() {
        committed.entry(k.clone()).or_insert(-1);
    }
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in committed.keys() {
        by_topic.entry(t.as_str()).or_default().push(*p);
    }
    let req = ListOffsetsRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_topics(
            by_topic
                .iter()
                .map(|(t, ps)| {
                    ListOffsetsTopic::default()
                        .with_name(TopicName(s(t)))
                        .with_partitions(
                            ps.iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(*p)
                                        .with_timestamp(-1)
                                })
                                .collect(),
                        )
                })
                .collect(),
        );
    let lo: ListOffsetsResponse = conn.call(ApiKey::ListOffsets, 5, &req)?;
    let mut ends = BTreeMap::new();
    for t in &lo.topics {
        for p in &t.partitions {
            if p.error_code == 0 {
                ends.insert((t.name.to_string(), p.partition_index), p.offset);
            }
        }
    }
    println!(
        "{:<30} {:>9} {:>12} {:>12} {:>10}  OWNER",
        "TOPIC", "PARTITION", "COMMITTED", "END", "LAG"
    );
    for ((t, p), c) in &committed {
        let end = ends.get(&(t.clone(), *p)).copied();
        let lag = match (end, *c) {
            (Some(e), c) if c >= 0 => (e - c).to_string(),
            (Some(e), _) => e.to_string(),
            (None, _) => "-".into(),
        };
        let show = |v: i64| if v >= 0 { v.to_string() } else { "-".into() };
        println!(
            "{t:<30} {p:>9} {:>12} {:>12} {lag:>10}  {}",
            show(*c),
            end.map(show).unwrap_or_else(|| "-".into()),
            owner
                .get(&(t.clone(), *p))
                .map(String::as_str)
                .unwrap_or("-")
        );
    }
    Ok(())
}

pub fn main(args: GroupsArgs) -> std::process::ExitCode {
    let r = match &args.command {
        GroupsCommand::List { bootstrap } => list(bootstrap),
        GroupsCommand::Describe { group, bootstrap } => describe(group, bootstrap),
    };
    match r {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floe groups: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
