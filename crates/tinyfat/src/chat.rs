//! `tinyfat chat`: the terminal channel. One message with `-m`, else an
//! interactive prompt. The reply streams as it arrives; tool calls show as
//! one line each on stderr. Ctrl-C stops the running turn, not the program
//! (a second Ctrl-C at the prompt, or Ctrl-D, leaves).

use std::io::{BufRead, IsTerminal, Write};

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use serde_json::Value;
use tinyfat_core::sender::SenderIdentity;
use tinyfat_core::session::SessionId;
use tinyfat_platform::Platform;
use tinyfat_platform::inbound::{Ingest, IngestOutcome, MessageJob};
use tinyfat_platform::state::AppState;
use tinyfat_runtime::{Conversation, InboundMessage};
use tinyfat_store::{Agent, JobState};

/// `cli-main`, `cli-ID`, or a full session id the user named.
pub fn session_id(given: Option<&str>) -> anyhow::Result<SessionId> {
    let raw = given.unwrap_or("main");
    let id = SessionId::parse(raw).or_else(|_| SessionId::parse(&format!("cli-{raw}")))?;
    Ok(id)
}

/// One line that says what a tool call does.
pub fn summarize_call(name: &str, input: &Value) -> String {
    let field = |k: &str| input.get(k).and_then(Value::as_str).unwrap_or_default();
    let detail = match name {
        "bash" => field("command").to_owned(),
        "read" | "write" | "edit" => field("path").to_owned(),
        "send_message" => format!("{} {}", field("channel"), field("to")),
        _ => input.to_string(),
    };
    let one_line: String = detail.split_whitespace().collect::<Vec<_>>().join(" ");
    let short: String = one_line.chars().take(100).collect();
    if short.len() < one_line.len() { format!("{name}: {short}…") } else { format!("{name}: {short}") }
}

/// Renders one run event (the SSE shape of SPEC §4) on the terminal.
fn render(event: &Value, out: &mut impl Write, at_line_start: &mut bool) {
    let text = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
    match event.get("type").and_then(Value::as_str) {
        Some("text_delta") => {
            let delta = text("delta");
            let _ = out.write_all(delta.as_bytes());
            let _ = out.flush();
            *at_line_start = delta.ends_with('\n');
        }
        Some("tool_call") => {
            if !*at_line_start {
                let _ = writeln!(out);
                *at_line_start = true;
            }
            eprintln!("  ⚙ {}", summarize_call(&text("name"), event.get("input").unwrap_or(&Value::Null)));
        }
        Some("tool_result") => {
            let output = text("output");
            let first = output.lines().next().unwrap_or("").chars().take(100).collect::<String>();
            if event.get("is_error").and_then(Value::as_bool).unwrap_or(false) {
                eprintln!("    ✗ {first}");
            } else {
                eprintln!("    ↳ {} line(s)", output.lines().count());
            }
        }
        Some("error") => eprintln!("\n  (error: {})", text("message")),
        _ => {}
    }
}

/// Runs one message through the queue: enqueue (the same inbound path as
/// every channel), then claim the agent's jobs in-process under its lease —
/// so a turn never overlaps one that a running server holds — and stream the
/// run's events. If a server's worker claims the job first, wait for it.
async fn one_turn(
    state: &AppState,
    agent: &Agent,
    session: &SessionId,
    text: &str,
    as_json: bool,
) -> anyhow::Result<Option<String>> {
    let platform = &state.platform;
    let job_key = format!("cli:{}:{}", agent.id, tinyfat_core::ids::new_ulid_string(ulid::Ulid::new()));
    state.runs.open_log(&job_key);
    let ingest = Ingest {
        dedup_key: job_key.clone(),
        session: session.clone(),
        sender: SenderIdentity::Local("terminal".into()),
        job: MessageJob {
            message: InboundMessage {
                channel: "cli".into(),
                sender: "terminal".into(),
                text: text.to_owned(),
                received_at: chrono::Utc::now(),
                untrusted: vec![],
            },
            conversation: Some(Conversation { channel: "cli".into(), to: None }),
            run_key: Some(job_key.clone()),
        },
    };
    let job_id = match state.ingest(agent, ingest).await? {
        IngestOutcome::Answered(reply) => {
            if !as_json {
                println!("{reply}");
            }
            return Ok(Some(reply));
        }
        IngestOutcome::Rejected => anyhow::bail!("the terminal may not write to {}", agent.name),
        IngestOutcome::Enqueued { job_id, .. } => job_id,
    };

    let mut subscription = state.runs.subscribe(&job_key).context("run log")?;
    let printer = tokio::spawn(async move {
        let mut stdout = std::io::stdout();
        let mut at_line_start = true;
        let mut reply = String::new();
        while let Ok(event) = subscription.live.recv().await {
            if event.as_str() == Some("[DONE]") {
                break;
            }
            if event.get("type").and_then(Value::as_str) == Some("text_delta") {
                reply.push_str(event.get("delta").and_then(Value::as_str).unwrap_or_default());
            }
            if !as_json {
                render(&event, &mut stdout, &mut at_line_start);
            }
        }
        if !as_json && !at_line_start {
            println!();
        }
        reply
    });
    let ctrl_c = {
        let (runs, agent_id) = (state.runs.clone(), agent.id.clone());
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\n  (stopping…)");
                runs.cancel(&agent_id);
            }
        })
    };
    let owner = format!("cli-{}-{}", std::process::id(), ulid::Ulid::new());
    let shutting_down = AtomicBool::new(false);
    let result = loop {
        let now = platform.now_ms();
        match platform.store.claim_for_agent(&agent.id, &owner, now, tinyfat_platform::worker::LEASE_MS).await? {
            Some(claim) => tinyfat_platform::worker::process(state, claim, &shutting_down).await,
            None => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
        match platform.store.get_job(&job_id).await? {
            Some(job) if job.state == JobState::Done => break Ok(()),
            Some(job) if job.state == JobState::Dead => {
                break Err(anyhow::anyhow!("{}", job.last_error.unwrap_or_else(|| "the turn failed".into())));
            }
            Some(_) => {}
            None => break Err(anyhow::anyhow!("the job disappeared (was the agent deleted?)")),
        }
    };
    ctrl_c.abort();
    state.runs.close_log(&job_key);
    let streamed = printer.await.unwrap_or_default();
    result?;
    if streamed.is_empty() {
        // Another process (a running server) ran the turn: show its answer.
        let reply = tinyfat_platform::webchat::reply_of(state, agent, session, &job_id).await;
        if let (Some(reply), false) = (&reply, as_json) {
            println!("{reply}");
        }
        return Ok(reply);
    }
    Ok(Some(streamed))
}

pub async fn run(
    platform: Platform,
    name: &str,
    message: Option<String>,
    session: Option<String>,
    as_json: bool,
) -> anyhow::Result<()> {
    let agent = platform.agent(name).await?;
    let state = AppState::new(Arc::new(platform));
    let platform = &state.platform;
    let session = session_id(session.as_deref())?;
    let health = platform.executor.check().await;
    if !health.ok {
        eprintln!("warning: {} (tool calls will fail until this is fixed)", health.message);
    }
    if let Some(text) = message {
        let reply = one_turn(&state, &agent, &session, &text, as_json).await?;
        if as_json {
            crate::output::json(
                &serde_json::json!({"agent": agent.name.to_string(), "session": session.to_string(), "reply": reply}),
            )?;
        }
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} <{}> in session {session}; Ctrl-C stops a turn, Ctrl-D leaves",
            agent.name, agent.email
        );
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("you> ");
        }
        let mut line = String::new();
        let read =
            tokio::task::block_in_place(|| stdin.lock().read_line(&mut line)).context("cannot read standard input")?;
        if read == 0 {
            break;
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        if let Err(e) = one_turn(&state, &agent, &session, text, false).await {
            eprintln!("error: {e:#}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn sessions_and_summaries() {
        assert_eq!(session_id(None).unwrap().as_str(), "cli-main");
        assert_eq!(session_id(Some("work")).unwrap().as_str(), "cli-work");
        assert_eq!(session_id(Some("web-main")).unwrap().as_str(), "web-main");
        assert!(session_id(Some("a b")).is_err());
        assert_eq!(summarize_call("bash", &json!({"command": "ls -la\n  /data"})), "bash: ls -la /data");
        assert!(summarize_call("bash", &json!({"command": "x".repeat(300)})).ends_with('…'));
    }
}
