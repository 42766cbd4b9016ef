//! Tools beside the product, for trying the worker without bunq credentials: none of the
//! worker's own modules depends on them.
//! - [`emulator`]: a bunq emulator (installation, device-server, session-server as bunq answers
//!   them). Not for production.
//! - [`demo`]: `demo` (emulator + worker + one sample of each kind) and `samples` (one sample of
//!   each kind to a running worker).

pub mod demo;
pub mod emulator;
