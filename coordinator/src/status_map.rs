//! How engine errors become gRPC statuses (the one place that decides it).

use tonic::Status;

use crate::engine::EngineError;
use crate::node::NodeNameError;
use crate::state::LeaseError;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Lease(
                LeaseError::StaleToken { .. }
                | LeaseError::NotHolder { .. }
                | LeaseError::AlreadyHolder { .. },
            ) => Status::failed_precondition(message),
            EngineError::Store(_) => Status::unavailable(message),
            EngineError::NotLeader { .. } | EngineError::ShuttingDown | EngineError::Refused(_) => {
                Status::unavailable(message)
            }
            EngineError::Superseded(_) => Status::aborted(message),
        }
    }
}

/// INVALID_ARGUMENT for a bad node name, naming the field.
pub fn invalid_node(e: NodeNameError) -> Status {
    Status::invalid_argument(format!("node: {e}"))
}
