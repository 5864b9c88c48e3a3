//! Setup the email-channel tests share. (Each test binary uses part of it.)
#![allow(dead_code)]

use tinyfat_channels::email::svix;
use tinyfat_core::EmailAddress;
use tinyfat_platform::Platform;
use tinyfat_platform::provision::CreateAgent;
use tinyfat_store::Agent;

/// The owner of the agent `agent` creates.
pub const OWNER: &str = "alice@example.com";

/// Creates the agent `swiftpebble`, owned by `OWNER`, and reads it back.
pub async fn agent(platform: &Platform) -> Agent {
    let owner = EmailAddress::parse(OWNER).unwrap();
    let view =
        platform.create_agent(CreateAgent { owner, name: Some("swiftpebble".into()), model: None }).await.unwrap();
    platform.agent(view.id.as_str()).await.unwrap()
}

/// The Resend webhook signing secret the email tests configure
/// (`email.resend_webhook_secret`): Svix's documented example secret.
pub const RESEND_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// POSTs `body` to `{base}/webhooks/resend` with Svix's headers, signed
/// with `RESEND_SECRET` at `now_s`, or with `signature` as given (an empty
/// one sends no signature header).
pub async fn post_resend_webhook(
    http: &reqwest::Client,
    base: &str,
    svix_id: &str,
    now_s: i64,
    body: &str,
    signature: Option<String>,
) -> reqwest::StatusCode {
    let signature = signature.unwrap_or_else(|| {
        svix::sign(&svix::WebhookSecret::parse(RESEND_SECRET).unwrap(), svix_id, now_s, body.as_bytes())
    });
    let mut request = http
        .post(format!("{base}/webhooks/resend"))
        .header(svix::HEADER_ID, svix_id)
        .header(svix::HEADER_TIMESTAMP, now_s.to_string())
        .body(body.to_owned());
    if !signature.is_empty() {
        request = request.header(svix::HEADER_SIGNATURE, signature);
    }
    request.send().await.unwrap().status()
}
