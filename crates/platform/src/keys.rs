//! The master key on disk: `<data-dir>/master.key` (base64, mode 0600),
//! generated on first start; or `master_key` from the configuration.
//!
//! Rotation is crash-safe: the new key is first written to `master.key.next`,
//! then every secret is resealed in one transaction, then the file is renamed
//! over `master.key`. A crash at any point leaves a state `load` can open:
//! while `master.key.next` exists both keys are loaded and each ciphertext
//! names the key that sealed it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tinyfat_core::{Cipher, MasterKey};

use crate::config::Settings;

const KEY_FILE_MODE: u32 = 0o600;

#[derive(Debug)]
pub struct LoadedKeys {
    pub cipher: Cipher,
    /// Where the key came from, for the startup log.
    pub source: String,
    pub generated: bool,
}

fn next_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    PathBuf::from(name)
}

/// Writes a new key file with mode 0600, refusing to overwrite.
fn write_key_file(path: &Path, key: &MasterKey) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(KEY_FILE_MODE)
        .open(path)
        .with_context(|| format!("cannot create master key file {}", path.display()))?;
    file.write_all(key.to_base64().expose().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_key_file(path: &Path) -> anyhow::Result<MasterKey> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read master key {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "master key file is readable by group or others; run chmod 600 on it");
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read master key {}", path.display()))?;
    MasterKey::from_base64(&text).with_context(|| format!("master key {} is invalid", path.display()))
}

/// Loads (or on first start generates) the master key the settings name.
pub fn load(settings: &Settings) -> anyhow::Result<LoadedKeys> {
    if let Some(text) = &settings.master_key {
        let key = MasterKey::from_base64(text.expose()).context("master_key in the configuration is invalid")?;
        return Ok(LoadedKeys {
            cipher: Cipher::new(key),
            source: "configuration (master_key)".into(),
            generated: false,
        });
    }
    let path = settings.master_key_path();
    let next = next_path(&path);
    let source = path.display().to_string();
    if next.exists() {
        // A rotation was interrupted: open with both; `rotate` finishes it.
        let new = read_key_file(&next)?;
        let old = read_key_file(&path)?;
        return Ok(LoadedKeys { cipher: Cipher::new(new).with_opening_key(old), source, generated: false });
    }
    if path.exists() {
        return Ok(LoadedKeys { cipher: Cipher::new(read_key_file(&path)?), source, generated: false });
    }
    let key = MasterKey::generate(&mut rand::rng());
    write_key_file(&path, &key)?;
    Ok(LoadedKeys { cipher: Cipher::new(read_key_file(&path)?), source, generated: true })
}

/// Step 1 of a rotation: the key that will seal from now on.
pub fn begin_rotation(settings: &Settings) -> anyhow::Result<MasterKey> {
    if settings.master_key.is_some() {
        bail!(
            "master_key is set in the configuration: put the key in a file (master_key_file) to rotate it, \
             or replace the configured value yourself"
        );
    }
    let next = next_path(&settings.master_key_path());
    if next.exists() {
        return read_key_file(&next);
    }
    let key = MasterKey::generate(&mut rand::rng());
    write_key_file(&next, &key)?;
    Ok(key)
}

/// Step 3 of a rotation: every secret is resealed; retire the old key.
pub fn finish_rotation(settings: &Settings) -> anyhow::Result<()> {
    let path = settings.master_key_path();
    std::fs::rename(next_path(&path), &path).context("cannot replace the master key file")?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
