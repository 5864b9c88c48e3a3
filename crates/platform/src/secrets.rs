//! Per-agent secrets: sealed with the master key before they reach the
//! store, opened only when a turn or a delivery needs them, never logged.
//! Key rotation reseals every secret in one transaction (see `keys`).

use serde::Serialize;
use tinyfat_core::Secret;
use tinyfat_store::{Agent, StoredSecret};

use crate::Platform;
use crate::error::{Error, Result};

pub const SECRET_NAME_LEN_MAX: usize = 64;
pub const SECRET_VALUE_BYTES_MAX: usize = 16 * 1024;

#[derive(Clone, Debug, Serialize)]
pub struct SecretView {
    pub name: String,
    pub key_id: String,
    pub updated_at: String,
}

fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= SECRET_NAME_LEN_MAX
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid secret name {name:?}: use 1-{SECRET_NAME_LEN_MAX} characters a-z, 0-9 and _ (e.g. anthropic_api_key)"
        )))
    }
}

impl Platform {
    pub async fn set_secret(&self, agent: &Agent, name: &str, value: &Secret) -> Result<()> {
        validate_name(name)?;
        if value.is_empty() {
            return Err(Error::Invalid("the secret value is empty (it is read from standard input)".into()));
        }
        if value.expose().len() > SECRET_VALUE_BYTES_MAX {
            return Err(Error::Invalid(format!("the secret value is over {SECRET_VALUE_BYTES_MAX} bytes")));
        }
        let sealed = self.cipher.seal(&mut rand::rng(), &agent.id, name, value);
        self.store.put_secret(&agent.id, name, &sealed, self.now_ms()).await?;
        tracing::info!(agent = %agent.id, secret = name, "secret set");
        Ok(())
    }

    pub async fn secret(&self, agent: &Agent, name: &str) -> Result<Option<Secret>> {
        match self.store.get_secret(&agent.id, name).await? {
            Some(sealed) => Ok(Some(self.cipher.open(&agent.id, name, &sealed)?)),
            None => Ok(None),
        }
    }

    pub async fn list_secrets(&self, agent: &Agent) -> Result<Vec<SecretView>> {
        Ok(self
            .store
            .list_secrets(&agent.id)
            .await?
            .into_iter()
            .map(|s| SecretView {
                name: s.name,
                key_id: s.key_id,
                updated_at: crate::provision::format_ms(s.updated_ms),
            })
            .collect())
    }

    pub async fn unset_secret(&self, agent: &Agent, name: &str) -> Result<bool> {
        validate_name(name)?;
        Ok(self.store.delete_secret(&agent.id, name).await?)
    }

    /// Re-encrypts every secret under a new master key; returns how many.
    /// Safe to run again after a crash: it finishes the interrupted rotation.
    pub async fn rotate_master_key(&self) -> Result<usize> {
        let new_key = crate::keys::begin_rotation(&self.settings)?;
        let sealer = tinyfat_core::Cipher::new(new_key);
        let all = self.store.all_secrets().await?;
        let rng = &mut rand::rng();
        let mut resealed = Vec::with_capacity(all.len());
        for stored in &all {
            let plain = self.cipher.open(&stored.agent_id, &stored.name, &stored.sealed)?;
            resealed.push(StoredSecret {
                agent_id: stored.agent_id.clone(),
                name: stored.name.clone(),
                sealed: sealer.seal(rng, &stored.agent_id, &stored.name, &plain),
            });
        }
        self.store.reseal_secrets(&resealed, self.now_ms()).await?;
        crate::keys::finish_rotation(&self.settings)?;
        tracing::info!(secrets = resealed.len(), key_id = %sealer.current_key_id(), "master key rotated");
        Ok(resealed.len())
    }
}
