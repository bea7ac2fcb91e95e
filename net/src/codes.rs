//! Mapping from engine errors to Kafka error codes: only here, at the edge.

use floe_engine::batch::BatchError;
use floe_engine::coordinator::CoordError;
use floe_engine::group::GroupError;
use floe_engine::sequencer::BatchOutcome;
use floe_engine::txn::TxnError;
use floe_engine::txn_store::TxnStoreError;
use floe_engine::Error;
use kafka_protocol::error::ResponseError as E;

pub const NONE: i16 = 0;

pub fn engine(e: &Error) -> i16 {
    match e {
        // A backend that may answer next time: the client retries. One that
        // will not (denied credentials, a missing bucket, corrupt metadata)
        // is a server fault the client cannot fix by retrying.
        Error::Storage { .. } | Error::Metadata { .. } | Error::Conflict { .. }
            if e.is_retriable() =>
        {
            E::KafkaStorageError.code()
        }
        Error::Storage { .. }
        | Error::Metadata { .. }
        | Error::Conflict { .. }
        | Error::Corrupt { .. }
        | Error::NodeIdTaken { .. } => E::UnknownServerError.code(),
        Error::UnknownPartition { .. } | Error::UnknownTopic { .. } => {
            E::UnknownTopicOrPartition.code()
        }
        Error::OffsetOutOfRange { .. } => E::OffsetOutOfRange.code(),
        // Certainly not written: a retriable "not persisted" error.
        Error::CommitAbandoned { .. } => E::KafkaStorageError.code(),
        // Kafka's "may or may not have been written": an idempotent
        // producer retries with the same sequence and learns which.
        Error::CommitOutcomeUnknown { .. } => E::RequestTimedOut.code(),
        // Retriable, and clients refresh metadata (they never reset).
        Error::OffsetNotAvailable { .. } => E::OffsetNotAvailable.code(),
        // Clients refresh metadata and retry elsewhere.
        Error::ShuttingDown => E::NotLeaderOrFollower.code(),
        Error::TopicExists { .. } => E::TopicAlreadyExists.code(),
        Error::InvalidTopic { .. } => E::InvalidTopicException.code(),
        Error::InvalidPartitions { .. } => E::InvalidPartitions.code(),
        Error::InvalidConfig { .. } => E::InvalidConfig.code(),
    }
}

/// A failed append of a partition's batches. For idempotent batches a
/// "not persisted" answer is never given: the batch may be a retry of one
/// already in the log (sent first through a broker that died before it
/// answered). Kafka's leader finds such a duplicate before it writes;
/// floe finds it only when the commit is sequenced, so a write that failed
/// cannot tell. Told "not persisted", librdkafka re-sends the records under
/// a new epoch and they are written twice; told "possibly persisted"
/// (REQUEST_TIMED_OUT), it retries the same sequence, which the log then
/// recognises as a duplicate (answered with the first copy's offset) or
/// appends.
pub fn append(e: &Error, idempotent: bool) -> i16 {
    let code = engine(e);
    if idempotent && code == E::KafkaStorageError.code() {
        E::RequestTimedOut.code()
    } else {
        code
    }
}

pub fn batch(e: &BatchError) -> i16 {
    match e {
        BatchError::Truncated { .. } | BatchError::CrcMismatch { .. } => E::CorruptMessage.code(),
        BatchError::Invalid { .. } | BatchError::Control => E::InvalidRecord.code(),
        BatchError::TooLarge { .. } => E::MessageTooLarge.code(),
    }
}

pub fn outcome(o: &BatchOutcome) -> i16 {
    match o {
        BatchOutcome::Appended { .. } | BatchOutcome::Duplicate { .. } => NONE,
        BatchOutcome::OutOfOrder => E::OutOfOrderSequenceNumber.code(),
        BatchOutcome::Fenced => E::InvalidProducerEpoch.code(),
        // Retriable and "not persisted" for every client: the producer
        // re-sends the failed batch and this one in order.
        BatchOutcome::NotPersisted => E::NotEnoughReplicas.code(),
    }
}

/// A transaction request's refusal. Requests older than `fenced_from`
/// (the version that knows PRODUCER_FENCED) get INVALID_PRODUCER_EPOCH,
/// as Kafka answers them.
pub fn txn(e: &TxnStoreError, version: i16, fenced_from: i16) -> i16 {
    match e {
        TxnStoreError::Txn(t) => match t {
            TxnError::ProducerFenced if version >= fenced_from => E::ProducerFenced.code(),
            TxnError::ProducerFenced | TxnError::InvalidProducerEpoch => {
                E::InvalidProducerEpoch.code()
            }
            TxnError::InvalidProducerIdMapping => E::InvalidProducerIdMapping.code(),
            TxnError::ConcurrentTransactions => E::ConcurrentTransactions.code(),
            TxnError::InvalidTxnState | TxnError::TooLarge => E::InvalidTxnState.code(),
            TxnError::InvalidTransactionTimeout => E::InvalidTransactionTimeout.code(),
        },
        TxnStoreError::Unavailable(why) => {
            tracing::warn!("transaction request failed: {why}");
            E::CoordinatorNotAvailable.code()
        }
        TxnStoreError::Corrupt { .. } => {
            tracing::error!(error = %e, "transaction request failed");
            E::UnknownServerError.code()
        }
    }
}

/// A group's own refusal.
pub fn group(e: GroupError) -> i16 {
    match e {
        GroupError::UnknownMemberId => E::UnknownMemberId.code(),
        GroupError::MemberIdRequired => E::MemberIdRequired.code(),
        GroupError::IllegalGeneration => E::IllegalGeneration.code(),
        GroupError::RebalanceInProgress => E::RebalanceInProgress.code(),
        GroupError::InconsistentGroupProtocol => E::InconsistentGroupProtocol.code(),
        GroupError::InvalidSessionTimeout => E::InvalidSessionTimeout.code(),
        GroupError::FencedInstanceId => E::FencedInstanceId.code(),
        GroupError::GroupMaxSizeReached => E::GroupMaxSizeReached.code(),
        GroupError::NonEmptyGroup => E::NonEmptyGroup.code(),
        GroupError::CoordinatorNotAvailable => E::CoordinatorNotAvailable.code(),
        GroupError::FencedMemberEpoch => E::FencedMemberEpoch.code(),
        GroupError::StaleMemberEpoch => E::StaleMemberEpoch.code(),
        GroupError::UnreleasedInstanceId => E::UnreleasedInstanceId.code(),
        GroupError::UnsupportedAssignor => E::UnsupportedAssignor.code(),
        GroupError::InvalidRegularExpression => E::InvalidRegularExpression.code(),
        GroupError::InvalidRequest => E::InvalidRequest.code(),
        GroupError::GroupIdNotFound => E::GroupIdNotFound.code(),
    }
}

/// A coordinator failure; one it could not tell the client is logged here.
pub fn coordinator(e: &CoordError) -> i16 {
    match e {
        CoordError::NotCoordinator => E::NotCoordinator.code(),
        CoordError::Unavailable(why) => {
            tracing::warn!("group request failed: {why}");
            E::CoordinatorNotAvailable.code()
        }
        CoordError::Group(g) => group(*g),
    }
}

pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = E::UnknownTopicOrPartition.code();
pub const INVALID_TOPIC: i16 = E::InvalidTopicException.code();
pub const INVALID_REQUIRED_ACKS: i16 = E::InvalidRequiredAcks.code();
pub const UNSUPPORTED_VERSION: i16 = E::UnsupportedVersion.code();
pub const INVALID_REQUEST: i16 = E::InvalidRequest.code();
pub const OFFSET_OUT_OF_RANGE: i16 = E::OffsetOutOfRange.code();
pub const INVALID_CONFIG: i16 = E::InvalidConfig.code();
pub const FETCH_SESSION_ID_NOT_FOUND: i16 = E::FetchSessionIdNotFound.code();
pub const INVALID_FETCH_SESSION_EPOCH: i16 = E::InvalidFetchSessionEpoch.code();
pub const FETCH_SESSION_TOPIC_ID_ERROR: i16 = E::FetchSessionTopicIdError.code();
pub const UNKNOWN_TOPIC_ID: i16 = E::UnknownTopicId.code();
pub const UNKNOWN_LEADER_EPOCH: i16 = E::UnknownLeaderEpoch.code();
pub const LOG_DIR_NOT_FOUND: i16 = E::LogDirNotFound.code();
pub const GROUP_ID_NOT_FOUND: i16 = E::GroupIdNotFound.code();
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = E::TransactionalIdAuthorizationFailed.code();
pub const INVALID_TXN_STATE: i16 = E::InvalidTxnState.code();
pub const NOT_ENOUGH_REPLICAS: i16 = E::NotEnoughReplicas.code();
pub const UNSTABLE_OFFSET_COMMIT: i16 = E::UnstableOffsetCommit.code();
pub const OPERATION_NOT_ATTEMPTED: i16 = E::OperationNotAttempted.code();
/// Fetch's and ListOffsets' `isolation_level` for read_committed.
pub const READ_COMMITTED: i8 = 1;
pub const INVALID_PRODUCER_EPOCH: i16 = E::InvalidProducerEpoch.code();
pub const TRANSACTIONAL_ID_NOT_FOUND: i16 = E::TransactionalIdNotFound.code();
pub const COORDINATOR_NOT_AVAILABLE: i16 = E::CoordinatorNotAvailable.code();
pub const UNKNOWN_SERVER_ERROR: i16 = E::UnknownServerError.code();
pub const INVALID_REPLICATION_FACTOR: i16 = E::InvalidReplicationFactor.code();
pub const INVALID_GROUP_ID: i16 = E::InvalidGroupId.code();
pub const OFFSET_METADATA_TOO_LARGE: i16 = E::OffsetMetadataTooLarge.code();
pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = E::GroupSubscribedToTopic.code();
pub const UNSUPPORTED_SASL_MECHANISM: i16 = E::UnsupportedSaslMechanism.code();
pub const RESOURCE_NOT_FOUND: i16 = E::ResourceNotFound.code();
pub const DUPLICATE_RESOURCE: i16 = E::DuplicateResource.code();
pub const UNACCEPTABLE_CREDENTIAL: i16 = E::UnacceptableCredential.code();
pub const TOPIC_AUTHORIZATION_FAILED: i16 = E::TopicAuthorizationFailed.code();
pub const GROUP_AUTHORIZATION_FAILED: i16 = E::GroupAuthorizationFailed.code();
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = E::ClusterAuthorizationFailed.code();
pub const SECURITY_DISABLED: i16 = E::SecurityDisabled.code();
