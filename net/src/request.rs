//! Request decoding: from one frame's bytes (after the length prefix) to a
//! typed request. Pure and total — every input yields a request or an
//! error, never a panic — which the property test below and the fuzz target
//! in `net/fuzz` check.

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreateTopicsRequest, DeleteGroupsRequest, DeleteTopicsRequest,
    DescribeConfigsRequest, DescribeGroupsRequest, FetchRequest, FindCoordinatorRequest,
    HeartbeatRequest, InitProducerIdRequest, JoinGroupRequest, LeaveGroupRequest,
    ListGroupsRequest, ListOffsetsRequest, MetadataRequest, OffsetCommitRequest,
    OffsetDeleteRequest, OffsetFetchRequest, ProduceRequest, RequestHeader,
    SaslAuthenticateRequest, SaslHandshakeRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::Decodable;

use crate::apis;

/// Smallest frame: api key, api version, correlation id.
pub const FRAME_BYTES_MIN: usize = 8;

#[derive(Debug)]
pub enum Request {
    ApiVersions,
    Metadata(MetadataRequest),
    Produce(ProduceRequest),
    Fetch(FetchRequest),
    ListOffsets(ListOffsetsRequest),
    CreateTopics(CreateTopicsRequest),
    DeleteTopics(DeleteTopicsRequest),
    CreatePartitions(CreatePartitionsRequest),
    DescribeConfigs(DescribeConfigsRequest),
    /// Whether the cluster's authorized operations are asked for.
    DescribeCluster(bool),
    InitProducerId(InitProducerIdRequest),
    FindCoordinator(FindCoordinatorRequest),
    JoinGroup(JoinGroupRequest),
    SyncGroup(SyncGroupRequest),
    Heartbeat(HeartbeatRequest),
    LeaveGroup(LeaveGroupRequest),
    OffsetCommit(OffsetCommitRequest),
    OffsetFetch(OffsetFetchRequest),
    DescribeGroups(DescribeGroupsRequest),
    ListGroups(ListGroupsRequest),
    DeleteGroups(DeleteGroupsRequest),
    OffsetDelete(OffsetDeleteRequest),
    DeleteRecords(kafka_protocol::messages::DeleteRecordsRequest),
    SaslHandshake(SaslHandshakeRequest),
    SaslAuthenticate(SaslAuthenticateRequest),
    AddPartitionsToTxn(kafka_protocol::messages::AddPartitionsToTxnRequest),
    AddOffsetsToTxn(kafka_protocol::messages::AddOffsetsToTxnRequest),
    EndTxn(kafka_protocol::messages::EndTxnRequest),
    TxnOffsetCommit(kafka_protocol::messages::TxnOffsetCommitRequest),
    DescribeTransactions(kafka_protocol::messages::DescribeTransactionsRequest),
    ListTransactions(kafka_protocol::messages::ListTransactionsRequest),
    DescribeProducers(kafka_protocol::messages::DescribeProducersRequest),
    DescribeUserScramCredentials(kafka_protocol::messages::DescribeUserScramCredentialsRequest),
    AlterUserScramCredentials(kafka_protocol::messages::AlterUserScramCredentialsRequest),
    CreateAcls(kafka_protocol::messages::CreateAclsRequest),
    DescribeAcls(kafka_protocol::messages::DescribeAclsRequest),
    DeleteAcls(kafka_protocol::messages::DeleteAclsRequest),
    IncrementalAlterConfigs(kafka_protocol::messages::IncrementalAlterConfigsRequest),
    AlterConfigs(kafka_protocol::messages::AlterConfigsRequest),
    ElectLeaders(kafka_protocol::messages::ElectLeadersRequest),
    AlterPartitionReassignments(kafka_protocol::messages::AlterPartitionReassignmentsRequest),
    ListPartitionReassignments(kafka_protocol::messages::ListPartitionReassignmentsRequest),
    OffsetForLeaderEpoch(kafka_protocol::messages::OffsetForLeaderEpochRequest),
    DescribeLogDirs(kafka_protocol::messages::DescribeLogDirsRequest),
    DescribeClientQuotas(kafka_protocol::messages::DescribeClientQuotasRequest),
    AlterClientQuotas(kafka_protocol::messages::AlterClientQuotasRequest),
    ConsumerGroupHeartbeat(kafka_protocol::messages::ConsumerGroupHeartbeatRequest),
    ConsumerGroupDescribe(kafka_protocol::messages::ConsumerGroupDescribeRequest),
    AlterReplicaLogDirs(kafka_protocol::messages::AlterReplicaLogDirsRequest),
    DescribeTopicPartitions(kafka_protocol::messages::DescribeTopicPartitionsRequest),
}

#[derive(Debug)]
pub struct Decoded {
    pub api: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub header: RequestHeader,
    pub request: Request,
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes is shorter than a request header")]
    TooShort { len: usize },
    #[error("unknown API key {api_key}")]
    UnknownApi { api_key: i16 },
    #[error("{api:?} v{version} is not supported")]
    Unsupported {
        api: ApiKey,
        version: i16,
        correlation_id: i32,
    },
    #[error("cannot decode {api:?} v{version}: {reason}")]
    Malformed {
        api: ApiKey,
        version: i16,
        reason: String,
    },
}

fn body<M: Decodable>(api: ApiKey, version: i16, b: &mut Bytes) -> Result<M, DecodeError> {
    M::decode(b, version).map_err(|e| DecodeError::Malformed {
        api,
        version,
        reason: e.to_string(),
    })
}

/// A copy of `field`, a slice of a request frame, that does not keep the
/// frame alive. Decoded `Bytes` and strings share the frame's buffer, and
/// frames are carved from 4 MiB slabs (`floe_engine::pool`): a field kept
/// beyond the request (a group member's metadata, its assignment) would
/// keep the whole slab from reuse for as long as it is kept.
pub fn detached(field: &Bytes) -> Bytes {
    Bytes::copy_from_slice(field)
}

/// Decodes one request frame.
pub fn decode(mut frame: Bytes) -> Result<Decoded, DecodeError> {
    if frame.len() < FRAME_BYTES_MIN {
        return Err(DecodeError::TooShort { len: frame.len() });
    }
    let api_key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(api_key).map_err(|_| DecodeError::UnknownApi { api_key })?;
    if !apis::supports(api, version) {
        return Err(DecodeError::Unsupported {
            api,
            version,
            correlation_id,
        });
    }
    let header =
        RequestHeader::decode(&mut frame, api.request_header_version(version)).map_err(|e| {
            DecodeError::Malformed {
                api,
                version,
                reason: format!("header: {e}"),
            }
        })?;
    let b = &mut frame;
    let request = match api {
        // The ApiVersions body only names the client software; nothing in
        // it changes the answer, so a malformed one is still answered.
        ApiKey::ApiVersions => Request::ApiVersions,
        ApiKey::Metadata => Request::Metadata(body(api, version, b)?),
        ApiKey::Produce => Request::Produce(body(api, version, b)?),
        ApiKey::Fetch => Request::Fetch(body(api, version, b)?),
        ApiKey::ListOffsets => Request::ListOffsets(body(api, version, b)?),
        ApiKey::CreateTopics => Request::CreateTopics(body(api, version, b)?),
        ApiKey::DeleteTopics => Request::DeleteTopics(body(api, version, b)?),
        ApiKey::CreatePartitions => Request::CreatePartitions(body(api, version, b)?),
        ApiKey::DescribeConfigs => Request::DescribeConfigs(body(api, version, b)?),
        ApiKey::DescribeCluster => {
            let r: kafka_protocol::messages::DescribeClusterRequest = body(api, version, b)?;
            Request::DescribeCluster(r.include_cluster_authorized_operations)
        }
        ApiKey::InitProducerId => Request::InitProducerId(body(api, version, b)?),
        ApiKey::FindCoordinator => Request::FindCoordinator(body(api, version, b)?),
        ApiKey::JoinGroup => Request::JoinGroup(body(api, version, b)?),
        ApiKey::SyncGroup => Request::SyncGroup(body(api, version, b)?),
        ApiKey::Heartbeat => Request::Heartbeat(body(api, version, b)?),
        ApiKey::LeaveGroup => Request::LeaveGroup(body(api, version, b)?),
        ApiKey::OffsetCommit => Request::OffsetCommit(body(api, version, b)?),
        ApiKey::OffsetFetch => Request::OffsetFetch(body(api, version, b)?),
        ApiKey::DescribeGroups => Request::DescribeGroups(body(api, version, b)?),
        ApiKey::ListGroups => Request::ListGroups(body(api, version, b)?),
        ApiKey::DeleteGroups => Request::DeleteGroups(body(api, version, b)?),
        ApiKey::OffsetDelete => Request::OffsetDelete(body(api, version, b)?),
        ApiKey::DeleteRecords => Request::DeleteRecords(body(api, version, b)?),
        ApiKey::SaslHandshake => Request::SaslHandshake(body(api, version, b)?),
        ApiKey::SaslAuthenticate => Request::SaslAuthenticate(body(api, version, b)?),
        ApiKey::AddPartitionsToTxn => Request::AddPartitionsToTxn(body(api, version, b)?),
        ApiKey::AddOffsetsToTxn => Request::AddOffsetsToTxn(body(api, version, b)?),
        ApiKey::EndTxn => Request::EndTxn(body(api, version, b)?),
        ApiKey::TxnOffsetCommit => Request::TxnOffsetCommit(body(api, version, b)?),
        ApiKey::DescribeTransactions => Request::DescribeTransactions(body(api, version, b)?),
        ApiKey::ListTransactions => Request::ListTransactions(body(api, version, b)?),
        ApiKey::DescribeProducers => Request::DescribeProducers(body(api, version, b)?),
        ApiKey::DescribeUserScramCredentials => {
            Request::DescribeUserScramCredentials(body(api, version, b)?)
        }
        ApiKey::AlterUserScramCredentials => {
            Request::AlterUserScramCredentials(body(api, version, b)?)
        }
        ApiKey::CreateAcls => Request::CreateAcls(body(api, version, b)?),
        ApiKey::DescribeAcls => Request::DescribeAcls(body(api, version, b)?),
        ApiKey::DeleteAcls => Request::DeleteAcls(body(api, version, b)?),
        ApiKey::IncrementalAlterConfigs => Request::IncrementalAlterConfigs(body(api, version, b)?),
        ApiKey::AlterConfigs => Request::AlterConfigs(body(api, version, b)?),
        ApiKey::ElectLeaders => Request::ElectLeaders(body(api, version, b)?),
        ApiKey::AlterPartitionReassignments => {
            Request::AlterPartitionReassignments(body(api, version, b)?)
        }
        ApiKey::ListPartitionReassignments => {
            Request::ListPartitionReassignments(body(api, version, b)?)
        }
        ApiKey::OffsetForLeaderEpoch => Request::OffsetForLeaderEpoch(body(api, version, b)?),
        ApiKey::DescribeLogDirs => Request::DescribeLogDirs(body(api, version, b)?),
        ApiKey::DescribeClientQuotas => Request::DescribeClientQuotas(body(api, version, b)?),
        ApiKey::AlterClientQuotas => Request::AlterClientQuotas(body(api, version, b)?),
        ApiKey::ConsumerGroupHeartbeat => Request::ConsumerGroupHeartbeat(body(api, version, b)?),
        ApiKey::ConsumerGroupDescribe => Request::ConsumerGroupDescribe(body(api, version, b)?),
        ApiKey::AlterReplicaLogDirs => Request::AlterReplicaLogDirs(body(api, version, b)?),
        ApiKey::DescribeTopicPartitions => Request::DescribeTopicPartitions(body(api, version, b)?),
        _ => {
            return Err(DecodeError::Unsupported {
                api,
                version,
                correlation_id,
            })
        }
    };
    Ok(Decoded {
        api,
        version,
        correlation_id,
        header,
        request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    use proptest::prelude::*;

    fn frame<M: Encodable>(api: ApiKey, version: i16, m: &M) -> Vec<u8> {
        let mut b = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(7)
            .with_client_id(Some(StrBytes::from_static_str("prop")))
            .encode(&mut b, api.request_header_version(version))
            .expect("header");
        m.encode(&mut b, version).expect("body");
        b.to_vec()
    }

    /// A JoinGroup decoded from a pooled frame: a member's metadata kept
    /// as decoded pins the frame's slab, so the pool cannot hand it out
    /// again; kept `detached`, the slab is reused once the request is gone.
    #[test]
    fn a_detached_field_lets_the_pool_reuse_the_frame() {
        use floe_engine::pool::FramePool;
        use kafka_protocol::messages::join_group_request::{
            JoinGroupRequest, JoinGroupRequestProtocol,
        };
        let req = JoinGroupRequest::default()
            .with_group_id(StrBytes::from_static_str("g").into())
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(Bytes::from(vec![7u8; 100]))]);
        let wire = frame(ApiKey::JoinGroup, 5, &req);
        // Keeps the protocol metadata of a JoinGroup read from `pool`, and
        // says whether a fresh frame then starts where the first did.
        let reused = |keep: fn(&Bytes) -> Bytes| {
            let pool = FramePool::new(64 << 20);
            let mut buf = pool.take(wire.len());
            buf.copy_from_slice(&wire);
            let start = buf.as_ptr();
            let Request::JoinGroup(r) = decode(buf.freeze()).expect("decodes").request else {
                panic!("not a JoinGroup");
            };
            let kept = keep(&r.protocols[0].metadata);
            drop(r);
            // Frames of an eighth of a slab each, dropped at once, until
            // the slab is used up: the next one starts the old slab again
            // if nothing holds a part of it, else a new slab.
            let eighth = floe_engine::pool::SLAB_BYTES / 8;
            let again = (0..9).any(|_| pool.take(eighth).as_ptr() == start);
            assert_eq!(&kept[..], &[7u8; 100][..]);
            again
        };
        assert!(!reused(Bytes::clone), "a decoded field shares the frame");
        assert!(reused(detached), "a detached field does not");
    }

    /// Every version `apis::SUPPORTED` advertises is one the codec's
    /// message type decodes: an empty body may be malformed, but never
    /// refused for its version. (kafka-protocol's `ApiKey` ranges include
    /// Kafka's unstable latest versions, e.g. OffsetCommit v10, which its
    /// message types do not decode.)
    #[test]
    fn every_advertised_version_is_decodable() {
        for &(api, lo, hi) in apis::SUPPORTED {
            for version in lo..=hi {
                let mut b = BytesMut::new();
                RequestHeader::default()
                    .with_request_api_key(api as i16)
                    .with_request_api_version(version)
                    .with_correlation_id(7)
                    .encode(&mut b, api.request_header_version(version))
                    .expect("header");
                b.extend_from_slice(&[0u8; 64]);
                if let Err(DecodeError::Malformed { reason, .. }) = decode(b.freeze()) {
                    assert!(
                        !reason.contains("version not supported"),
                        "{api:?} v{version} is advertised but not decodable: {reason}"
                    );
                }
            }
        }
    }

    /// Valid frames of several APIs and versions, as mutation seeds.
    fn seeds() -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for v in [0i16, 4, 9, 12] {
            let m = MetadataRequest::default()
                .with_topics(Some(vec![MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("t"))))]));
            out.push(frame(ApiKey::Metadata, v, &m));
        }
        for v in [3i16, 7, 9, 11] {
            let p = ProduceRequest::default()
                .with_acks(-1)
                .with_timeout_ms(1000)
                .with_topic_data(vec![TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_static_str("t")))
                    .with_partition_data(vec![PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(Bytes::from_static(&[0u8; 70])))])]);
            out.push(frame(ApiKey::Produce, v, &p));
        }
        for v in [4i16, 11, 12] {
            out.push(frame(
                ApiKey::Fetch,
                v,
                &FetchRequest::default().with_max_wait_ms(10),
            ));
        }
        out
    }

    #[test]
    fn seeds_decode() {
        for s in seeds() {
            decode(Bytes::from(s)).expect("valid seed decodes");
        }
    }

    #[test]
    fn huge_array_counts_are_errors_not_aborts() {
        // Metadata v0 claiming 2^31-1 topics in a 12-byte body.
        let mut f = vec![0, 3, 0, 0, 0, 0, 0, 1, 0, 0];
        f.extend_from_slice(&i32::MAX.to_be_bytes());
        assert!(matches!(
            decode(Bytes::from(f)),
            Err(DecodeError::Malformed { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

        #[test]
        fn random_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(Bytes::from(data));
        }

        #[test]
        fn random_bodies_of_supported_apis_never_panic(
            idx in 0..apis::SUPPORTED.len(),
            v in 0i16..14,
            body in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let (api, _, _) = apis::SUPPORTED[idx];
            let mut f = Vec::with_capacity(body.len() + 8);
            f.extend_from_slice(&(api as i16).to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
            f.extend_from_slice(&1i32.to_be_bytes());
            f.extend_from_slice(&body);
            let _ = decode(Bytes::from(f));
        }

        #[test]
        fn mutated_valid_frames_never_panic(
            seed in 0usize..11,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in any::<usize>(),
        ) {
            let seeds = seeds();
            let mut f = seeds[seed % seeds.len()].clone();
            for (at, byte) in flips {
                let n = f.len();
                f[at % n] = byte;
            }
            let keep = f.len() - cut % (f.len() / 4 + 1);
            f.truncate(keep);
            let _ = decode(Bytes::from(f));
        }
    }
}
