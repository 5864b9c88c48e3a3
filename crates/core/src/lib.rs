//! Core types of tinyfat: identifiers, names, sender patterns, session ids,
//! conversation blocks, the agent's `config.json`, and the secret cipher.
//!
//! Architecture invariant: this crate does no I/O. It never touches the
//! filesystem, the network, the clock or a database; callers pass in time and
//! randomness. Everything here is cheap to unit-test and safe to share.

pub mod agent_config;
pub mod crypto;
pub mod email;
pub mod ids;
pub mod message;
pub mod names;
pub mod secret;
pub mod sender;
pub mod session;

pub use agent_config::AgentConfig;
pub use crypto::{Cipher, CryptoError, KeyId, MasterKey, SealedSecret};
pub use email::EmailAddress;
pub use ids::{AgentId, IdError};
pub use names::AgentName;
pub use secret::Secret;
pub use sender::SenderPattern;
pub use session::SessionId;
