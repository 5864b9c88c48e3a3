//! Command-line surface (SPEC §2) and the wiring from each command to the
//! platform. Every command accepts `--config`, `--data-dir` and `--json`.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use tinyfat_core::{EmailAddress, Secret};
use tinyfat_platform::Platform;
use tinyfat_platform::config::{Settings, Sources};
use tinyfat_platform::provision::{AgentView, CreateAgent};

use crate::output;

#[derive(Debug, Parser)]
#[command(
    name = "tinyfat",
    version,
    about = "A self-hostable platform for personal AI agents",
    long_about = "tinyfat runs personal AI agents. Each agent has a name, an email address, its own \
                  storage and a sandbox; people reach it by email, chat or the terminal.\n\n\
                  Start the platform with `tinyfat serve`, then create an agent with \
                  `tinyfat agent create --owner you@example.com`."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Global {
    /// Configuration file (TOML); `TINYFAT_*` environment variables override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data folder for the embedded defaults [default: ./tinyfat-data].
    #[arg(long, global = true, value_name = "DIR", env = "TINYFAT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print exactly one JSON document on stdout.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the platform: HTTP gateway, workers and scheduler.
    Serve(ServeArgs),
    /// Provision and manage agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Per-agent encrypted secrets (model keys, channel tokens).
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The master key that encrypts secrets.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Talk to an agent from the terminal; streams the reply.
    Chat(ChatArgs),
    /// API tokens for `Authorization: Bearer` (printed once, stored hashed).
    #[command(subcommand)]
    Token(crate::admin::TokenCommand),
    /// The dead-letter queue: jobs that failed for good.
    #[command(subcommand)]
    Dlq(crate::admin::DlqCommand),
    /// Print the agent's wake manifest (scheduled events and next fire times).
    Events {
        /// The agent's name (or id).
        name: String,
    },
    /// Apply database migrations and exit.
    Migrate,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The agent's name (or id).
    pub name: String,
    /// Send one message and exit (for scripts); otherwise an interactive prompt.
    #[arg(short, long, value_name = "TEXT")]
    pub message: Option<String>,
    /// Session to continue [default: cli-main]; `work` means `cli-work`.
    #[arg(long, value_name = "ID")]
    pub session: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 127.0.0.1:3002, or `listen` from the configuration].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Which roles this process runs.
    #[arg(long, value_enum, default_value_t = Role::All)]
    pub role: Role,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    All,
    Gateway,
    Worker,
    Scheduler,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Create an agent; prints its id, name and email address.
    Create {
        /// The owner's email address; it becomes the first allowed sender.
        #[arg(long)]
        owner: String,
        /// A name of lowercase letters; generated (adjective + noun) when left out.
        #[arg(long)]
        name: Option<String>,
        /// The model, e.g. claude-sonnet-4-5 or openai:gpt-4o [default: model.default].
        #[arg(long)]
        model: Option<String>,
    },
    /// List agents.
    List,
    /// Show one agent with its allowed senders and storage location.
    Show { name: String },
    /// Delete an agent, its storage and every row that belongs to it.
    Delete {
        name: String,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
    },
    /// Write a tar archive of the agent's storage.
    Export {
        name: String,
        /// Output file [default: standard output].
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Allow a sender: a@b.c, @domain, telegram:USERID, telegram:chat:CHATID or slack:USERID.
    Allow { name: String, sender: String },
    /// Remove an allowed sender.
    Disallow { name: String, sender: String },
}

#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set a secret; the value is read from standard input and never printed.
    Set { name: String, key: String },
    /// List an agent's secret names (never their values).
    List { name: String },
    /// Remove a secret.
    Unset { name: String, key: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Re-encrypt every secret under a new master key. Stop `serve` first.
    Rotate,
}

fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TINYFAT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level))
        // async-imap traces every command it sends, LOGIN and its password
        // included: never show that crate's log, whatever TINYFAT_LOG says.
        .add_directive("async_imap=off".parse().expect("a static directive"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
}

async fn open(global: &Global) -> anyhow::Result<Platform> {
    let settings = Settings::load(&Sources::from_process(global.config.clone(), global.data_dir.clone()))?;
    Platform::open(settings).await
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = &cli.global;
    match cli.command {
        Command::Serve(args) => {
            init_logging("info");
            serve(global, args).await
        }
        Command::Chat(args) => {
            init_logging("warn");
            let platform = open(global).await?;
            crate::chat::run(platform, &args.name, args.message, args.session, global.json).await
        }
        Command::Migrate => {
            init_logging("warn");
            let platform = open(global).await?;
            if global.json {
                output::json(&json!({"migrated": true, "database": platform.store.describe()}))
            } else {
                println!("migrations applied to {}", platform.store.describe());
                Ok(())
            }
        }
        Command::Agent(cmd) => {
            init_logging("warn");
            agent(&open(global).await?, global.json, cmd).await
        }
        Command::Secret(cmd) => {
            init_logging("warn");
            secret(&open(global).await?, global.json, cmd).await
        }
        Command::Token(cmd) => {
            init_logging("warn");
            crate::admin::token(&open(global).await?, global.json, cmd).await
        }
        Command::Dlq(cmd) => {
            init_logging("warn");
            crate::admin::dlq(&open(global).await?, global.json, cmd).await
        }
        Command::Events { name } => {
            init_logging("warn");
            crate::events::run(&open(global).await?, &name, global.json).await
        }
        Command::Key(KeyCommand::Rotate) => {
            init_logging("warn");
            let platform = open(global).await?;
            let count = platform.rotate_master_key().await?;
            let reopened = open(global).await?;
            let key_id = reopened.cipher.current_key_id().to_string();
            if global.json {
                output::json(&json!({"rotated": true, "secrets": count, "key_id": key_id}))
            } else {
                println!("re-encrypted {count} secret(s) under master key {key_id}");
                Ok(())
            }
        }
    }
}

async fn serve(global: &Global, args: ServeArgs) -> anyhow::Result<()> {
    let settings = Settings::load(&Sources::from_process(global.config.clone(), global.data_dir.clone()))?;
    let listen = args.listen.clone().unwrap_or_else(|| settings.listen.clone());
    let data_dir = tinyfat_platform::config::absolute(&settings.data_dir);
    let platform = Platform::open(settings).await?;
    tracing::info!("tinyfat {} starting (role: {:?})", env!("CARGO_PKG_VERSION"), args.role);
    tracing::info!("data folder: {}", data_dir.display());
    tracing::info!("metadata store: {}", platform.store.describe());
    tracing::info!("agent storage: {}", platform.storage.describe());
    if platform.key_generated {
        tracing::info!(
            "master key: generated a new key at {} (mode 0600; back it up with the data)",
            platform.key_source
        );
    } else {
        tracing::info!("master key: {}", platform.key_source);
    }
    let agents = platform.store.list_agents(None).await?;
    tracing::info!("agents: {}", agents.len());
    let role = match args.role {
        Role::All => tinyfat_platform::serve::Role::All,
        Role::Gateway => tinyfat_platform::serve::Role::Gateway,
        Role::Worker => tinyfat_platform::serve::Role::Worker,
        Role::Scheduler => tinyfat_platform::serve::Role::Scheduler,
    };
    tinyfat_platform::serve::serve(Arc::new(platform), &listen, role).await
}

fn agent_row(v: &AgentView) -> Vec<String> {
    vec![v.name.clone(), v.email.clone(), v.owner.clone(), v.model.clone(), v.id.clone()]
}

async fn agent(platform: &Platform, as_json: bool, cmd: AgentCommand) -> anyhow::Result<()> {
    match cmd {
        AgentCommand::Create { owner, name, model } => {
            let owner = EmailAddress::parse(&owner).map_err(|e| anyhow::anyhow!("--owner: {e}"))?;
            let agent = platform.create_agent(CreateAgent { owner, name, model }).await?;
            let view = platform.agent_view(&agent).await?;
            if as_json {
                return output::json(&view);
            }
            println!("created agent {} <{}>", view.name, view.email);
            println!("  id:      {}", view.id);
            println!("  owner:   {} (allowed to write to it)", view.owner);
            println!("  model:   {}", view.model);
            println!("  storage: {}", view.storage.as_deref().unwrap_or_default());
            println!(
                "next: `tinyfat secret set {} anthropic_api_key` (value on stdin) if the platform has no key",
                view.name
            );
            Ok(())
        }
        AgentCommand::List => {
            let agents = platform.store.list_agents(None).await?;
            let views: Vec<_> = agents.iter().map(AgentView::new).collect();
            if as_json {
                return output::json(&views);
            }
            if views.is_empty() {
                println!("no agents yet: create one with `tinyfat agent create --owner you@example.com`");
                return Ok(());
            }
            output::table(&["NAME", "EMAIL", "OWNER", "MODEL", "ID"], &views.iter().map(agent_row).collect::<Vec<_>>());
            Ok(())
        }
        AgentCommand::Show { name } => {
            let agent = platform.agent(&name).await?;
            let view = platform.agent_view(&agent).await?;
            if as_json {
                return output::json(&view);
            }
            println!("name:     {}", view.name);
            println!("email:    {}", view.email);
            println!("id:       {}", view.id);
            println!("owner:    {}", view.owner);
            println!("model:    {}", view.model);
            println!("created:  {}", view.created_at);
            println!("storage:  {}", view.storage.as_deref().unwrap_or_default());
            let senders = view.allowed_senders.unwrap_or_default();
            println!(
                "allowed senders: {}",
                if senders.is_empty() { "(none: nobody can reach it)".into() } else { senders.join(", ") }
            );
            Ok(())
        }
        AgentCommand::Delete { name, yes } => {
            let agent = platform.agent(&name).await?;
            if !yes {
                bail!(
                    "this deletes agent {} and all of its files, sessions and secrets; run again with --yes",
                    agent.name
                );
            }
            let rows = platform.delete_agent(&agent).await?;
            if as_json {
                return output::json(&json!({"deleted": agent.id.to_string(), "name": agent.name.to_string(),
                    "senders": rows.senders, "secrets": rows.secrets}));
            }
            println!(
                "deleted agent {} ({}) with its storage, {} sender rule(s) and {} secret(s)",
                agent.name, agent.id, rows.senders, rows.secrets
            );
            Ok(())
        }
        AgentCommand::Export { name, output: path } => {
            let agent = platform.agent(&name).await?;
            let summary = match &path {
                Some(path) => {
                    let file =
                        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
                    platform.export_agent(&agent, std::io::BufWriter::new(file)).await?
                }
                None => {
                    if std::io::stdout().is_terminal() {
                        bail!("refusing to write a tar archive to a terminal: use -o FILE or redirect the output");
                    }
                    platform.export_agent(&agent, std::io::stdout().lock()).await?
                }
            };
            for skipped in &summary.skipped {
                eprintln!("skipped {skipped}");
            }
            if let Some(path) = path {
                eprintln!("exported {} file(s), {} bytes, to {}", summary.files, summary.bytes, path.display());
            }
            Ok(())
        }
        AgentCommand::Allow { name, sender } => {
            let agent = platform.agent(&name).await?;
            let added = platform.allow_sender(&agent, &sender).await?;
            if as_json {
                return output::json(
                    &json!({"agent": agent.name.to_string(), "sender": sender.trim(), "added": added}),
                );
            }
            println!(
                "{} {} may now write to {}",
                if added { "allowed:" } else { "already allowed:" },
                sender.trim(),
                agent.name
            );
            Ok(())
        }
        AgentCommand::Disallow { name, sender } => {
            let agent = platform.agent(&name).await?;
            let removed = platform.disallow_sender(&agent, &sender).await?;
            if as_json {
                return output::json(
                    &json!({"agent": agent.name.to_string(), "sender": sender.trim(), "removed": removed}),
                );
            }
            if removed {
                println!("removed {} from {}'s allowed senders", sender.trim(), agent.name);
            } else {
                println!("{} was not an allowed sender of {}", sender.trim(), agent.name);
            }
            Ok(())
        }
    }
}

async fn secret(platform: &Platform, as_json: bool, cmd: SecretCommand) -> anyhow::Result<()> {
    match cmd {
        SecretCommand::Set { name, key } => {
            let agent = platform.agent(&name).await?;
            if std::io::stdin().is_terminal() {
                eprintln!("enter the value for {key}, then press Ctrl-D:");
            }
            let mut value = String::new();
            std::io::stdin().read_to_string(&mut value).context("cannot read the secret from standard input")?;
            let value = Secret::new(value.trim_end_matches(['\n', '\r']).to_owned());
            platform.set_secret(&agent, &key, &value).await?;
            if as_json {
                return output::json(&json!({"agent": agent.name.to_string(), "secret": key, "set": true}));
            }
            println!("secret {key} set for {} (encrypted at rest)", agent.name);
            Ok(())
        }
        SecretCommand::List { name } => {
            let agent = platform.agent(&name).await?;
            let secrets = platform.list_secrets(&agent).await?;
            if as_json {
                return output::json(&secrets);
            }
            if secrets.is_empty() {
                println!("{} has no secrets", agent.name);
                return Ok(());
            }
            let rows: Vec<_> =
                secrets.iter().map(|s| vec![s.name.clone(), s.updated_at.clone(), s.key_id.clone()]).collect();
            output::table(&["NAME", "UPDATED", "MASTER KEY"], &rows);
            Ok(())
        }
        SecretCommand::Unset { name, key } => {
            let agent = platform.agent(&name).await?;
            let removed = platform.unset_secret(&agent, &key).await?;
            if as_json {
                return output::json(&json!({"agent": agent.name.to_string(), "secret": key, "removed": removed}));
            }
            if removed {
                println!("secret {key} removed from {}", agent.name);
                Ok(())
            } else {
                bail!("{} has no secret named {key}", agent.name)
            }
        }
    }
}
