//! The calls about partition leaders and replicas, answered as a
//! leaderless broker can: every floe broker serves every partition, data
//! lives in the object store, and nothing moves.
//!
//! - ElectLeaders: no election is ever needed (ELECTION_NOT_NEEDED).
//! - AlterPartitionReassignments: any placement is already in effect
//!   (accepted, nothing moves); cancelling finds nothing in progress.
//! - ListPartitionReassignments: none is ever in progress.

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ElectLeadersRequest,
    ElectLeadersResponse, ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
};
use kafka_protocol::protocol::StrBytes;

use floe_engine::acls::AclOperation;

use super::{encode, partition_key, Ctx, Reply};
use crate::codes;

const ELECTION_NOT_NEEDED: i16 = 84;
const NO_REASSIGNMENT_IN_PROGRESS: i16 = 85;

fn exists(ctx: &Ctx, topic: &str, partition: i32) -> bool {
    partition_key(ctx.broker.engine.topic(topic).as_deref(), partition).is_some()
}

pub async fn elect_leaders(ctx: &Ctx, req: ElectLeadersRequest, version: i16) -> Reply {
    let authorized = ctx.allowed_on_cluster(AclOperation::Alter);
    // Each partition's answer (v0 has no top-level error, so a refusal is
    // on every partition too).
    let answer = |topic: &str, p: i32| -> (i16, Option<&'static str>) {
        if !authorized {
            (codes::CLUSTER_AUTHORIZATION_FAILED, None)
        } else if exists(ctx, topic, p) {
            (
                ELECTION_NOT_NEEDED,
                Some("every floe broker serves every partition: there is no leader to elect"),
            )
        } else {
            (
                codes::UNKNOWN_TOPIC_OR_PARTITION,
                Some("no such topic or partition"),
            )
        }
    };
    // Null names every partition, none of which needs an election; Kafka
    // answers only the partitions it elected.
    let results = req
        .topic_partitions
        .iter()
        .flatten()
        .map(|t| {
            ReplicaElectionResult::default()
                .with_topic(t.topic.clone())
                .with_partition_result(
                    t.partitions
                        .iter()
                        .map(|&p| {
                            let (code, why) = answer(&t.topic, p);
                            PartitionResult::default()
                                .with_partition_id(p)
                                .with_error_code(code)
                                .with_error_message(why.map(StrBytes::from_static_str))
                        })
                        .collect(),
                )
        })
        .collect();
    let resp = ElectLeadersResponse::default().with_replica_election_results(results);
    let resp = if authorized {
        resp
    } else {
        resp.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED)
    };
    encode(&resp, version)
}

pub async fn alter_reassignments(
    ctx: &Ctx,
    req: AlterPartitionReassignmentsRequest,
    version: i16,
) -> Reply {
    let resp = AlterPartitionReassignmentsResponse::default()
        .with_allow_replication_factor_change(req.allow_replication_factor_change);
    if !ctx.allowed_on_cluster(AclOperation::Alter) {
        return encode(
            &resp.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED),
            version,
        );
    }
    let responses = req
        .topics
        .iter()
        .map(|t| {
            ReassignableTopicResponse::default()
                .with_name(t.name.clone())
                .with_partitions(
                    t.partitions
                        .iter()
                        .map(|p| {
                            let r = ReassignablePartitionResponse::default()
                                .with_partition_index(p.partition_index);
                            if !exists(ctx, &t.name, p.partition_index) {
                                return r.with_error_code(codes::UNKNOWN_TOPIC_OR_PARTITION);
                            }
                            match &p.replicas {
                                // Nothing is ever moving, so nothing to cancel.
                                None => r.with_error_code(NO_REASSIGNMENT_IN_PROGRESS),
                                // Every broker already serves the partition
                                // from the object store: done at once.
                                Some(_) => r,
                            }
                        })
                        .collect(),
                )
        })
        .collect();
    encode(&resp.with_responses(responses), version)
}

pub async fn list_reassignments(
    ctx: &Ctx,
    _req: ListPartitionReassignmentsRequest,
    version: i16,
) -> Reply {
    let resp = ListPartitionReassignmentsResponse::default();
    if !ctx.allowed_on_cluster(AclOperation::Describe) {
        return encode(
            &resp.with_error_code(codes::CLUSTER_AUTHORIZATION_FAILED),
            version,
        );
    }
    encode(&resp, version)
}
