//! RabbitMQ: topology, confirmed publishing and the AMQP properties of output messages.

pub mod link;
pub mod publisher;
pub mod topology;

pub use link::Link;
pub use publisher::{PublishError, Publisher};
pub use topology::{Topology, TopologyError, declare};
