//! RabbitMQ: topology, confirmed publishing and the AMQP properties of output messages.

pub mod publisher;
pub mod topology;

pub use publisher::{PublishError, Publisher};
pub use topology::{Topology, TopologyError, declare};
