//! Secret encryption: AES-256-GCM under the master key, a random 96-bit nonce
//! per value, and the agent id plus the key name as associated data, so a
//! ciphertext moved to another agent or another name fails to open.
//!
//! A `SealedSecret` carries the id of the master key that sealed it; a
//! `Cipher` holds one or more keys (during a rotation) and picks by id.
//! Every failure is `CryptoError` and fails closed: no partial plaintext.

use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::Rng;
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::{AgentId, Secret};

pub const MASTER_KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    #[error("master key must be 32 bytes of base64 (got {0} bytes)")]
    BadKeyLength(usize),
    #[error("master key is not valid base64")]
    BadKeyEncoding,
    #[error("secret was sealed with master key {0}, which is not loaded")]
    UnknownKey(KeyId),
    #[error("secret failed to decrypt: wrong key, wrong agent or name, or tampered ciphertext")]
    Open,
    #[error("secret is not valid UTF-8")]
    NotUtf8,
}

/// A short public fingerprint of a master key, stored with each ciphertext.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub String);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 32 secret bytes. Never printed; zeroed on drop.
#[derive(Clone)]
pub struct MasterKey {
    bytes: [u8; MASTER_KEY_BYTES],
}

impl MasterKey {
    pub fn generate(rng: &mut impl Rng) -> Self {
        let mut bytes = [0u8; MASTER_KEY_BYTES];
        rng.fill(&mut bytes);
        Self { bytes }
    }

    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let mut decoded = BASE64.decode(text.trim()).map_err(|_| CryptoError::BadKeyEncoding)?;
        let result = <[u8; MASTER_KEY_BYTES]>::try_from(decoded.as_slice())
            .map(|bytes| Self { bytes })
            .map_err(|_| CryptoError::BadKeyLength(decoded.len()));
        decoded.zeroize();
        result
    }

    /// The base64 form written to `master.key`. Handle as a secret.
    pub fn to_base64(&self) -> Secret {
        Secret::new(BASE64.encode(self.bytes))
    }

    pub fn id(&self) -> KeyId {
        let digest = Sha256::new().chain_update(b"tinyfat master key id\0").chain_update(self.bytes).finalize();
        KeyId(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({}, <redacted>)", self.id())
    }
}

/// What the metadata store keeps for one secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedSecret {
    pub key_id: KeyId,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// Seals with the current key; opens with any loaded key, chosen by id.
#[derive(Clone, Debug)]
pub struct Cipher {
    current: MasterKey,
    others: Vec<MasterKey>,
}

impl Cipher {
    pub fn new(current: MasterKey) -> Self {
        Self { current, others: Vec::new() }
    }

    /// Adds a key that can open (not seal) secrets, e.g. the old key mid-rotation.
    pub fn with_opening_key(mut self, key: MasterKey) -> Self {
        if key.id() != self.current.id() {
            self.others.push(key);
        }
        self
    }

    pub fn current_key_id(&self) -> KeyId {
        self.current.id()
    }

    pub fn seal(&self, rng: &mut impl Rng, agent: &AgentId, name: &str, plaintext: &Secret) -> SealedSecret {
        let mut nonce = [0u8; NONCE_BYTES];
        rng.fill(&mut nonce);
        let aad = associated_data(agent, name);
        let ciphertext = aes(&self.current)
            .encrypt(&Nonce::from(nonce), Payload { msg: plaintext.expose().as_bytes(), aad: &aad })
            .expect("AES-GCM encryption cannot fail for inputs under 64 GiB");
        SealedSecret { key_id: self.current.id(), nonce: nonce.to_vec(), ciphertext }
    }

    pub fn open(&self, agent: &AgentId, name: &str, sealed: &SealedSecret) -> Result<Secret, CryptoError> {
        let key = std::iter::once(&self.current)
            .chain(&self.others)
            .find(|k| k.id() == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey(sealed.key_id.clone()))?;
        let nonce = <[u8; NONCE_BYTES]>::try_from(sealed.nonce.as_slice()).map_err(|_| CryptoError::Open)?;
        let aad = associated_data(agent, name);
        let mut plain = aes(key)
            .decrypt(&Nonce::from(nonce), Payload { msg: &sealed.ciphertext, aad: &aad })
            .map_err(|_| CryptoError::Open)?;
        let text = String::from_utf8(std::mem::take(&mut plain)).map_err(|e| {
            let mut bytes = e.into_bytes();
            bytes.zeroize();
            CryptoError::NotUtf8
        })?;
        Ok(Secret::new(text))
    }
}

fn aes(key: &MasterKey) -> Aes256Gcm {
    Aes256Gcm::new(&key.bytes.into())
}

/// `agent_id \0 name`: binds a ciphertext to its owner and its name.
fn associated_data(agent: &AgentId, name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(agent.as_str().len() + 1 + name.len());
    aad.extend_from_slice(agent.as_str().as_bytes());
    aad.push(0);
    aad.extend_from_slice(name.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(n: u64) -> AgentId {
        AgentId::from_ulid(ulid::Ulid::from_parts(n, n as u128))
    }

    #[test]
    fn round_trip() {
        let rng = &mut rand::rng();
        let cipher = Cipher::new(MasterKey::generate(rng));
        let sealed = cipher.seal(rng, &agent(1), "anthropic_api_key", &Secret::new("sk-123"));
        assert_eq!(sealed.nonce.len(), 12);
        assert!(!sealed.ciphertext.windows(6).any(|w| w == b"sk-123"));
        assert_eq!(cipher.open(&agent(1), "anthropic_api_key", &sealed).unwrap().expose(), "sk-123");
    }

    #[test]
    fn nonces_differ_per_value() {
        let rng = &mut rand::rng();
        let cipher = Cipher::new(MasterKey::generate(rng));
        let a = cipher.seal(rng, &agent(1), "k", &Secret::new("same"));
        let b = cipher.seal(rng, &agent(1), "k", &Secret::new("same"));
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn fails_closed() {
        let rng = &mut rand::rng();
        let cipher = Cipher::new(MasterKey::generate(rng));
        let sealed = cipher.seal(rng, &agent(1), "k", &Secret::new("value"));

        let mut tampered = sealed.clone();
        tampered.ciphertext[0] ^= 1;
        assert_eq!(cipher.open(&agent(1), "k", &tampered), Err(CryptoError::Open));

        let mut bad_nonce = sealed.clone();
        bad_nonce.nonce[3] ^= 0x80;
        assert_eq!(cipher.open(&agent(1), "k", &bad_nonce), Err(CryptoError::Open));

        assert_eq!(cipher.open(&agent(2), "k", &sealed), Err(CryptoError::Open));
        assert_eq!(cipher.open(&agent(1), "other", &sealed), Err(CryptoError::Open));

        let stranger = Cipher::new(MasterKey::generate(rng));
        assert!(matches!(stranger.open(&agent(1), "k", &sealed), Err(CryptoError::UnknownKey(_))));
        // Same id forged onto a different key still fails to authenticate.
        let mut forged = sealed.clone();
        forged.key_id = stranger.current_key_id();
        assert_eq!(stranger.open(&agent(1), "k", &forged), Err(CryptoError::Open));
    }

    #[test]
    fn rotation_opens_with_old_key() {
        let rng = &mut rand::rng();
        let old = MasterKey::generate(rng);
        let sealed = Cipher::new(old.clone()).seal(rng, &agent(1), "k", &Secret::new("v"));
        let both = Cipher::new(MasterKey::generate(rng)).with_opening_key(old);
        assert_eq!(both.open(&agent(1), "k", &sealed).unwrap().expose(), "v");
    }

    #[test]
    fn key_base64_round_trip_and_errors() {
        let key = MasterKey::generate(&mut rand::rng());
        let again = MasterKey::from_base64(key.to_base64().expose()).unwrap();
        assert_eq!(key.id(), again.id());
        assert_eq!(MasterKey::from_base64("!!").unwrap_err(), CryptoError::BadKeyEncoding);
        assert_eq!(MasterKey::from_base64("AAAA").unwrap_err(), CryptoError::BadKeyLength(3));
        assert!(!format!("{key:?}").contains(key.to_base64().expose()));
    }
}
