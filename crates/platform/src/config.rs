//! Configuration, first layer: raw settings that mirror `tinyfat.toml` and
//! the `TINYFAT_*` environment, validated but not yet turned into components
//! (that is `platform::Platform::open`).
//!
//! Precedence, lowest first: built-in defaults, the file, provider aliases
//! (`ANTHROPIC_API_KEY`, `RESEND_API_KEY`, …), `TINYFAT_*` variables, then
//! command-line flags. A key `a.b_c` is `TINYFAT_A_B_C`; section names have
//! no underscore, so the first underscore after a known section ends it. An
//! environment value takes the type of the key's default (number, boolean,
//! comma-separated list), and a value of the wrong type is an error that
//! names the variable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tinyfat_core::Secret;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3002";
pub const DEFAULT_DATA_DIR: &str = "./tinyfat-data";
pub const DEFAULT_MODEL: &str = "claude-sonnet-4-5";
pub const DEFAULT_EMAIL_DOMAIN: &str = "tinyfat.localhost";

/// Sections of the file; `TINYFAT_{SECTION}_{KEY}` addresses their keys.
const SECTIONS: [&str; 12] = [
    "email",
    "model",
    "sandbox",
    "provisioning",
    "queue",
    "scheduler",
    "runtime",
    "gateway",
    "outbox",
    "telegram",
    "slack",
    "storage",
];

/// `TINYFAT_*` variables read elsewhere: the log filter, the single-agent
/// name, the S3 endpoint alias (handled above), the data folder flag's env.
const NOT_SETTINGS: [&str; 3] = ["log", "agent", "s3_endpoint"];

/// Provider variables that are read as aliases of a key.
const ALIASES: [(&str, &str, &str); 7] = [
    ("ANTHROPIC_API_KEY", "model", "anthropic_api_key"),
    ("ANTHROPIC_BASE_URL", "model", "anthropic_base_url"),
    ("OPENAI_API_KEY", "model", "openai_api_key"),
    ("OPENAI_BASE_URL", "model", "openai_base_url"),
    ("RESEND_API_KEY", "email", "resend_api_key"),
    ("RESEND_WEBHOOK_SECRET", "email", "resend_webhook_secret"),
    ("SMTP_PASSWORD", "email", "smtp_password"),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{var}={value:?}: expected {expected}")]
    EnvType { var: String, value: String, expected: &'static str },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: String,
    pub public_url: Option<String>,
    pub database_url: Option<String>,
    pub storage_url: Option<String>,
    pub master_key: Option<Secret>,
    pub master_key_file: Option<PathBuf>,
    pub email: EmailSettings,
    pub model: ModelSettings,
    pub sandbox: SandboxSettings,
    pub provisioning: ProvisioningSettings,
    pub queue: QueueSettings,
    pub scheduler: SchedulerSettings,
    pub runtime: RuntimeSettings,
    pub gateway: GatewaySettings,
    pub outbox: OutboxSettings,
    pub telegram: TelegramSettings,
    pub slack: SlackSettings,
    pub storage: StorageSettings,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailSettings {
    pub domain: String,
    pub provider: String,
    pub require_auth: bool,
    pub resend_api_key: Option<Secret>,
    pub resend_webhook_secret: Option<Secret>,
    pub resend_base_url: String,
    /// The built-in SMTP listener's socket address (e.g. `0.0.0.0:25`);
    /// empty: off.
    pub smtp_listen: String,
    /// PEM certificate chain and key for STARTTLS (offered only when both are set).
    pub smtp_tls_cert: Option<PathBuf>,
    pub smtp_tls_key: Option<PathBuf>,
    /// Recipients accepted per message (RFC 5321 asks for at least 100).
    pub smtp_recipients_max: u32,
    /// Seconds the listener waits for each command or block of DATA.
    pub smtp_command_timeout_s: u64,
    /// Connections served at once; more are answered 421 and closed.
    pub smtp_connections_max: u32,
    /// Outbound SMTP (`provider = "smtp"`): the submission server.
    pub smtp_host: String,
    pub smtp_port: u16,
    pub smtp_username: Option<String>,
    pub smtp_password: Option<Secret>,
    /// `starttls` (default, required — never opportunistic), `tls` (implicit
    /// TLS, port 465) or `none` (loopback hosts only: a local relay).
    pub smtp_tls: String,
    /// Bound on one whole SMTP transaction, connect to the 250 after DATA.
    pub smtp_timeout_s: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    pub default: String,
    pub anthropic_base_url: String,
    pub openai_base_url: String,
    pub anthropic_api_key: Option<Secret>,
    pub openai_api_key: Option<Secret>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    /// `bwrap` (default) or `none` (development only, loudly warned).
    pub mode: String,
    /// Keep a ready sandbox for each recently active agent so its next tool
    /// call skips the sandbox start-up (default on; off = every call cold).
    pub warm: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProvisioningSettings {
    pub allow: Vec<String>,
    pub per_hour_max: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSettings {
    pub dedup_ttl: String,
    pub retry_window: String,
    pub max_attempts: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    pub late_grace: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    pub turn_tool_calls_max: u32,
    pub turn_wall_s_max: u64,
    pub tool_wall_s_max: u64,
    pub tokens_per_day_max: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    pub body_bytes_max: u64,
    pub email_body_bytes_max: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutboxSettings {
    pub sends_per_day_max: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelegramSettings {
    pub api_base_url: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlackSettings {
    pub api_base_url: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// S3-compatible endpoint for `s3://` storage urls (`TINYFAT_S3_ENDPOINT`).
    pub s3_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN.to_owned(),
            public_url: None,
            database_url: None,
            storage_url: None,
            master_key: None,
            master_key_file: None,
            email: EmailSettings::default(),
            model: ModelSettings::default(),
            sandbox: SandboxSettings::default(),
            provisioning: ProvisioningSettings::default(),
            queue: QueueSettings::default(),
            scheduler: SchedulerSettings::default(),
            runtime: RuntimeSettings::default(),
            gateway: GatewaySettings::default(),
            outbox: OutboxSettings::default(),
            telegram: TelegramSettings::default(),
            slack: SlackSettings::default(),
            storage: StorageSettings::default(),
        }
    }
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self { mode: "bwrap".to_owned(), warm: true }
    }
}

impl Default for ProvisioningSettings {
    fn default() -> Self {
        Self { allow: Vec::new(), per_hour_max: 10 }
    }
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self { dedup_ttl: "7d".to_owned(), retry_window: "6h".to_owned(), max_attempts: 8 }
    }
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self { late_grace: "1h".to_owned() }
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self { turn_tool_calls_max: 50, turn_wall_s_max: 600, tool_wall_s_max: 60, tokens_per_day_max: 2_000_000 }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self { body_bytes_max: 1 << 20, email_body_bytes_max: 25 << 20 }
    }
}

impl Default for OutboxSettings {
    fn default() -> Self {
        Self { sends_per_day_max: 200 }
    }
}

impl Default for TelegramSettings {
    fn default() -> Self {
        Self { api_base_url: "https://api.telegram.org".to_owned() }
    }
}

impl Default for SlackSettings {
    fn default() -> Self {
        Self { api_base_url: "https://slack.com/api".to_owned() }
    }
}

impl Default for EmailSettings {
    fn default() -> Self {
        Self {
            domain: DEFAULT_EMAIL_DOMAIN.to_owned(),
            provider: "resend".to_owned(),
            require_auth: true,
            resend_api_key: None,
            resend_webhook_secret: None,
            resend_base_url: "https://api.resend.com".to_owned(),
            smtp_listen: String::new(),
            smtp_tls_cert: None,
            smtp_tls_key: None,
            smtp_recipients_max: 100,
            smtp_command_timeout_s: 300,
            smtp_connections_max: 100,
            smtp_host: String::new(),
            smtp_port: 587,
            smtp_username: None,
            smtp_password: None,
            smtp_tls: "starttls".to_owned(),
            smtp_timeout_s: 20,
        }
    }
}

impl Default for ModelSettings {
    fn default() -> Self {
        Self {
            default: DEFAULT_MODEL.to_owned(),
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            openai_base_url: "https://api.openai.com/v1".to_owned(),
            anthropic_api_key: None,
            openai_api_key: None,
        }
    }
}

/// Where settings come from, so tests can pass their own environment.
#[derive(Debug, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: BTreeMap<String, String>,
    /// `--data-dir`, which beats the file and the environment.
    pub data_dir: Option<PathBuf>,
}

impl Sources {
    pub fn from_process(file: Option<PathBuf>, data_dir: Option<PathBuf>) -> Self {
        Self { file, env: std::env::vars().collect(), data_dir }
    }
}

impl Settings {
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut table = match &sources.file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Parse { path: path.clone(), message: e.to_string() })?
            }
            None => toml::Table::new(),
        };
        let defaults = toml::Table::try_from(Settings::default()).expect("defaults serialise");
        for (var, section, key) in ALIASES {
            if let Some(value) = sources.env.get(var) {
                set_key(&mut table, &defaults, var, Some(section), key, value)?;
            }
        }
        if let Some(endpoint) = sources.env.get("TINYFAT_S3_ENDPOINT") {
            set_key(&mut table, &defaults, "TINYFAT_S3_ENDPOINT", Some("storage"), "s3_endpoint", endpoint)?;
        }
        for (var, value) in &sources.env {
            let Some(rest) = var.strip_prefix("TINYFAT_") else { continue };
            let rest = rest.to_ascii_lowercase();
            // Variables that are not configuration keys.
            if NOT_SETTINGS.contains(&rest.as_str()) || rest.starts_with("bench_") || rest.starts_with("test_") {
                continue;
            }
            let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) {
                Some(section) => (Some(*section), &rest[section.len() + 1..]),
                None => (None, rest.as_str()),
            };
            set_key(&mut table, &defaults, var, section, key, value)?;
        }
        let mut settings: Settings = table.try_into().map_err(|e: toml::de::Error| ConfigError::Parse {
            path: sources.file.clone().unwrap_or_else(|| "environment".into()),
            message: e.to_string(),
        })?;
        if let Some(dir) = &sources.data_dir {
            settings.data_dir = dir.clone();
        }
        // Absolute, so logs and derived urls name one place whatever the cwd.
        settings.data_dir = absolute(&settings.data_dir);
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !tinyfat_core::email::is_domain(&self.email.domain) {
            return Err(ConfigError::Invalid(format!("email.domain {:?} is not a domain name", self.email.domain)));
        }
        if !matches!(self.sandbox.mode.as_str(), "bwrap" | "none") {
            return Err(ConfigError::Invalid(format!(
                "sandbox.mode {:?}: expected \"bwrap\" or \"none\"",
                self.sandbox.mode
            )));
        }
        if !matches!(self.email.provider.as_str(), "resend" | "smtp") {
            return Err(ConfigError::Invalid(format!(
                "email.provider {:?}: expected \"resend\" or \"smtp\"",
                self.email.provider
            )));
        }
        self.validate_smtp()?;
        if self.runtime.tool_wall_s_max > 600 {
            return Err(ConfigError::Invalid("runtime.tool_wall_s_max is capped at 600".to_owned()));
        }
        for (name, value) in [
            ("queue.dedup_ttl", &self.queue.dedup_ttl),
            ("queue.retry_window", &self.queue.retry_window),
            ("scheduler.late_grace", &self.scheduler.late_grace),
        ] {
            parse_duration(value).map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// SMTP settings (listener and sending) are checked whatever the provider, so a typo is
    /// reported at startup rather than at the first send.
    fn validate_smtp(&self) -> Result<(), ConfigError> {
        let email = &self.email;
        if !email.smtp_listen.trim().is_empty() && email.smtp_listen.trim().parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid(format!(
                "email.smtp_listen {:?} is not a socket address like 0.0.0.0:25",
                email.smtp_listen
            )));
        }
        if email.smtp_tls_cert.is_some() != email.smtp_tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "email.smtp_tls_cert and email.smtp_tls_key go together: set both for STARTTLS, or neither".to_owned(),
            ));
        }
        if email.smtp_recipients_max == 0 || email.smtp_connections_max == 0 || email.smtp_command_timeout_s == 0 {
            return Err(ConfigError::Invalid(
                "email.smtp_recipients_max, smtp_connections_max and smtp_command_timeout_s must be above 0".to_owned(),
            ));
        }
        if !matches!(email.smtp_tls.as_str(), "starttls" | "tls" | "none") {
            return Err(ConfigError::Invalid(format!(
                "email.smtp_tls {:?}: expected \"starttls\", \"tls\" or \"none\"",
                email.smtp_tls
            )));
        }
        if email.provider == "smtp" && email.smtp_host.trim().is_empty() {
            return Err(ConfigError::Invalid(
                "email.provider = \"smtp\" needs email.smtp_host (TINYFAT_EMAIL_SMTP_HOST)".to_owned(),
            ));
        }
        // Plaintext would expose the password and the mail on the network; a
        // relay on this machine (loopback) is the one place it is acceptable.
        if email.smtp_tls == "none" && !email.smtp_host.is_empty() && !is_loopback_host(&email.smtp_host) {
            return Err(ConfigError::Invalid(format!(
                "email.smtp_tls = \"none\" is allowed only for a loopback smtp_host (localhost, 127.0.0.1, ::1), not {:?}: use \"starttls\" or \"tls\"",
                email.smtp_host
            )));
        }
        if !(1..=600).contains(&email.smtp_timeout_s) {
            return Err(ConfigError::Invalid("email.smtp_timeout_s must be 1..=600".to_owned()));
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("tinyfat.db").display()))
    }

    pub fn storage_url(&self) -> String {
        self.storage_url.clone().unwrap_or_else(|| format!("file://{}", self.data_dir.join("storage").display()))
    }

    pub fn master_key_path(&self) -> PathBuf {
        self.master_key_file.clone().unwrap_or_else(|| self.data_dir.join("master.key"))
    }

    pub fn dedup_ttl(&self) -> Duration {
        parse_duration(&self.queue.dedup_ttl).expect("validated")
    }

    pub fn retry_window(&self) -> Duration {
        parse_duration(&self.queue.retry_window).expect("validated")
    }

    /// The store's queue policy: `queue.*` over the store's defaults.
    pub fn queue_policy(&self) -> tinyfat_store::QueuePolicy {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        tinyfat_store::QueuePolicy {
            dedup_ttl_ms: ms(self.dedup_ttl()),
            retry_window_ms: ms(self.retry_window()),
            attempts_max: self.queue.max_attempts,
            ..tinyfat_store::QueuePolicy::default()
        }
    }

    pub fn late_grace(&self) -> Duration {
        parse_duration(&self.scheduler.late_grace).expect("validated")
    }
}

/// `localhost` or a loopback IP address (`127.0.0.0/8`, `::1`).
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `path` made absolute against the current directory (not canonicalised).
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn set_key(
    table: &mut toml::Table,
    defaults: &toml::Table,
    var: &str,
    section: Option<&str>,
    key: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let (target, default) = match section {
        Some(section) => {
            let target = table
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| ConfigError::Invalid(format!("[{section}] must be a table")))?;
            (target, defaults.get(section).and_then(|s| s.get(key)))
        }
        None => (table, defaults.get(key)),
    };
    let bad = |expected| ConfigError::EnvType { var: var.to_owned(), value: raw.to_owned(), expected };
    let value = match default {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        Some(toml::Value::Boolean(_)) => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            _ => return Err(bad("true or false")),
        }),
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        _ => toml::Value::String(raw.to_owned()),
    };
    target.insert(key.to_owned(), value);
    Ok(())
}

/// `90`, `30s`, `5m`, `6h`, `7d` → a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a duration like 30s, 5m, 6h or 7d"))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?} has an unknown unit: use s, m, h or d")),
    };
    Ok(Duration::from_secs(n * seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_with_nothing_configured() {
        let s = Settings::load(&Sources::default()).unwrap();
        assert_eq!(s.listen, "127.0.0.1:3002");
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(s.data_dir, cwd.join("tinyfat-data"));
        assert_eq!(s.database_url(), format!("sqlite://{}", cwd.join("tinyfat-data/tinyfat.db").display()));
        assert_eq!(s.storage_url(), format!("file://{}", cwd.join("tinyfat-data/storage").display()));
        assert_eq!(s.master_key_path(), cwd.join("tinyfat-data/master.key"));
        assert_eq!(s.queue.max_attempts, 8);
        assert_eq!(s.dedup_ttl(), Duration::from_secs(7 * 86_400));
        assert!(s.email.require_auth);
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tinyfat.toml");
        std::fs::write(
            &file,
            "listen = \"0.0.0.0:9\"\n[model]\nanthropic_base_url = \"http://file\"\n[queue]\nmax_attempts = 3\n",
        )
        .unwrap();
        let sources = Sources {
            file: Some(file),
            env: env(&[
                ("TINYFAT_MODEL_ANTHROPIC_BASE_URL", "http://env"),
                ("TINYFAT_QUEUE_MAX_ATTEMPTS", "5"),
                ("TINYFAT_EMAIL_REQUIRE_AUTH", "false"),
                ("TINYFAT_PROVISIONING_ALLOW", "a@b.co, @corp.com"),
                ("TINYFAT_DATABASE_URL", "sqlite:///tmp/x.db"),
                ("TINYFAT_DATA_DIR", "/from/env"),
                ("ANTHROPIC_API_KEY", "sk-alias"),
                ("UNRELATED", "x"),
                ("TINYFAT_LOG", "debug"),
            ]),
            data_dir: Some("/from/flag".into()),
        };
        let s = Settings::load(&sources).unwrap();
        assert_eq!(s.listen, "0.0.0.0:9");
        assert_eq!(s.model.anthropic_base_url, "http://env");
        assert_eq!(s.queue.max_attempts, 5);
        let policy = s.queue_policy();
        assert_eq!(policy.attempts_max, 5, "the store is opened with the configured policy");
        assert_eq!(s.queue.dedup_ttl, "7d", "a partial section keeps its other defaults");
        assert!(!s.email.require_auth);
        assert_eq!(s.provisioning.allow, ["a@b.co", "@corp.com"]);
        assert_eq!(s.database_url(), "sqlite:///tmp/x.db");
        assert_eq!(s.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(s.model.anthropic_api_key.as_ref().unwrap().expose(), "sk-alias");
        assert!(!format!("{s:?}").contains("sk-alias"));
    }

    #[test]
    fn tinyfat_var_beats_alias() {
        let sources = Sources {
            env: env(&[("ANTHROPIC_BASE_URL", "http://alias"), ("TINYFAT_MODEL_ANTHROPIC_BASE_URL", "http://own")]),
            ..Sources::default()
        };
        assert_eq!(Settings::load(&sources).unwrap().model.anthropic_base_url, "http://own");
    }

    #[test]
    fn errors_name_the_culprit() {
        let err =
            Settings::load(&Sources { env: env(&[("TINYFAT_QUEUE_MAX_ATTEMPTS", "many")]), ..Default::default() })
                .unwrap_err();
        assert!(err.to_string().contains("TINYFAT_QUEUE_MAX_ATTEMPTS"), "{err}");
        let err = Settings::load(&Sources { env: env(&[("TINYFAT_SANDBOX_MODE", "yolo")]), ..Default::default() })
            .unwrap_err();
        assert!(err.to_string().contains("sandbox.mode"), "{err}");
        let err = Settings::load(&Sources { env: env(&[("TINYFAT_QUEUE_DEDUP_TTL", "7w")]), ..Default::default() })
            .unwrap_err();
        assert!(err.to_string().contains("queue.dedup_ttl"), "{err}");
        let err =
            Settings::load(&Sources { env: env(&[("TINYFAT_NO_SUCH_KEY", "1")]), ..Default::default() }).unwrap_err();
        assert!(err.to_string().contains("no_such_key"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "listen = [").unwrap();
        assert!(matches!(
            Settings::load(&Sources { file: Some(file), ..Default::default() }),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("1y").is_err());
    }

    #[test]
    fn smtp_listener_settings_from_the_environment() {
        let s = Settings::load(&Sources::default()).unwrap();
        assert!(s.email.smtp_listen.is_empty(), "off by default");
        let s = Settings::load(&Sources {
            env: env(&[
                ("TINYFAT_EMAIL_SMTP_LISTEN", "0.0.0.0:2525"),
                ("TINYFAT_EMAIL_SMTP_TLS_CERT", "/etc/mx/cert.pem"),
                ("TINYFAT_EMAIL_SMTP_TLS_KEY", "/etc/mx/key.pem"),
                ("TINYFAT_EMAIL_SMTP_RECIPIENTS_MAX", "5"),
            ]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.email.smtp_listen, "0.0.0.0:2525");
        assert_eq!(s.email.smtp_tls_key.as_deref(), Some(Path::new("/etc/mx/key.pem")));
        assert_eq!(s.email.smtp_recipients_max, 5);
        for bad in [
            vec![("TINYFAT_EMAIL_SMTP_LISTEN", "port 25")],
            vec![("TINYFAT_EMAIL_SMTP_TLS_CERT", "/etc/mx/cert.pem")],
            vec![("TINYFAT_EMAIL_SMTP_CONNECTIONS_MAX", "0")],
        ] {
            let err = Settings::load(&Sources { env: env(&bad), ..Sources::default() }).unwrap_err();
            assert!(err.to_string().contains("email.smtp"), "{err}");
        }
    }
}
