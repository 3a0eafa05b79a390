//! How engine errors become gRPC statuses (the one place that decides it).

use tonic::Status;

use crate::engine::EngineError;
use crate::node::NodeNameError;
use crate::state::LeaseError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        Status::new(code(&e), e.to_string())
    }
}

/// The gRPC code an engine error is answered with.
pub fn code(e: &EngineError) -> tonic::Code {
    match e {
        EngineError::Lease(
            LeaseError::StaleToken { .. }
            | LeaseError::NotHolder { .. }
            | LeaseError::AlreadyHolder { .. }
            | LeaseError::OperatorHold { .. }
            | LeaseError::BackupUnsupported { .. }
            | LeaseError::UnpairedGrant { .. },
        ) => tonic::Code::FailedPrecondition,
        EngineError::Store(_)
        | EngineError::StoreFailed(_)
        | EngineError::NotLeader { .. }
        | EngineError::ShuttingDown
        | EngineError::Refused(_)
        | EngineError::Moved => tonic::Code::Unavailable,
        EngineError::Superseded(_) => tonic::Code::Aborted,
    }
}

/// INVALID_ARGUMENT for a bad node name, naming the field.
pub fn invalid_node(e: NodeNameError) -> Status {
    Status::invalid_argument(format!("node: {e}"))
}
