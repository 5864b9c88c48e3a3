//! The agent runtime: given an agent's checked-out storage and a batch of
//! messages for one session, it runs one turn (SPEC §6) — context, model
//! stream, tools, session records, compaction, commands, usage.
//!
//! Architecture invariant: the runtime knows no channel, queue or database.
//! It reads and writes only the agent's workspace (through `AgentDir`), runs
//! processes only through a `ToolExecutor`, and returns the reply and
//! outbound messages for the platform to deliver.

pub mod commands;
pub mod compaction;
pub mod prompt;
pub mod session;
pub mod session_cache;
pub mod tools;
pub mod turn;

pub use prompt::{Identity, InboundMessage, UntrustedPart};
pub use session_cache::SessionCache;
pub use tools::{Conversation, OutboundMessage};
pub use turn::{Turn, TurnEnd, TurnError, TurnEvent, TurnInput, TurnLimits, TurnOutcome};

/// `config.json` of the agent's prefix.
pub fn config_path() -> tinyfat_storage::RelPath {
    tinyfat_storage::validate_path("config.json").expect("static path")
}
