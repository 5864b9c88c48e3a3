//! Email replies filed in the agent's outbox (SPEC §5, §6): every email the
//! platform sent for the agent other than outbox files — the reply to the
//! conversation, `send_message` to email, `stop`/`/status` answers and
//! error notes — is filed as `outbox/sent/{delivery_id}.json` (or
//! `outbox/failed/` when it was given up), in the outbox file format with
//! `"status","sent_at","provider_message_id"` (or `"error","failed_at"`).
//!
//! Only the worker holding the agent's lease writes the prefix (SPEC §1), so
//! filing happens here, under the lease, in `process_outbox` (after each
//! turn, and first when a job is retried):
//! - due email deliveries of the agent are sent inline, right after the
//!   turn recorded them, through the delivery loop's own `deliver` (claim
//!   `sending`, send, record `sent`/`failed`/retry), so the reply is filed
//!   in the same run (the loop leaves new replies to the worker for a few
//!   seconds, see `deliver`);
//! - the agent's newest deliveries that are `sent` or `failed` but not yet
//!   filed are filed: those sent outside a turn (a transient failure the
//!   loop retried, a resend after a crash, a `stop` or `/status` answer)
//!   are filed by the agent's next run. Only the newest
//!   `RECENT_DELIVERIES_MAX` email rows are looked at (the agent's other
//!   channels are not read); an older one never filed stays only in the
//!   delivery table.
//!
//! Filing is idempotent: a file already there is left alone, so a crash
//! between the send and the filing only delays the file.
//!
//! This module must not send outside `deliver::deliver` (one claim and one
//! retry policy for every sender) or write outside `outbox/sent` and
//! `outbox/failed`.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use tinyfat_channels::email::outbound::Mailbox;
use tinyfat_channels::email::{outbound, outbox_file};
use tinyfat_storage::Workspace;
use tinyfat_store::{Agent, Delivery, DeliveryState, Lease};

use super::{EmailBody, draft_for, rel};
use crate::state::AppState;

/// The agent's newest email deliveries looked at per run.
const RECENT_DELIVERIES_MAX: u32 = 50;

/// Sends the agent's due email replies inline and files the sent and failed
/// ones not yet filed. Returns whether it wrote to the workspace.
pub(super) async fn send_and_file(
    state: &AppState,
    agent: &Agent,
    lease: &Lease,
    workspace: &Workspace,
) -> Result<bool, String> {
    let platform = &state.platform;
    let store = &platform.store;
    let rows = store.deliveries_on(&agent.id, "email", RECENT_DELIVERIES_MAX).await.map_err(|e| e.to_string())?;
    let mut changed = false;
    // Oldest first, so replies go out in the order they were recorded.
    for row in rows.into_iter().rev() {
        if row.idempotency_key.starts_with("outbox:") {
            continue;
        }
        let due = matches!(row.state, DeliveryState::Pending | DeliveryState::Sending)
            && row.next_attempt_ms <= platform.now_ms();
        let row = if due {
            if !store.renew(lease, platform.now_ms(), crate::worker::LEASE_MS).await.unwrap_or(false) {
                return Err("the lease was lost".into());
            }
            crate::deliver::deliver(state, &row).await;
            store.get_delivery(&row.id).await.map_err(|e| e.to_string())?.unwrap_or(row)
        } else {
            row
        };
        let folder = match row.state {
            DeliveryState::Sent => "sent",
            DeliveryState::Failed => "failed",
            DeliveryState::Pending | DeliveryState::Sending => continue,
        };
        let path = rel(&format!("outbox/{folder}/{}.json", row.id));
        if workspace.dir.kind(&path).map_err(|e| e.to_string())?.is_some() {
            continue;
        }
        let bytes = record(state, agent, &row).await;
        workspace.dir.write_atomic(&path, &bytes).map_err(|e| e.to_string())?;
        tracing::debug!(agent = %agent.name, delivery = %row.id, folder, "email reply filed in the outbox");
        changed = true;
    }
    Ok(changed)
}

/// The filed version of a delivery: the outbox file fields of the message as
/// it was composed, plus the sent or failed fields.
async fn record(state: &AppState, agent: &Agent, row: &Delivery) -> Vec<u8> {
    let body: EmailBody = serde_json::from_str(&row.body).unwrap_or_default();
    let at = DateTime::<Utc>::from_timestamp_millis(row.updated_ms).unwrap_or_default();
    let mut fields = json!({
        "to": [], "cc": [], "bcc": [], "subject": "",
        "body": body.text,
        "attachments": body.attachments.iter().map(|p| json!({"path": p})).collect::<Vec<_>>(),
        "delivery_id": row.id,
    });
    let from = Mailbox::new(Some(agent.name.as_str()), agent.email.clone());
    let composed = match draft_for(state, from, row, &body).await {
        Ok(draft) => outbound::compose(draft, &row.id, &state.platform.settings.email.domain, at).ok(),
        Err(_) => None,
    };
    if let Some(email) = composed {
        let strings = |v: &[tinyfat_core::EmailAddress]| v.iter().map(|a| Value::from(a.to_string())).collect();
        fields["to"] = Value::Array(strings(&email.to));
        fields["cc"] = Value::Array(strings(&email.cc));
        fields["bcc"] = Value::Array(strings(&email.bcc));
        fields["subject"] = email.subject.into();
        if let Some(irt) = &email.in_reply_to {
            fields["in_reply_to"] = format!("<{irt}>").into();
        }
        if !email.references.is_empty() {
            let refs: Vec<String> = email.references.iter().map(|r| format!("<{r}>")).collect();
            fields["references"] = refs.join(" ").into();
        }
    }
    let original = serde_json::to_vec(&fields).expect("a JSON value always serialises");
    match row.state {
        DeliveryState::Failed => {
            outbox_file::mark_failed(&original, row.last_error.as_deref().unwrap_or("delivery failed"), at)
        }
        _ => outbox_file::mark_sent(&original, at, row.provider_message_id.as_deref().unwrap_or_default()),
    }
}
