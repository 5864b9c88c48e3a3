//! Provisioning: creating an agent (id, generated unique name, address,
//! owner, seeded storage layout of SPEC §5), deleting it with every row and
//! file that belongs to it, and its allowed senders.
//!
//! Order matters for crash safety. Create: storage first, then the agent
//! row, so a crash leaves at worst an unreferenced folder with a random id,
//! never a row without storage. Delete: rows first, then storage, so a crash
//! leaves at worst an orphaned folder that no request can reach.
//!
//! A caller that must be idempotent (provisioning by email, `email::provision`)
//! passes its own agent id, derived from its job: a retry after a crash
//! between storage and row finds the folder with no row, which by the order
//! above is an orphan of its own earlier attempt, and replaces it.

use serde::Serialize;
use tinyfat_core::{AgentConfig, AgentId, AgentName, EmailAddress, SenderPattern};
use tinyfat_storage::{AgentStorage, RelPath, validate_path};
use tinyfat_store::{Agent, NewAgent, StoreError};

use crate::Platform;
use crate::error::{Error, Result};

/// Attempts at a generated name before giving up (the name space is ~87,000).
const NAME_ATTEMPTS_MAX: usize = 32;

/// Folders every agent starts with.
pub const LAYOUT_DIRS: [&str; 9] = [
    "sessions",
    "outbox/email",
    "outbox/sending",
    "outbox/sent",
    "outbox/failed",
    "events",
    "attachments",
    "skills",
    "files",
];

#[derive(Clone, Debug)]
pub struct CreateAgent {
    pub owner: EmailAddress,
    pub name: Option<String>,
    pub model: Option<String>,
}

/// An agent as the CLI and API print it.
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub id: String,
    pub name: String,
    pub email: String,
    pub owner: String,
    pub model: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_senders: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
}

impl AgentView {
    pub fn new(agent: &Agent) -> Self {
        Self {
            id: agent.id.to_string(),
            name: agent.name.to_string(),
            email: agent.email.to_string(),
            owner: agent.owner_email.to_string(),
            model: agent.model.clone(),
            created_at: format_ms(agent.created_ms),
            allowed_senders: None,
            storage: None,
        }
    }
}

pub fn format_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

pub fn seed_memory(name: &AgentName, owner: &EmailAddress) -> String {
    format!(
        "# Memory\n\n\
         This file is my long-term memory. It is read into every conversation, so I keep it short,\n\
         current and organised, and I edit it when I learn something worth keeping.\n\n\
         ## Who I am\n\n\
         - I am {name}, a personal assistant. My files live in /data.\n\n\
         ## My owner\n\n\
         - Email: {owner}\n\
         - Preferences: (none recorded yet)\n\n\
         ## Ongoing\n\n\
         - (nothing yet)\n\n\
         ## Notes\n\n\
         - Reminders and recurring tasks go in /data/events/<name>/event.json.\n\
         - Mail to people other than the current conversation goes in /data/outbox/email/.\n"
    )
}

/// Files a caller adds to a new agent's prefix, given its name and address:
/// `(path, bytes)`, written with the layout, before the agent row exists.
pub type SeedFiles<'a> = &'a (dyn Fn(&AgentName, &EmailAddress) -> Vec<(String, Vec<u8>)> + Send + Sync);

/// Writes the SPEC §5 layout into a fresh prefix. A folder left under this
/// id by an earlier attempt that crashed before its row (the caller checked
/// there is none) is replaced.
async fn seed_storage(
    storage: &dyn AgentStorage,
    agent: &AgentId,
    name: &AgentName,
    email: &EmailAddress,
    owner: &EmailAddress,
    model: &str,
    extra: SeedFiles<'_>,
) -> Result<()> {
    let workspace = match storage.create(agent).await {
        Err(tinyfat_storage::StorageError::AlreadyExists(_)) => {
            tracing::info!(agent = %agent, "replacing the storage an interrupted provisioning left");
            storage.delete(agent).await?;
            storage.create(agent).await?
        }
        other => other?,
    };
    for dir in LAYOUT_DIRS {
        workspace.dir.create_dir_all(&validate_path(dir).map_err(Error::invalid)?)?;
    }
    let write = |path: &str, bytes: &[u8]| -> Result<()> {
        Ok(workspace.dir.write_atomic(&validate_path(path).map_err(Error::invalid)?, bytes)?)
    };
    write("MEMORY.md", seed_memory(name, owner).as_bytes())?;
    write("config.json", AgentConfig::new(model).to_pretty_json().as_bytes())?;
    for (path, bytes) in extra(name, email) {
        write(&path, &bytes)?;
    }
    storage.commit(&workspace).await?;
    Ok(())
}

impl Platform {
    pub async fn create_agent(&self, req: CreateAgent) -> Result<Agent> {
        self.create_agent_seeded(req, AgentId::from_ulid(ulid::Ulid::new()), &|_, _| Vec::new()).await
    }

    /// `create_agent` under an id the caller chose, with `extra` files in the
    /// seeded prefix. The id must not belong to an agent row (checked); a
    /// folder under it without a row is replaced (see the module header), so
    /// the caller must be the only one creating under that id.
    pub async fn create_agent_seeded(&self, req: CreateAgent, id: AgentId, extra: SeedFiles<'_>) -> Result<Agent> {
        if self.store.agent_by_id(&id).await?.is_some() {
            return Err(Error::Invalid(format!("agent id {id} is taken")));
        }
        let model = req.model.unwrap_or_else(|| self.settings.model.default.clone());
        if model.trim().is_empty() {
            return Err(Error::Invalid("--model must not be empty".into()));
        }
        let now = self.now_ms();
        let user_id = format!("us_{}", tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()));
        let owner = self.store.upsert_user(&user_id, &req.owner, now).await?;
        let chosen = match &req.name {
            Some(name) => {
                let name = AgentName::parse(name).map_err(Error::invalid)?;
                if self.store.agent_by_name(name.as_str()).await?.is_some() {
                    return Err(Error::DuplicateName(name.to_string()));
                }
                Some(name)
            }
            None => None,
        };

        for _ in 0..NAME_ATTEMPTS_MAX {
            let name = match &chosen {
                Some(name) => name.clone(),
                None => {
                    let candidate = AgentName::generate(&mut rand::rng());
                    if self.store.agent_by_name(candidate.as_str()).await?.is_some() {
                        continue;
                    }
                    candidate
                }
            };
            let email =
                EmailAddress::parse(&format!("{name}@{}", self.settings.email.domain)).map_err(Error::invalid)?;
            seed_storage(self.storage.as_ref(), &id, &name, &email, &req.owner, &model, extra).await?;
            let new = NewAgent {
                id: id.clone(),
                name: name.clone(),
                email,
                owner_id: owner.id.clone(),
                model: model.clone(),
                created_ms: now,
            };
            match self.store.insert_agent(&new).await {
                Ok(agent) => {
                    let owner_rule = SenderPattern::Email(req.owner.clone());
                    self.store.add_sender(&agent.id, &owner_rule, now).await?;
                    tracing::info!(agent = %agent.id, name = %agent.name, "agent created");
                    return Ok(agent);
                }
                Err(StoreError::Conflict(_)) => {
                    // Lost a race for the name: undo the storage and try again.
                    self.storage.delete(&id).await?;
                    if chosen.is_some() {
                        return Err(Error::DuplicateName(name.to_string()));
                    }
                }
                Err(e) => {
                    self.storage.delete(&id).await?;
                    return Err(e.into());
                }
            }
        }
        Err(Error::Other(anyhow::anyhow!("could not find a free agent name after {NAME_ATTEMPTS_MAX} attempts")))
    }

    /// Deletes the agent's rows, then its storage.
    pub async fn delete_agent(&self, agent: &Agent) -> Result<tinyfat_store::DeletedRows> {
        let rows = self.store.delete_agent(&agent.id).await?;
        self.storage.delete(&agent.id).await?;
        tracing::info!(agent = %agent.id, name = %agent.name, "agent deleted");
        Ok(rows)
    }

    pub async fn allow_sender(&self, agent: &Agent, sender: &str) -> Result<bool> {
        let rule = SenderPattern::parse(sender).map_err(Error::invalid)?;
        Ok(self.store.add_sender(&agent.id, &rule, self.now_ms()).await?)
    }

    pub async fn disallow_sender(&self, agent: &Agent, sender: &str) -> Result<bool> {
        let rule = SenderPattern::parse(sender).map_err(Error::invalid)?;
        Ok(self.store.remove_sender(&agent.id, &rule).await?)
    }

    pub async fn agent_view(&self, agent: &Agent) -> Result<AgentView> {
        let mut view = AgentView::new(agent);
        let senders = self.store.list_senders(&agent.id).await?;
        view.allowed_senders = Some(senders.iter().map(ToString::to_string).collect());
        view.storage = Some(format!("{}/agents/{}", self.storage.describe(), agent.id));
        Ok(view)
    }

    /// Reads the agent's `config.json` (hostile input: parsed, never trusted blindly).
    pub async fn agent_config(&self, agent: &Agent) -> Result<AgentConfig> {
        let workspace = self.storage.checkout(&agent.id).await?;
        let text = workspace.dir.read_string(&config_path(), CONFIG_BYTES_MAX)?;
        serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("config.json of {} is invalid: {e}", agent.name)))
    }
}

pub const CONFIG_BYTES_MAX: u64 = 64 * 1024;

pub fn config_path() -> RelPath {
    validate_path("config.json").expect("static path")
}
