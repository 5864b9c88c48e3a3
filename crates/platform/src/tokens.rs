//! API tokens for `Authorization: Bearer`: creating one (the plaintext is
//! returned once and never stored), listing and revoking them, and turning a
//! presented token into a `Caller`.
//!
//! A token is `tft_` + 32 random bytes in unpadded base64url. The store keeps
//! only the SHA-256 of the whole token, in hex. A fast hash is right here:
//! slow password hashes exist to make guessing low-entropy passwords
//! expensive, and a 256-bit random token cannot be guessed however fast the
//! hash is. A fast, unsalted hash also makes the hash itself the lookup key.
//!
//! This module does not decide what a caller may do; `auth` does.

use base64::Engine;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tinyfat_core::{EmailAddress, Secret};
use tinyfat_store::ApiToken;

use crate::Platform;
use crate::auth::Caller;
use crate::error::{Error, Result};

pub const TOKEN_PREFIX: &str = "tft_";
/// Random bytes in a token: 256 bits.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// Length of a well-formed token: the prefix and 43 base64url characters.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 43;
pub const TOKEN_NAME_LEN_MAX: usize = 64;

/// A token as `token list` and `GET /api/tokens` show it: never the
/// plaintext, never the hash.
#[derive(Clone, Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub name: String,
    /// The owner's email for a user token; `None` for an operator token.
    pub user: Option<String>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

/// A new token's plaintext, drawn from `rng`.
pub fn generate_token(rng: &mut impl RngCore) -> Secret {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    rng.fill_bytes(&mut bytes);
    Secret::new(format!("{TOKEN_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)))
}

/// The stored form of a token: lowercase hex SHA-256 of the whole plaintext.
pub fn hash_token(plaintext: &str) -> String {
    Sha256::digest(plaintext.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// True when `text` has the shape of a token. Checked before any lookup so
/// junk never reaches the store; the shape is public, so this leaks nothing.
fn well_formed(text: &str) -> bool {
    text.len() == TOKEN_LEN
        && text.starts_with(TOKEN_PREFIX)
        && text[TOKEN_PREFIX.len()..].bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn validate_name(name: &str) -> Result<()> {
    let ok =
        !name.trim().is_empty() && name.chars().count() <= TOKEN_NAME_LEN_MAX && !name.chars().any(char::is_control);
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid token name {name:?}: use 1-{TOKEN_NAME_LEN_MAX} printable characters")))
    }
}

impl Platform {
    /// Creates a token: an operator token when `user` is `None`, else one
    /// limited to that user's agents (the user row is created if missing).
    /// Returns the row and the plaintext, which exists only in this answer.
    pub async fn create_token(&self, name: Option<String>, user: Option<EmailAddress>) -> Result<(ApiToken, Secret)> {
        let name = match name {
            Some(name) => name.trim().to_owned(),
            None => user.as_ref().map_or_else(|| "operator".to_owned(), ToString::to_string),
        };
        validate_name(&name)?;
        let now = self.now_ms();
        let user_id = match &user {
            Some(email) => {
                let id_if_new = format!("us_{}", tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()));
                Some(self.store.upsert_user(&id_if_new, email, now).await?.id)
            }
            None => None,
        };
        let plaintext = generate_token(&mut rand::rng());
        let row = ApiToken {
            id: format!("tk_{}", tinyfat_core::ids::new_ulid_string(ulid::Ulid::new())),
            name,
            user_id,
            token_hash: hash_token(plaintext.expose()),
            created_ms: now,
            revoked_ms: None,
        };
        self.store.insert_token(&row).await?;
        tracing::info!(token = %row.id, user = ?user.as_ref().map(EmailAddress::as_str), "API token created");
        Ok((row, plaintext))
    }

    /// Every token, oldest first, revoked ones included.
    pub async fn list_tokens(&self) -> Result<Vec<TokenView>> {
        let tokens = self.store.list_tokens().await?;
        let mut emails = std::collections::HashMap::<String, Option<String>>::new();
        let mut views = Vec::with_capacity(tokens.len());
        for token in tokens {
            let user = match &token.user_id {
                Some(id) => match emails.get(id) {
                    Some(email) => email.clone(),
                    None => {
                        let email = self.store.user_by_id(id).await?.map(|u| u.email.to_string());
                        emails.insert(id.clone(), email.clone());
                        email
                    }
                },
                None => None,
            };
            views.push(self.token_view(&token, user));
        }
        Ok(views)
    }

    pub fn token_view(&self, token: &ApiToken, user: Option<String>) -> TokenView {
        TokenView {
            id: token.id.clone(),
            name: token.name.clone(),
            user,
            created_at: crate::provision::format_ms(token.created_ms),
            revoked_at: token.revoked_ms.map(crate::provision::format_ms),
        }
    }

    /// Revokes a live token at once. `false`: no live token has that id.
    pub async fn revoke_token(&self, id: &str) -> Result<bool> {
        let revoked = self.store.revoke_token(id, self.now_ms()).await?;
        if revoked {
            tracing::info!(token = id, "API token revoked");
        }
        Ok(revoked)
    }

    /// The caller a presented token stands for; `None` when it is malformed,
    /// unknown or revoked, or its user is gone.
    ///
    /// Timing: the row is found by the token's SHA-256, an index lookup whose
    /// timing depends only on the hash. Learning how much of a hash matched
    /// tells an attacker nothing about a token that would produce it, so it
    /// cannot be used to guess a token byte by byte. The stored hash is then
    /// compared with the computed one in constant time, so nothing about the
    /// comparison depends on where the two first differ either.
    pub async fn verify_token(&self, plaintext: &str) -> Result<Option<Caller>> {
        if !well_formed(plaintext) {
            return Ok(None);
        }
        let hash = hash_token(plaintext);
        let Some(token) = self.store.token_by_hash(&hash).await? else {
            return Ok(None);
        };
        if !bool::from(token.token_hash.as_bytes().ct_eq(hash.as_bytes())) || token.revoked_ms.is_some() {
            return Ok(None);
        }
        match token.user_id {
            None => Ok(Some(Caller::Operator)),
            Some(user_id) => Ok(self
                .store
                .user_by_id(&user_id)
                .await?
                .map(|user| Caller::User { user_id: user.id, email: user.email })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_documented_shape() {
        let token = generate_token(&mut rand::rng());
        assert_eq!(token.expose().len(), TOKEN_LEN);
        assert!(well_formed(token.expose()));
        assert_ne!(token.expose(), generate_token(&mut rand::rng()).expose());
        assert_eq!(hash_token(token.expose()).len(), 64);
        assert!(!well_formed("tft_short"));
        assert!(!well_formed(&format!("xxx_{}", &token.expose()[4..])));
        assert!(!well_formed(&format!("{}!", &token.expose()[..TOKEN_LEN - 1])));
    }
}
