//! The Kafka APIs floe serves, each with exactly the version range it
//! implements — the one place these ranges are declared. ApiVersions
//! advertises this table; a request outside it is refused.

use kafka_protocol::messages::ApiKey;

/// (api, min version, max version)
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    // v12 only lets transaction version 2 clients skip AddPartitionsToTxn,
    // which no client does here: floe advertises no `transaction.version`
    // feature. v13 names topics by id.
    (ApiKey::Produce, 3, 13),
    // With incremental sessions (KIP-227); v13+ names topics by id.
    (ApiKey::Fetch, 4, 18),
    (ApiKey::ListOffsets, 1, 8),
    // v13 adds a top-level error code (KIP-1102).
    (ApiKey::Metadata, 0, 13),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::CreatePartitions, 0, 3),
    // v2 lists fenced brokers on request: a leaderless cluster has none.
    (ApiKey::DescribeCluster, 0, 2),
    // Consumer groups, the classic protocol and KIP-848's consumer
    // protocol (ConsumerGroupHeartbeat, ConsumerGroupDescribe).
    // FindCoordinator v5 only adds an error code for transactions; v6's
    // share-group key is refused (INVALID_REQUEST).
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    // v10 (topic ids) is unstable in Kafka 4.1, and kafka-protocol's
    // message types do not decode it.
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::DeleteRecords, 0, 2),
    // SASL/PLAIN (net/src/sasl.rs); v0 handshakes take a bare token next.
    (ApiKey::SaslHandshake, 0, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
    // Transactions (net/src/handlers/txn.rs). Transaction version 1: the
    // v5 requests of KIP-890 part 2 (an epoch bump per transaction) are
    // not served, and no `transaction.version` feature is advertised, so
    // clients stay on the v4 protocol. AddPartitionsToTxn v4 is the
    // batched, verification-only form brokers send (KIP-890 part 1).
    (ApiKey::AddPartitionsToTxn, 0, 4),
    (ApiKey::AddOffsetsToTxn, 0, 4),
    (ApiKey::EndTxn, 0, 4),
    (ApiKey::TxnOffsetCommit, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
    (ApiKey::DescribeProducers, 0, 0),
    // SASL/SCRAM users in the metadata store (net/src/handlers/users.rs).
    (ApiKey::DescribeUserScramCredentials, 0, 0),
    (ApiKey::AlterUserScramCredentials, 0, 0),
    // Kafka ACLs in the metadata store (net/src/handlers/acls.rs); v0
    // (literal patterns only) is gone from Kafka 4 and from the codec.
    (ApiKey::CreateAcls, 1, 3),
    (ApiKey::DescribeAcls, 1, 3),
    (ApiKey::DeleteAcls, 1, 3),
    // Topic configs (net/src/handlers/configs.rs); broker configs are
    // static and refused.
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::AlterConfigs, 0, 2),
    // Leaders and replicas, answered as a leaderless broker can
    // (net/src/handlers/leaderless.rs).
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::AlterPartitionReassignments, 0, 1),
    (ApiKey::ListPartitionReassignments, 0, 0),
    // One log directory per broker, the object store, holding every
    // partition (net/src/handlers/log_dirs.rs).
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::AlterReplicaLogDirs, 1, 2),
    // Client quotas (net/src/handlers/quotas.rs), the byte rates enforced
    // with throttle_time_ms (net/src/quota.rs).
    (ApiKey::DescribeClientQuotas, 0, 1),
    (ApiKey::AlterClientQuotas, 0, 1),
    // KIP-966's paged topic description (net/src/handlers/describe_topics.rs).
    (ApiKey::DescribeTopicPartitions, 0, 0),
    // One leader epoch per partition; the end offset is read after a
    // barrier on the commit log (net/src/handlers/epochs.rs).
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
];

pub fn range(api: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == api)
        .map(|&(_, lo, hi)| (lo, hi))
}

pub fn supports(api: ApiKey, version: i16) -> bool {
    range(api).is_some_and(|(lo, hi)| (lo..=hi).contains(&version))
}

/// The compatibility table of the README: every API key Kafka 4.1
/// defines (kafka-protocol's generated ranges, made from Kafka 4.1.0's
/// message definitions) with the versions floe serves. A test keeps the
/// README's copy equal to it.
pub fn compatibility_table() -> String {
    let span = |lo: i16, hi: i16| {
        if lo == hi {
            lo.to_string()
        } else {
            format!("{lo}–{hi}")
        }
    };
    let mut out = String::from("| API (key) | floe | Kafka 4.1 |\n|---|---|---|\n");
    for api in ApiKey::iter() {
        let k = api.valid_versions();
        let floe = range(api).map_or_else(|| "—".to_string(), |(lo, hi)| span(lo, hi));
        out.push_str(&format!(
            "| {api:?} ({}) | {floe} | {} |\n",
            api as i16,
            span(k.min, k.max)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's table between its markers is [`compatibility_table`]:
    /// the table cannot drift from the code.
    #[test]
    fn readme_table_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
        let readme = std::fs::read_to_string(path).expect("README.md");
        let (begin, end) = ("<!-- api-table:begin -->\n", "<!-- api-table:end -->");
        let start = readme
            .find(begin)
            .expect("the README's api-table:begin marker")
            + begin.len();
        let stop = readme[start..].find(end).expect("the api-table:end marker") + start;
        let want = compatibility_table();
        assert!(
            readme[start..stop] == want,
            "README.md's API table is out of date; put this between its markers:\n{want}"
        );
    }

    #[test]
    fn ranges_are_within_what_the_codec_implements() {
        for &(api, lo, hi) in SUPPORTED {
            let codec = api.valid_versions();
            assert!(lo <= hi, "{api:?}");
            assert!(
                codec.min <= lo && hi <= codec.max,
                "{api:?} {lo}..={hi} outside codec {codec:?}"
            );
        }
    }
}
