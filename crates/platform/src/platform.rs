//! Configuration, second layer: the components built from `Settings`. Opening
//! a platform creates the data folder (mode 0700), loads or generates the
//! master key, connects the metadata store and applies migrations, and opens
//! agent storage.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use anyhow::Context;
use tinyfat_core::Cipher;
use tinyfat_storage::AgentStorage;
use tinyfat_store::{Agent, Store};

use crate::clock::{Clock, SystemClock};
use crate::config::Settings;
use crate::error::{Error, Result};

#[derive(Clone, Debug)]
pub struct Platform {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn Store>,
    pub storage: Arc<dyn AgentStorage>,
    pub cipher: Cipher,
    pub clock: Arc<dyn Clock>,
    /// One HTTP client (connection pool) for every model call.
    pub http: tinyfat_model::HttpClient,
    /// Runs every tool process (the sandbox).
    pub executor: Arc<dyn tinyfat_sandbox::ToolExecutor>,
    /// Parsed session logs kept between turns (`SessionCache`).
    pub sessions: Arc<tinyfat_runtime::SessionCache>,
    /// Facts for the startup log.
    pub key_source: String,
    pub key_generated: bool,
}

/// Session file bytes whose parsed records stay in memory between turns
/// (the records take about twice that).
const SESSION_CACHE_BYTES_MAX: u64 = 32 << 20;

impl Platform {
    pub async fn open(settings: Settings) -> anyhow::Result<Self> {
        let data_dir = &settings.data_dir;
        if !data_dir.exists() {
            std::fs::create_dir_all(data_dir)
                .with_context(|| format!("cannot create data folder {}", data_dir.display()))?;
            std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let keys = crate::keys::load(&settings)?;
        let database_url = settings.database_url();
        let store = tinyfat_store::connect_with(&database_url, settings.queue_policy())
            .await
            .with_context(|| format!("cannot open the metadata store {database_url}"))?;
        store.migrate().await.context("database migration failed")?;
        let storage = tinyfat_storage::open(&settings.storage_url())?;
        storage.check().await.with_context(|| format!("agent storage {} is not usable", storage.describe()))?;
        let http = tinyfat_model::HttpClient::new(tinyfat_model::ClientOptions::default())
            .context("cannot build the HTTP client")?;
        let sandbox = tinyfat_sandbox::SandboxConfig {
            mode: if settings.sandbox.mode == "none" {
                tinyfat_sandbox::SandboxMode::None
            } else {
                tinyfat_sandbox::SandboxMode::Bwrap
            },
            warm: settings.sandbox.warm,
            ..Default::default()
        };
        let executor = tinyfat_sandbox::build_executor(&sandbox);
        Ok(Self {
            settings: Arc::new(settings),
            store,
            storage,
            cipher: keys.cipher,
            clock: Arc::new(SystemClock),
            http,
            executor,
            sessions: Arc::new(tinyfat_runtime::SessionCache::new(SESSION_CACHE_BYTES_MAX)),
            key_source: keys.source,
            key_generated: keys.generated,
        })
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Finds an agent by name (or id), or says how to list them.
    pub async fn agent(&self, name_or_id: &str) -> Result<Agent> {
        let found = match tinyfat_core::AgentId::parse(name_or_id) {
            Ok(id) => self.store.agent_by_id(&id).await?,
            Err(_) => self.store.agent_by_name(name_or_id).await?,
        };
        found.ok_or_else(|| Error::UnknownAgent(name_or_id.to_owned()))
    }
}
