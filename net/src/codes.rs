//! Mapping from engine errors to Kafka error codes: only here, at the edge.

use floe_engine::batch::BatchError;
use floe_engine::sequencer::BatchOutcome;
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
        // Clients refresh metadata and retry elsewhere.
        Error::ShuttingDown => E::NotLeaderOrFollower.code(),
        Error::TopicExists { .. } => E::TopicAlreadyExists.code(),
        Error::InvalidTopic { .. } => E::InvalidTopicException.code(),
        Error::InvalidPartitions { .. } => E::InvalidPartitions.code(),
        Error::InvalidConfig { .. } => E::InvalidConfig.code(),
    }
}

pub fn batch(e: &BatchError) -> i16 {
    match e {
        BatchError::Truncated { .. } | BatchError::CrcMismatch { .. } => E::CorruptMessage.code(),
        BatchError::Invalid { .. } | BatchError::Transactional => E::InvalidRecord.code(),
        BatchError::TooLarge { .. } => E::MessageTooLarge.code(),
    }
}

pub fn outcome(o: &BatchOutcome) -> i16 {
    match o {
        BatchOutcome::Appended { .. } | BatchOutcome::Duplicate { .. } => NONE,
        BatchOutcome::OutOfOrder => E::OutOfOrderSequenceNumber.code(),
        BatchOutcome::Fenced => E::InvalidProducerEpoch.code(),
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
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = E::TransactionalIdAuthorizationFailed.code();
pub const UNKNOWN_SERVER_ERROR: i16 = E::UnknownServerError.code();
pub const INVALID_REPLICATION_FACTOR: i16 = E::InvalidReplicationFactor.code();
