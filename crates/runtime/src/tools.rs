//! The agent's tools (SPEC §6): `bash`, `read`, `write`, `edit` and
//! `send_message`, their input schemas, and their execution. Files go
//! through `AgentDir` (validated paths, no symlink ever followed) and
//! processes through the `ToolExecutor` seam (the sandbox). `config.json` is
//! read-only to the agent. Every output is truncated to 2,000 lines or 50 KB,
//! saying so.
//!
//! This module does not deliver messages: `send_message` returns an
//! `OutboundMessage` for the platform's delivery table.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tinyfat_core::agent_config::Network;
use tinyfat_core::message::ToolSpec;
use tinyfat_model::CancelToken;
use tinyfat_sandbox::{ExecRequest, ToolExecutor};
use tinyfat_storage::{AgentDir, FileError, RelPath, validate_path};

pub const OUTPUT_LINES_MAX: usize = 2000;
pub const OUTPUT_BYTES_MAX: usize = 50 * 1024;
/// Largest file `read` and `edit` open.
pub const FILE_BYTES_MAX: u64 = 16 << 20;
/// Largest content `write` accepts.
pub const WRITE_BYTES_MAX: usize = 16 << 20;
pub const MESSAGE_CHARS_MAX: usize = 32 * 1024;
pub const BASH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Bytes of raw process output kept before truncation to the tool limits.
const EXEC_OUTPUT_BYTES_MAX: usize = 256 * 1024;
const CHANNELS: [&str; 5] = ["email", "telegram", "slack", "web", "cli"];

/// Where the turn's reply goes: the conversation that started it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    pub channel: String,
    /// Channel-specific address (an email address, a chat id); `None` for the terminal.
    pub to: Option<String>,
}

/// A `send_message` call, for the delivery table; `key` is its idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutboundMessage {
    pub key: String,
    pub channel: String,
    pub to: Option<String>,
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attachments: Vec<String>,
}

pub fn specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "bash".into(),
            description: "Run a bash command in your sandbox. The working directory is /data. Output (stdout and \
                          stderr) is truncated to 2,000 lines or 50 KB."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "command": {"type": "string", "description": "The command line to run."},
                    "timeout_s": {"type": "integer", "description": "Seconds before the command is killed (default 60)."}
                },
                "required": ["command"]
            }),
        },
        ToolSpec {
            name: "read".into(),
            description:
                "Read a text file in /data. Use offset (first line, 1-based) and limit (lines) for long files.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string", "description": "Relative to /data, or absolute inside it."},
                    "offset": {"type": "integer", "description": "First line to show, 1-based."},
                    "limit": {"type": "integer", "description": "How many lines to show."}
                },
                "required": ["path"]
            }),
        },
        ToolSpec {
            name: "write".into(),
            description: "Create or replace a file in /data with the given content. Parent folders are created.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "content": {"type": "string"}
                },
                "required": ["path", "content"]
            }),
        },
        ToolSpec {
            name: "edit".into(),
            description: "Replace old_text with new_text in a file in /data. old_text must occur exactly once.".into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "old_text": {"type": "string"},
                    "new_text": {"type": "string"}
                },
                "required": ["path", "old_text", "new_text"]
            }),
        },
        ToolSpec {
            name: "send_message".into(),
            description: "Send a message to someone other than the person you are answering, or to another \
                          conversation. Your final answer is delivered as the reply without this tool."
                .into(),
            input_schema: json!({
                "type": "object",
                "properties": {
                    "channel": {"type": "string", "enum": CHANNELS},
                    "to": {"type": "string", "description": "Address or chat id on that channel."},
                    "text": {"type": "string"},
                    "attachments": {"type": "array", "items": {"type": "string"}, "description": "Paths in /data."}
                },
                "required": ["channel", "text"]
            }),
        },
    ]
}

/// What a tool call produced: the result text for the model and, for
/// `send_message`, the message to deliver.
#[derive(Debug)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
    pub outbound: Option<OutboundMessage>,
}

impl ToolOutcome {
    fn ok(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: false, outbound: None }
    }

    fn error(content: impl Into<String>) -> Self {
        Self { content: content.into(), is_error: true, outbound: None }
    }
}

/// Everything a tool call may touch.
#[derive(Debug)]
pub struct ToolContext<'a> {
    pub dir: &'a AgentDir,
    pub host_path: &'a Path,
    pub executor: &'a dyn ToolExecutor,
    pub network: Network,
    pub tool_wall_max: Duration,
    pub cancel: &'a CancelToken,
    pub job_id: &'a str,
}

pub async fn run(ctx: &ToolContext<'_>, tool_use_id: &str, name: &str, input: &Value) -> ToolOutcome {
    let result = match name {
        "bash" => bash(ctx, input).await,
        "read" => read(ctx, input),
        "write" => write(ctx, input),
        "edit" => edit(ctx, input),
        "send_message" => send_message(ctx, tool_use_id, input),
        other => Err(format!("unknown tool {other:?}; the tools are bash, read, write, edit and send_message")),
    };
    result.unwrap_or_else(ToolOutcome::error)
}

fn str_field<'v>(input: &'v Value, field: &str) -> Result<&'v str, String> {
    input.get(field).and_then(Value::as_str).ok_or_else(|| format!("missing string field {field:?}"))
}

fn path_field(input: &Value) -> Result<RelPath, String> {
    let path = validate_path(str_field(input, "path")?).map_err(|e| e.to_string())?;
    if path.is_root() {
        return Err("path names /data itself, not a file".into());
    }
    Ok(path)
}

fn refuse_config(path: &RelPath) -> Result<(), String> {
    if path.as_str() == "config.json" {
        return Err("config.json is read-only: your owner changes it (for the model: the /model command)".into());
    }
    Ok(())
}

fn file_error(e: FileError) -> String {
    e.to_string()
}

async fn bash(ctx: &ToolContext<'_>, input: &Value) -> Result<ToolOutcome, String> {
    let command = str_field(input, "command")?;
    let timeout = match input.get("timeout_s").and_then(Value::as_u64) {
        Some(s) => Duration::from_secs(s.max(1)),
        None => BASH_TIMEOUT_DEFAULT,
    }
    .min(ctx.tool_wall_max);
    let request = ExecRequest::new(ctx.host_path, command)
        .timeout(timeout)
        .network(ctx.network)
        .output_bytes_max(EXEC_OUTPUT_BYTES_MAX)
        .cancel(ctx.cancel.subscribe());
    let output = ctx.executor.run(request).await.map_err(|e| e.to_string())?;
    let mut text = truncate(&output.output);
    if output.timed_out {
        text.push_str(&format!("\n[killed: the command ran longer than {} s]", timeout.as_secs()));
    } else if output.cancelled {
        text.push_str("\n[killed: the turn was stopped]");
    } else if let Some(code) = output.exit_code.filter(|c| *c != 0) {
        text.push_str(&format!("\n[exit code {code}]"));
    }
    if text.trim().is_empty() {
        text = "(no output)".into();
    }
    Ok(ToolOutcome { content: text, is_error: !output.success(), outbound: None })
}

fn read(ctx: &ToolContext<'_>, input: &Value) -> Result<ToolOutcome, String> {
    let path = path_field(input)?;
    let bytes = ctx.dir.read(&path, FILE_BYTES_MAX).map_err(file_error)?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Ok(ToolOutcome::error(format!(
            "{path} is a binary file ({} bytes); use bash to inspect it",
            bytes.len()
        )));
    }
    let text = String::from_utf8_lossy(&bytes);
    let offset = input.get("offset").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
    let limit = input.get("limit").and_then(Value::as_u64).map_or(OUTPUT_LINES_MAX, |l| l as usize);
    let total = text.lines().count();
    if offset > total.max(1) {
        return Ok(ToolOutcome::error(format!("offset {offset} is past the end of {path} ({total} lines)")));
    }
    let selected: Vec<&str> = text.lines().skip(offset - 1).take(limit).collect();
    let shown_end = offset - 1 + selected.len();
    let mut out = truncate(&selected.join("\n"));
    if shown_end < total && !out.contains("[output truncated") {
        out.push_str(&format!(
            "\n[showing lines {offset}-{shown_end} of {total}; read more with offset={}]",
            shown_end + 1
        ));
    }
    Ok(ToolOutcome::ok(out))
}

fn write(ctx: &ToolContext<'_>, input: &Value) -> Result<ToolOutcome, String> {
    let path = path_field(input)?;
    refuse_config(&path)?;
    let content = str_field(input, "content")?;
    if content.len() > WRITE_BYTES_MAX {
        return Err(format!("content is {} bytes; the limit is {WRITE_BYTES_MAX}", content.len()));
    }
    ctx.dir.write_atomic(&path, content.as_bytes()).map_err(file_error)?;
    Ok(ToolOutcome::ok(format!("wrote {} bytes to {path}", content.len())))
}

fn edit(ctx: &ToolContext<'_>, input: &Value) -> Result<ToolOutcome, String> {
    let path = path_field(input)?;
    refuse_config(&path)?;
    let old_text = str_field(input, "old_text")?;
    let new_text = str_field(input, "new_text")?;
    if old_text.is_empty() {
        return Err("old_text is empty; use write to create a file".into());
    }
    let text = ctx.dir.read_string(&path, FILE_BYTES_MAX).map_err(file_error)?;
    match text.matches(old_text).count() {
        0 => Err(format!("old_text was not found in {path}; read the file and copy the text exactly")),
        1 => {
            let updated = text.replacen(old_text, new_text, 1);
            ctx.dir.write_atomic(&path, updated.as_bytes()).map_err(file_error)?;
            Ok(ToolOutcome::ok(format!("edited {path}")))
        }
        n => Err(format!("old_text occurs {n} times in {path}; include more context so it matches exactly once")),
    }
}

fn send_message(ctx: &ToolContext<'_>, tool_use_id: &str, input: &Value) -> Result<ToolOutcome, String> {
    let channel = str_field(input, "channel")?;
    if !CHANNELS.contains(&channel) {
        return Err(format!("unknown channel {channel:?}; use one of {}", CHANNELS.join(", ")));
    }
    let text = str_field(input, "text")?;
    if text.trim().is_empty() {
        return Err("text is empty".into());
    }
    if text.chars().count() > MESSAGE_CHARS_MAX {
        return Err(format!("text is longer than {MESSAGE_CHARS_MAX} characters"));
    }
    let to = input.get("to").and_then(Value::as_str).map(str::to_owned);
    let mut attachments = Vec::new();
    for value in input.get("attachments").and_then(Value::as_array).into_iter().flatten() {
        let raw = value.as_str().ok_or("attachments must be paths")?;
        let path = validate_path(raw).map_err(|e| e.to_string())?;
        match ctx.dir.kind(&path).map_err(file_error)? {
            Some(tinyfat_storage::EntryKind::File) => attachments.push(path.as_str().to_owned()),
            _ => return Err(format!("attachment {path} is not a regular file")),
        }
    }
    let key = format!("{}:{tool_use_id}", ctx.job_id);
    let outbound = OutboundMessage { key, channel: channel.to_owned(), to, text: text.to_owned(), attachments };
    let target = outbound.to.as_deref().map(|t| format!(" to {t}")).unwrap_or_default();
    Ok(ToolOutcome {
        content: format!("message queued for delivery on {channel}{target}"),
        is_error: false,
        outbound: Some(outbound),
    })
}

/// Keeps the first 2,000 lines and 50 KB, and says what was cut.
pub fn truncate(text: &str) -> String {
    let total_lines = text.lines().count();
    let mut end = text.len().min(OUTPUT_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if let Some((idx, _)) = text.match_indices('\n').nth(OUTPUT_LINES_MAX - 1) {
        end = end.min(idx);
    }
    if end >= text.len() {
        return text.to_owned();
    }
    let kept = &text[..end];
    let kept_lines = kept.lines().count();
    format!(
        "{kept}\n[output truncated: showed {kept_lines} of {total_lines} lines, {} of {} bytes]",
        kept.len(),
        text.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_by_lines_and_bytes() {
        let short = "a\nb\nc";
        assert_eq!(truncate(short), short);
        let many: String = (0..5000).map(|i| format!("{i}\n")).collect();
        let out = truncate(&many);
        assert!(out.lines().count() <= OUTPUT_LINES_MAX + 1);
        assert!(
            out.ends_with("[output truncated: showed 2000 of 5000 lines, 8889 of 23890 bytes]"),
            "{}",
            &out[out.len() - 80..]
        );
        let wide = "é".repeat(40_000);
        let out = truncate(&wide);
        assert!(out.len() <= OUTPUT_BYTES_MAX + 100);
        assert!(out.contains("[output truncated"));
    }

    #[test]
    fn schemas_match_the_contract() {
        let specs = specs();
        let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["bash", "read", "write", "edit", "send_message"]);
        let required = |name: &str| specs.iter().find(|s| s.name == name).unwrap().input_schema["required"].clone();
        assert_eq!(required("bash"), json!(["command"]));
        assert_eq!(required("edit"), json!(["path", "old_text", "new_text"]));
        assert_eq!(required("send_message"), json!(["channel", "text"]));
    }
}
