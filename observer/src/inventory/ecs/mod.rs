//! ECS: the container agent's introspection API decoded ([`decode`]), and the source that asks
//! it, with the Docker socket filling in what the API leaves out and standing in when the
//! agent is down ([`source`]).

pub mod decode;
pub mod source;

pub use decode::{
    AgentMetadata, EcsLabels, TaskResponse, TasksResponse, LABEL_CLUSTER, LABEL_CONTAINER_NAME,
    LABEL_FAMILY, LABEL_TASK_ARN, LABEL_VERSION,
};
pub use source::EcsSource;
