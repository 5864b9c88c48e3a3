//! `tinyfat token …` and `tinyfat dlq …`: API tokens and the dead-letter
//! queue from the command line. Each command is one platform call and a
//! print: human text, or exactly one JSON document with `--json`.
//!
//! A new token's plaintext is printed once, here, and exists nowhere else.
//! Unknown ids are user errors (exit 1); a missing ID/--all is a usage error
//! (exit 2, from clap).

use anyhow::bail;
use clap::{ArgGroup, Subcommand};
use serde_json::json;
use tinyfat_core::EmailAddress;
use tinyfat_platform::Platform;
use tinyfat_platform::dlq::{DEAD_LETTERS_LIST_DEFAULT, DEAD_LETTERS_LIST_MAX, DeadLetterScope, DeadLetterView};

use crate::output;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for `Authorization: Bearer`; it is printed once.
    Create {
        /// A label to recognise the token by [default: the user's email, or `operator`].
        #[arg(long)]
        name: Option<String>,
        /// Limit the token to this user's agents (the user is created if new).
        #[arg(long, value_name = "EMAIL")]
        user: Option<String>,
    },
    /// List tokens (never the tokens themselves).
    List,
    /// Revoke a token at once.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters, most recently failed first.
    List {
        /// Only this agent's dead letters (name or id).
        #[arg(long, value_name = "NAME")]
        agent: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = DEAD_LETTERS_LIST_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(DEAD_LETTERS_LIST_MAX)))]
        limit: u32,
    },
    /// Show one dead letter with its payload.
    Show { id: String },
    /// Put a dead letter (or all of them) back in the queue, attempts reset.
    #[command(group(ArgGroup::new("target").required(true).args(["id", "all"])))]
    Replay {
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
    /// Delete a dead letter (or all of them).
    #[command(group(ArgGroup::new("target").required(true).args(["id", "all"])))]
    Purge {
        id: Option<String>,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

pub async fn token(platform: &Platform, as_json: bool, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { name, user } => {
            let user = user
                .as_deref()
                .map(|u| EmailAddress::parse(u).map_err(|e| anyhow::anyhow!("--user: {e}")))
                .transpose()?;
            let (row, plaintext) = platform.create_token(name, user.clone()).await?;
            let user = user.map(|u| u.to_string());
            if as_json {
                return output::json(&json!({
                    "id": row.id, "name": row.name, "user": user, "token": plaintext.expose(),
                }));
            }
            let scope = match &user {
                Some(user) => format!("limited to the agents of {user}"),
                None => "operator: acts on every agent".to_owned(),
            };
            println!("created token {} ({:?}, {scope})", row.id, row.name);
            println!("{}", plaintext.expose());
            eprintln!(
                "warning: this is the only time the token is shown; only its hash is stored. \
                 Keep it secret and send it as `Authorization: Bearer <token>`."
            );
            Ok(())
        }
        TokenCommand::List => {
            let tokens = platform.list_tokens().await?;
            if as_json {
                return output::json(&tokens);
            }
            if tokens.is_empty() {
                println!("no API tokens yet: create one with `tinyfat token create`");
                return Ok(());
            }
            let rows: Vec<_> = tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.name.clone(),
                        t.user.clone().unwrap_or_else(|| "(operator)".into()),
                        t.created_at.clone(),
                        t.revoked_at.as_ref().map_or_else(|| "active".into(), |at| format!("revoked {at}")),
                    ]
                })
                .collect();
            output::table(&["ID", "NAME", "USER", "CREATED", "STATE"], &rows);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            if !platform.revoke_token(&id).await? {
                bail!("no live token with id {id:?} (`tinyfat token list` shows them)");
            }
            if as_json {
                return output::json(&json!({"revoked": id}));
            }
            println!("revoked token {id}");
            Ok(())
        }
    }
}

fn dead_letter_row(d: &DeadLetterView) -> Vec<String> {
    let error = d.error.as_deref().unwrap_or_default();
    let error = match error.char_indices().nth(60) {
        Some((cut, _)) => format!("{}…", &error[..cut]),
        None => error.to_owned(),
    };
    vec![
        d.id.clone(),
        d.agent.clone().unwrap_or_else(|| d.agent_id.clone()),
        d.kind.clone(),
        d.failed_at.clone(),
        d.attempts.to_string(),
        error.replace('\n', " "),
    ]
}

async fn dead_letter(platform: &Platform, id: &str) -> anyhow::Result<DeadLetterView> {
    let job = platform.store.get_job(id).await?.filter(|job| job.state == tinyfat_store::JobState::Dead);
    let Some(job) = job else {
        bail!("no dead letter with id {id:?} (`tinyfat dlq list` shows them)");
    };
    let agent = platform.store.agent_by_id(&job.agent_id).await?;
    Ok(DeadLetterView::new(&job, agent.as_ref()).with_payload(&job))
}

pub async fn dlq(platform: &Platform, as_json: bool, cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::List { agent, limit } => {
            let agent = match &agent {
                Some(name) => Some(platform.agent(name).await?),
                None => None,
            };
            let scope = agent.as_ref().map_or(DeadLetterScope::All, DeadLetterScope::Agent);
            let dead = platform.dead_letters(scope, limit).await?;
            if as_json {
                return output::json(&dead);
            }
            if dead.is_empty() {
                println!("no dead letters");
                return Ok(());
            }
            output::table(
                &["ID", "AGENT", "KIND", "FAILED", "ATTEMPTS", "ERROR"],
                &dead.iter().map(dead_letter_row).collect::<Vec<_>>(),
            );
            Ok(())
        }
        DlqCommand::Show { id } => {
            let view = dead_letter(platform, &id).await?;
            if as_json {
                return output::json(&view);
            }
            println!("id:        {}", view.id);
            println!("agent:     {} ({})", view.agent.as_deref().unwrap_or("(deleted)"), view.agent_id);
            println!("session:   {}", view.session);
            println!("kind:      {}", view.kind);
            println!("dedup key: {}", view.dedup_key);
            println!("attempts:  {} (failures: {})", view.attempts, view.failures);
            println!("created:   {}", view.created_at);
            println!("failed:    {}", view.failed_at);
            println!("error:     {}", view.error.as_deref().unwrap_or("(none recorded)"));
            let payload = view.payload.as_ref().map(serde_json::to_string_pretty).transpose()?;
            println!("payload:\n{}", payload.unwrap_or_default());
            println!("replay it with `tinyfat dlq replay {}`", view.id);
            Ok(())
        }
        DlqCommand::Replay { id, all } => {
            let (count, id) = match id {
                Some(id) if !all => {
                    if !platform.replay_dead_letter(&id).await? {
                        bail!("no dead letter with id {id:?} (`tinyfat dlq list` shows them)");
                    }
                    (1, Some(id))
                }
                _ => (platform.replay_all_dead_letters().await?, None),
            };
            if as_json {
                return output::json(&match &id {
                    Some(id) => json!({"id": id, "replayed": count}),
                    None => json!({"replayed": count}),
                });
            }
            match id {
                Some(id) => println!("replayed {id}: queued again, due now"),
                None => println!("replayed {count} dead letter(s)"),
            }
            Ok(())
        }
        DlqCommand::Purge { id, all } => {
            let (count, id) = match id {
                Some(id) if !all => {
                    if !platform.purge_dead_letter(&id).await? {
                        bail!("no dead letter with id {id:?} (`tinyfat dlq list` shows them)");
                    }
                    (1, Some(id))
                }
                _ => (platform.purge_all_dead_letters().await?, None),
            };
            if as_json {
                return output::json(&match &id {
                    Some(id) => json!({"id": id, "purged": count}),
                    None => json!({"purged": count}),
                });
            }
            match id {
                Some(id) => println!("purged dead letter {id}"),
                None => println!("purged {count} dead letter(s)"),
            }
            Ok(())
        }
    }
}
