//! The local-folder backend: `{root}/agents/{agent_id}/` on this machine.
//! A checkout is the prefix itself, so `commit` has nothing to do.

use std::path::PathBuf;

use async_trait::async_trait;
use tinyfat_core::AgentId;

use crate::{AgentDir, AgentStorage, StorageError, Workspace};

#[derive(Debug, Clone)]
pub struct LocalStorage {
    root: PathBuf,
}

impl LocalStorage {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    pub fn agents_dir(&self) -> PathBuf {
        self.root.join("agents")
    }

    pub fn prefix(&self, agent: &AgentId) -> PathBuf {
        // AgentId is validated (ag_ + ULID): a safe single component.
        self.agents_dir().join(agent.as_str())
    }

    fn workspace(&self, agent: &AgentId) -> Result<Workspace, StorageError> {
        let host_path = self.prefix(agent);
        let dir = AgentDir::open(&host_path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => StorageError::Missing(agent.clone()),
            _ => StorageError::Io { path: host_path.clone(), source: e },
        })?;
        Ok(Workspace { agent: agent.clone(), host_path, dir })
    }
}

fn io(path: PathBuf) -> impl FnOnce(std::io::Error) -> StorageError {
    move |source| StorageError::Io { path, source }
}

#[async_trait]
impl AgentStorage for LocalStorage {
    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn check(&self) -> Result<(), StorageError> {
        let dir = self.agents_dir();
        tokio::fs::create_dir_all(&dir).await.map_err(io(dir.clone()))?;
        let probe = dir.join(format!(".probe-{}", ulid::Ulid::new()));
        tokio::fs::write(&probe, b"ok").await.map_err(io(probe.clone()))?;
        tokio::fs::remove_file(&probe).await.map_err(io(probe))
    }

    async fn create(&self, agent: &AgentId) -> Result<Workspace, StorageError> {
        let agents = self.agents_dir();
        tokio::fs::create_dir_all(&agents).await.map_err(io(agents))?;
        let prefix = self.prefix(agent);
        match tokio::fs::create_dir(&prefix).await {
            Ok(()) => self.workspace(agent),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(StorageError::AlreadyExists(agent.clone())),
            Err(e) => Err(io(prefix)(e)),
        }
    }

    async fn checkout(&self, agent: &AgentId) -> Result<Workspace, StorageError> {
        self.workspace(agent)
    }

    async fn commit(&self, _workspace: &Workspace) -> Result<(), StorageError> {
        Ok(())
    }

    async fn delete(&self, agent: &AgentId) -> Result<bool, StorageError> {
        let prefix = self.prefix(agent);
        // remove_dir_all does not follow symlinks inside the tree.
        match tokio::fs::remove_dir_all(&prefix).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(prefix)(e)),
        }
    }
}
