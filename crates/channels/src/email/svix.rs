//! Svix webhook signatures, as Resend sends them on `POST /webhooks/resend`.
//!
//! The check runs over the raw request body before anything parses it:
//! `v1,<base64(HMAC-SHA256(key, "{svix-id}.{svix-timestamp}.{body}"))>`,
//! where the key is the base64-decoded part of the `whsec_…` secret. The
//! `svix-signature` header holds space-separated entries (several while the
//! sender rotates keys); any one matching entry under any configured secret
//! passes. The timestamp must lie within five minutes of `now` in either
//! direction, and signatures are compared in constant time.
//!
//! This module must not parse the body, read a clock or log a secret: the
//! caller passes `now` and gets back the verified `svix-id` for the dedup key
//! `resend:{svix-id}`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const HEADER_ID: &str = "svix-id";
pub const HEADER_TIMESTAMP: &str = "svix-timestamp";
pub const HEADER_SIGNATURE: &str = "svix-signature";
pub const SECRET_PREFIX: &str = "whsec_";
/// Accepted clock difference between Svix and us, both directions.
pub const TOLERANCE_S: i64 = 5 * 60;
/// Signature entries looked at per request; more are ignored.
pub const SIGNATURES_MAX: usize = 16;
/// Longest `svix-id` accepted: it becomes part of a dedup key.
pub const ID_BYTES_MAX: usize = 256;
const SIGNATURE_BYTES: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a webhook was refused. Every variant means the same to the HTTP
/// caller (401, enqueue nothing); the variants exist for logs and metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SvixError {
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("svix-id is empty, too long or not printable ASCII")]
    BadId,
    #[error("svix-timestamp is not a Unix time in seconds")]
    BadTimestamp,
    #[error("webhook timestamp is {age_s} s old (tolerance {TOLERANCE_S} s)")]
    TooOld { age_s: i64 },
    #[error("webhook timestamp is {ahead_s} s in the future (tolerance {TOLERANCE_S} s)")]
    TooNew { ahead_s: i64 },
    #[error("no svix-signature entry matches")]
    NoMatchingSignature,
    #[error("webhook secret is not whsec_<base64>")]
    BadSecret,
}

/// A webhook signing key. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct WebhookSecret {
    key: Vec<u8>,
}

impl WebhookSecret {
    /// Parses `whsec_<base64>` (the prefix is optional, as in Svix's own
    /// libraries).
    pub fn parse(secret: &str) -> Result<Self, SvixError> {
        let secret = secret.trim();
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let key = STANDARD.decode(encoded).map_err(|_| SvixError::BadSecret)?;
        if key.is_empty() {
            return Err(SvixError::BadSecret);
        }
        Ok(Self { key })
    }

    pub fn from_key(key: &[u8]) -> Result<Self, SvixError> {
        if key.is_empty() {
            return Err(SvixError::BadSecret);
        }
        Ok(Self { key: key.to_vec() })
    }

    fn mac(&self, id: &str, timestamp: &str, body: &[u8]) -> [u8; SIGNATURE_BYTES] {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

/// The three Svix headers as the HTTP layer found them.
#[derive(Clone, Copy, Debug, Default)]
pub struct SvixHeaders<'a> {
    pub id: Option<&'a str>,
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
}

impl<'a> SvixHeaders<'a> {
    /// Reads the headers through a lookup function (header names are
    /// passed lowercase).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self { id: lookup(HEADER_ID), timestamp: lookup(HEADER_TIMESTAMP), signature: lookup(HEADER_SIGNATURE) }
    }
}

/// A webhook whose signature checked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedWebhook {
    /// `svix-id`: stable across Resend's retries of one event.
    pub id: String,
    pub timestamp: i64,
}

impl VerifiedWebhook {
    /// `resend:{svix-id}` (SPEC §4).
    pub fn dedup_key(&self) -> String {
        format!("resend:{}", self.id)
    }
}

/// Verifies a webhook against any of `secrets` (several during a rotation).
pub fn verify(
    secrets: &[WebhookSecret],
    headers: &SvixHeaders<'_>,
    body: &[u8],
    now_unix_s: i64,
) -> Result<VerifiedWebhook, SvixError> {
    let id = headers.id.ok_or(SvixError::MissingHeader(HEADER_ID))?.trim();
    let timestamp_text = headers.timestamp.ok_or(SvixError::MissingHeader(HEADER_TIMESTAMP))?.trim();
    let signature = headers.signature.ok_or(SvixError::MissingHeader(HEADER_SIGNATURE))?;
    if id.is_empty() || id.len() > ID_BYTES_MAX || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(SvixError::BadId);
    }
    if timestamp_text.is_empty() || timestamp_text.len() > 12 || !timestamp_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SvixError::BadTimestamp);
    }
    let timestamp: i64 = timestamp_text.parse().map_err(|_| SvixError::BadTimestamp)?;
    if timestamp < now_unix_s - TOLERANCE_S {
        return Err(SvixError::TooOld { age_s: now_unix_s - timestamp });
    }
    if timestamp > now_unix_s + TOLERANCE_S {
        return Err(SvixError::TooNew { ahead_s: timestamp - now_unix_s });
    }
    if secrets.is_empty() {
        return Err(SvixError::BadSecret);
    }
    let candidates: Vec<[u8; SIGNATURE_BYTES]> = signature
        .split_ascii_whitespace()
        .take(SIGNATURES_MAX)
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|bytes| <[u8; SIGNATURE_BYTES]>::try_from(bytes.as_slice()).ok())
        .collect();
    // Every candidate is compared against every key without stopping early,
    // so timing says nothing about which entry or key matched.
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        let expected = secret.mac(id, timestamp_text, body);
        for candidate in &candidates {
            matched |= expected.ct_eq(candidate);
        }
    }
    if bool::from(matched) {
        Ok(VerifiedWebhook { id: id.to_owned(), timestamp })
    } else {
        Err(SvixError::NoMatchingSignature)
    }
}

/// Signs like Svix does: one `v1,<base64>` entry. For tests and for fake
/// Resend servers; production only verifies.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8]) -> String {
    format!("v1,{}", STANDARD.encode(secret.mac(id, &timestamp.to_string(), body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The example from Svix's documentation and libraries, recomputed
    // independently with Python's hmac/base64.
    const SVIX_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SVIX_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SVIX_TS: i64 = 1_614_265_330;
    const SVIX_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SVIX_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    // A second vector computed with Python for a key of our own:
    // base64.b64encode(hmac.new(b"tinyfat-rotated-webhook-key-0002",
    //   b"msg_2zJmQ0u9mYbqL0pS8dVx1f3Kc7T.1782907200." + BODY, sha256).digest())
    const ROTATED_SECRET: &str = "whsec_dGlueWZhdC1yb3RhdGVkLXdlYmhvb2sta2V5LTAwMDI=";
    const ROTATED_ID: &str = "msg_2zJmQ0u9mYbqL0pS8dVx1f3Kc7T";
    const ROTATED_TS: i64 = 1_782_907_200;
    const ROTATED_BODY: &[u8] = br#"{"type":"email.received","created_at":"2026-07-01T12:00:00.000Z","data":{"email_id":"4ef9a417-02e9-4d39-ad75-9611e0fcc33c"}}"#;
    const ROTATED_SIG: &str = "v1,7KyGi4BGf1/t6jN93VKRdkiPxQ/jQXxmO6Ld/+VqLqU=";

    fn headers<'a>(id: &'a str, ts: &'a str, sig: &'a str) -> SvixHeaders<'a> {
        SvixHeaders { id: Some(id), timestamp: Some(ts), signature: Some(sig) }
    }

    fn secret(s: &str) -> WebhookSecret {
        WebhookSecret::parse(s).unwrap()
    }

    #[test]
    fn known_vectors_pass() {
        let ts = SVIX_TS.to_string();
        let ok = verify(&[secret(SVIX_SECRET)], &headers(SVIX_ID, &ts, SVIX_SIG), SVIX_BODY, SVIX_TS).unwrap();
        assert_eq!(ok, VerifiedWebhook { id: SVIX_ID.into(), timestamp: SVIX_TS });
        assert_eq!(ok.dedup_key(), format!("resend:{SVIX_ID}"));
        assert_eq!(sign(&secret(SVIX_SECRET), SVIX_ID, SVIX_TS, SVIX_BODY), SVIX_SIG);

        let ts = ROTATED_TS.to_string();
        let h = headers(ROTATED_ID, &ts, ROTATED_SIG);
        assert!(verify(&[secret(ROTATED_SECRET)], &h, ROTATED_BODY, ROTATED_TS + 299).is_ok());
        assert_eq!(sign(&secret(ROTATED_SECRET), ROTATED_ID, ROTATED_TS, ROTATED_BODY), ROTATED_SIG);
    }

    #[test]
    fn any_matching_entry_or_key_passes() {
        let ts = ROTATED_TS.to_string();
        // Several entries, the matching one last, with junk and other versions.
        let many = format!("v1,AAAA v2,{} v1,not-base64!! {SVIX_SIG} {ROTATED_SIG}", &ROTATED_SIG[3..]);
        let h = headers(ROTATED_ID, &ts, &many);
        assert!(verify(&[secret(ROTATED_SECRET)], &h, ROTATED_BODY, ROTATED_TS).is_ok());
        // Rotated secrets on our side: old and new both configured.
        let h = headers(ROTATED_ID, &ts, ROTATED_SIG);
        assert!(verify(&[secret(SVIX_SECRET), secret(ROTATED_SECRET)], &h, ROTATED_BODY, ROTATED_TS).is_ok());
        // The prefix is optional.
        let bare = WebhookSecret::parse(ROTATED_SECRET.strip_prefix("whsec_").unwrap()).unwrap();
        assert!(verify(&[bare], &h, ROTATED_BODY, ROTATED_TS).is_ok());
    }

    #[test]
    fn round_trip_with_own_signer() {
        let s = WebhookSecret::from_key(&[7u8; 24]).unwrap();
        let body = b"{\"type\":\"email.received\"}";
        let sig = sign(&s, "msg_1", 1_800_000_000, body);
        let h = headers("msg_1", "1800000000", &sig);
        assert!(verify(std::slice::from_ref(&s), &h, body, 1_800_000_000).is_ok());
        let other = WebhookSecret::from_key(&[8u8; 24]).unwrap();
        assert_eq!(verify(&[other], &h, body, 1_800_000_000), Err(SvixError::NoMatchingSignature));
    }

    #[test]
    fn refusals() {
        let ts = SVIX_TS.to_string();
        let good = secret(SVIX_SECRET);
        let keys = std::slice::from_ref(&good);
        let cases: Vec<(SvixHeaders<'_>, &[u8], i64, SvixError)> = vec![
            // Tampered body.
            (headers(SVIX_ID, &ts, SVIX_SIG), br#"{"test": 2432232315}"#, SVIX_TS, SvixError::NoMatchingSignature),
            // Tampered id and timestamp are part of the signed content.
            (headers("msg_other", &ts, SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::NoMatchingSignature),
            // Expired and future timestamps (signature valid, time not).
            (headers(SVIX_ID, &ts, SVIX_SIG), SVIX_BODY, SVIX_TS + 301, SvixError::TooOld { age_s: 301 }),
            (headers(SVIX_ID, &ts, SVIX_SIG), SVIX_BODY, SVIX_TS - 301, SvixError::TooNew { ahead_s: 301 }),
            (headers(SVIX_ID, "16142653x0", SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::BadTimestamp),
            (headers(SVIX_ID, "-1614265330", SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::BadTimestamp),
            (headers(SVIX_ID, "", SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::BadTimestamp),
            (headers("", &ts, SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::BadId),
            (headers("a b", &ts, SVIX_SIG), SVIX_BODY, SVIX_TS, SvixError::BadId),
            // Only v1 entries count; an empty header matches nothing.
            (
                headers(SVIX_ID, &ts, "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
                SVIX_BODY,
                SVIX_TS,
                SvixError::NoMatchingSignature,
            ),
            (headers(SVIX_ID, &ts, ""), SVIX_BODY, SVIX_TS, SvixError::NoMatchingSignature),
            (
                SvixHeaders { id: None, ..headers(SVIX_ID, &ts, SVIX_SIG) },
                SVIX_BODY,
                SVIX_TS,
                SvixError::MissingHeader(HEADER_ID),
            ),
            (
                SvixHeaders { timestamp: None, ..headers(SVIX_ID, &ts, SVIX_SIG) },
                SVIX_BODY,
                SVIX_TS,
                SvixError::MissingHeader(HEADER_TIMESTAMP),
            ),
            (
                SvixHeaders { signature: None, ..headers(SVIX_ID, &ts, SVIX_SIG) },
                SVIX_BODY,
                SVIX_TS,
                SvixError::MissingHeader(HEADER_SIGNATURE),
            ),
        ];
        for (i, (h, body, now, want)) in cases.into_iter().enumerate() {
            assert_eq!(verify(keys, &h, body, now), Err(want), "case {i}");
        }
        // Wrong secret.
        let h = headers(SVIX_ID, &ts, SVIX_SIG);
        assert_eq!(verify(&[secret(ROTATED_SECRET)], &h, SVIX_BODY, SVIX_TS), Err(SvixError::NoMatchingSignature));
        assert_eq!(verify(&[], &h, SVIX_BODY, SVIX_TS), Err(SvixError::BadSecret));
        // Edges of the window are inside it.
        assert!(verify(keys, &h, SVIX_BODY, SVIX_TS + 300).is_ok());
        assert!(verify(keys, &h, SVIX_BODY, SVIX_TS - 300).is_ok());
    }

    #[test]
    fn secrets() {
        for bad in ["", "whsec_", "whsec_***", "whsec_ not base64"] {
            assert_eq!(WebhookSecret::parse(bad).unwrap_err(), SvixError::BadSecret, "{bad:?}");
        }
        assert_eq!(format!("{:?}", secret(SVIX_SECRET)), "WebhookSecret(<redacted>)");
        let looked_up = SvixHeaders::from_lookup(|name| match name {
            "svix-id" => Some("msg_1"),
            "svix-timestamp" => Some("1"),
            "svix-signature" => Some("v1,x"),
            _ => None,
        });
        assert_eq!((looked_up.id, looked_up.timestamp, looked_up.signature), (Some("msg_1"), Some("1"), Some("v1,x")));
    }
}
