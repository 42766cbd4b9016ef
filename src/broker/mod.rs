//! RabbitMQ: the connection, the topology, the consumer supervisor, the envelope read from a
//! delivery, the worker's sealed bookkeeping headers, and confirmed publishing.

pub mod bookkeeping;
pub mod consumer;
pub mod envelope;
pub mod headers;
pub mod link;
pub mod publisher;
pub mod topology;

pub use bookkeeping::{History, Route, Seal};
pub use consumer::{Consumer, Stops, SubscribeError, SubscribeFailed};
pub use envelope::{GENERATION_HEADER, Inbound};
pub use link::{ConnectError, Link};
pub use publisher::{PublishError, Publisher};
pub use topology::{QueueType, Topology, TopologyError, declare};
