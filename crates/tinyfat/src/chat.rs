//! `tinyfat chat`: the terminal channel. One message with `-m`, else an
//! interactive prompt. The reply streams as it arrives; tool calls show as
//! one line each on stderr. Ctrl-C stops the running turn, not the program
//! (a second Ctrl-C at the prompt, or Ctrl-D, leaves).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::Context;
use serde_json::Value;
use tinyfat_core::session::SessionId;
use tinyfat_model::CancelToken;
use tinyfat_platform::Platform;
use tinyfat_platform::turns::RunError;
use tinyfat_runtime::{Conversation, InboundMessage, TurnEvent, TurnInput};
use tinyfat_store::Agent;

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

fn render(event: TurnEvent, out: &mut impl Write, at_line_start: &mut bool) {
    match event {
        TurnEvent::TextDelta(text) => {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            *at_line_start = text.ends_with('\n');
        }
        TurnEvent::ToolCall { name, input, .. } => {
            if !*at_line_start {
                let _ = writeln!(out);
                *at_line_start = true;
            }
            eprintln!("  ⚙ {}", summarize_call(&name, &input));
        }
        TurnEvent::ToolResult { output, is_error, .. } => {
            let first = output.lines().next().unwrap_or("").chars().take(100).collect::<String>();
            let lines = output.lines().count();
            if is_error {
                eprintln!("    ✗ {first}");
            } else {
                eprintln!("    ↳ {lines} line(s)");
            }
        }
        TurnEvent::Restart { reason } => {
            eprintln!("\n  (retrying: {reason})");
        }
    }
}

async fn one_turn(
    platform: &Platform,
    agent: &Agent,
    session: &SessionId,
    text: &str,
    as_json: bool,
) -> anyhow::Result<Option<String>> {
    let cancel = CancelToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\n  (stopping…)");
                cancel.cancel();
            }
        })
    };
    let input = TurnInput {
        session: session.clone(),
        job_id: format!("cli:{}", tinyfat_core::ids::new_ulid_string(ulid::Ulid::new())),
        messages: vec![InboundMessage {
            channel: "cli".into(),
            sender: "terminal".into(),
            text: text.to_owned(),
            received_at: chrono::Utc::now(),
            untrusted: vec![],
        }],
        conversation: Some(Conversation { channel: "cli".into(), to: None }),
        message_jobs: vec![],
    };
    let mut stdout = std::io::stdout();
    let mut at_line_start = true;
    let mut streamed = String::new();
    let tokens_today = platform.tokens_used_today(agent).await.unwrap_or(0);
    let result = platform
        .run_turn(agent, input, cancel, tokens_today, &mut |event| {
            if let TurnEvent::TextDelta(t) = &event {
                streamed.push_str(t);
            }
            if let TurnEvent::Restart { .. } = &event {
                streamed.clear();
            }
            if !as_json {
                render(event, &mut stdout, &mut at_line_start);
            }
        })
        .await;
    ctrl_c.abort();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(RunError::Turn(e)) => anyhow::bail!("{e}"),
        Err(RunError::Platform(e)) => return Err(e.into()),
    };
    platform.record_usage(agent, &outcome.usage).await?;
    if !as_json {
        // Text that was not streamed (a command's answer, a limit notice).
        match &outcome.reply {
            Some(reply) if !streamed.contains(reply.as_str()) => {
                if !at_line_start {
                    println!();
                }
                println!("{reply}");
            }
            _ if !at_line_start => println!(),
            _ => {}
        }
    }
    Ok(outcome.reply)
}

pub async fn run(
    platform: &Platform,
    name: &str,
    message: Option<String>,
    session: Option<String>,
    as_json: bool,
) -> anyhow::Result<()> {
    let agent = platform.agent(name).await?;
    let session = session_id(session.as_deref())?;
    let health = platform.executor.check().await;
    if !health.ok {
        eprintln!("warning: {} (tool calls will fail until this is fixed)", health.message);
    }
    if let Some(text) = message {
        let reply = one_turn(platform, &agent, &session, &text, as_json).await?;
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
        if let Err(e) = one_turn(platform, &agent, &session, text, false).await {
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
