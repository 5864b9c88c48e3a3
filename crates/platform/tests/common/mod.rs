//! Setup the email-channel tests share.

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
