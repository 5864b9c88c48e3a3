//! The platform's error: variants say whether the user can fix it (an
//! unknown agent, a duplicate name, bad input) or the operator must look.

use tinyfat_core::CryptoError;
use tinyfat_storage::{FileError, StorageError};
use tinyfat_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no agent named {0:?} (`tinyfat agent list` shows the agents)")]
    UnknownAgent(String),
    #[error("an agent named {0:?} already exists; choose another --name or leave it out to generate one")]
    DuplicateName(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl Error {
    /// True when the input was wrong, not the platform (CLI exit code 1 either
    /// way, but only these are worth no log line).
    pub fn is_user_error(&self) -> bool {
        matches!(self, Self::UnknownAgent(_) | Self::DuplicateName(_) | Self::Invalid(_))
    }

    pub fn invalid(e: impl std::fmt::Display) -> Self {
        Self::Invalid(e.to_string())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
