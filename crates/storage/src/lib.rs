//! Agent storage: one prefix per agent (`agents/{agent_id}/`), seen by the
//! agent as `/data`.
//!
//! - `path` validates every path an agent or a file names (one function).
//! - `dir::AgentDir` is the only way the platform touches files in a prefix:
//!   beneath a directory handle, never following a symlink, regular files
//!   only, under a size cap, writes through a temporary file and a rename.
//! - `AgentStorage` is the backend seam: the local folder now; an S3 backend
//!   materialises the prefix into a local workspace and syncs it back.
//!
//! Architecture invariant: nothing here knows about agents' meaning (memory,
//! sessions, outbox); it moves bytes safely. Agent files are hostile input.

pub mod dir;
pub mod local;
pub mod path;

use std::path::PathBuf;

use async_trait::async_trait;
use tinyfat_core::AgentId;

pub use dir::{AgentDir, EntryKind, FileError, FileStamp};
pub use local::LocalStorage;
pub use path::{PathError, RelPath, validate_path};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported storage url {0:?}: use file:///PATH (s3:// is not available yet)")]
    UnsupportedUrl(String),
    #[error("agent storage {0} already exists")]
    AlreadyExists(AgentId),
    #[error("agent storage {0} does not exist")]
    Missing(AgentId),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("storage I/O error at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// An agent's files checked out as a local directory for one turn.
#[derive(Debug)]
pub struct Workspace {
    pub agent: AgentId,
    /// The host path that the sandbox mounts at `/data`.
    pub host_path: PathBuf,
    pub dir: AgentDir,
}

#[async_trait]
pub trait AgentStorage: Send + Sync + std::fmt::Debug {
    /// `file:///…` or `s3://…`, for logs.
    fn describe(&self) -> String;
    /// Checks the backend is reachable and writable.
    async fn check(&self) -> Result<(), StorageError>;
    /// Creates an empty prefix; fails if it exists.
    async fn create(&self, agent: &AgentId) -> Result<Workspace, StorageError>;
    /// Makes the prefix available locally (a no-op for the local folder).
    async fn checkout(&self, agent: &AgentId) -> Result<Workspace, StorageError>;
    /// Publishes a workspace's changes (a no-op for the local folder).
    async fn commit(&self, workspace: &Workspace) -> Result<(), StorageError>;
    /// Removes the prefix and everything in it; true if it existed.
    async fn delete(&self, agent: &AgentId) -> Result<bool, StorageError>;
}

/// Opens the storage a `storage_url` names.
pub fn open(storage_url: &str) -> Result<std::sync::Arc<dyn AgentStorage>, StorageError> {
    match storage_url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(std::sync::Arc::new(LocalStorage::new(PathBuf::from(path)))),
        _ => Err(StorageError::UnsupportedUrl(storage_url.to_owned())),
    }
}
