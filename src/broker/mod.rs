//! RabbitMQ: the connection, the topology, the consumer supervisor, the envelope of what is
//! read and published, and confirmed publishing.

pub mod consumer;
pub mod envelope;
pub mod link;
pub mod publisher;
pub mod topology;

pub use consumer::{Consumer, Stops, SubscribeError, SubscribeFailed};
pub use envelope::Inbound;
pub use link::{ConnectError, Link};
pub use publisher::{PublishError, Publisher};
pub use topology::{QueueType, Topology, TopologyError, declare};
