//! The platform: configuration, the components built from it, and the
//! services every entry point shares (provisioning, secrets, export, the
//! HTTP server). The `tinyfat` binary is a thin CLI over this crate.
//!
//! Architecture invariant: the platform holds no per-agent state in memory
//! that is not also in the metadata store or the agent's prefix; any process
//! built from the same settings sees the same platform.

pub mod api;
pub mod auth;
pub mod clock;
pub mod config;
pub mod deliver;
pub mod dlq;
pub mod email;
pub mod error;
pub mod export;
pub mod inbound;
pub mod keys;
pub mod metrics;
pub mod openapi;
pub mod platform;
pub mod provision;
pub mod retention;
pub mod runs;
pub mod scheduler;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod tokens;
pub mod turns;
pub mod webchat;
pub mod worker;

pub use error::Error;
pub use platform::Platform;
