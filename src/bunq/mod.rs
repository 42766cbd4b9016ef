//! bunq's public API: the API context, signing, the three calls and their error classes.

pub mod client;
pub mod context;
pub mod error;
pub mod response;
pub mod signing;

pub use client::BunqClient;
pub use context::ApiContext;
pub use error::{CallError, RetryClass};
