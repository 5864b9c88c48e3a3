//! The conversation as the platform models it: messages of Anthropic-style
//! content blocks. Model clients translate these to and from each provider's
//! wire format; nothing else in the tree knows a provider's field names.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: Vec<ContentBlock>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", try_from = "BlockFields")]
pub enum ContentBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        #[serde(default)]
        is_error: bool,
    },
    Image {
        media_type: String,
        /// Base64 data.
        data: String,
    },
}

/// Every field any block may have, read in one pass: the derived reader of
/// the tagged `ContentBlock` buffers each block into an intermediate tree
/// first, and every turn reads every block of its session. Same format.
#[derive(Deserialize)]
struct BlockFields {
    #[serde(rename = "type")]
    kind: BlockKind,
    text: Option<String>,
    id: Option<String>,
    name: Option<String>,
    /// Present-but-null is a value here (`input: null`), not a missing field.
    #[serde(default, deserialize_with = "present")]
    input: Option<serde_json::Value>,
    tool_use_id: Option<String>,
    content: Option<String>,
    #[serde(default)]
    is_error: bool,
    media_type: Option<String>,
    data: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum BlockKind {
    Text,
    ToolUse,
    ToolResult,
    Image,
}

/// A field a one-pass reader (`BlockFields`, `session::RecordFields`) found
/// missing for the record's kind, worded as serde words it.
pub(crate) fn required<T>(value: Option<T>, field: &str) -> Result<T, String> {
    value.ok_or_else(|| format!("missing field `{field}`"))
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

impl TryFrom<BlockFields> for ContentBlock {
    type Error = String;

    fn try_from(f: BlockFields) -> Result<Self, String> {
        Ok(match f.kind {
            BlockKind::Text => Self::Text { text: required(f.text, "text")? },
            BlockKind::ToolUse => Self::ToolUse {
                id: required(f.id, "id")?,
                name: required(f.name, "name")?,
                input: required(f.input, "input")?,
            },
            BlockKind::ToolResult => Self::ToolResult {
                tool_use_id: required(f.tool_use_id, "tool_use_id")?,
                content: required(f.content, "content")?,
                is_error: f.is_error,
            },
            BlockKind::Image => {
                Self::Image { media_type: required(f.media_type, "media_type")?, data: required(f.data, "data")? }
            }
        })
    }
}

impl Message {
    pub fn user_text(text: impl Into<String>) -> Self {
        Self { role: Role::User, content: vec![ContentBlock::Text { text: text.into() }] }
    }

    pub fn assistant_text(text: impl Into<String>) -> Self {
        Self { role: Role::Assistant, content: vec![ContentBlock::Text { text: text.into() }] }
    }

    /// All text blocks joined, for replies and summaries.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for block in &self.content {
            if let ContentBlock::Text { text } = block {
                out.push_str(text);
            }
        }
        out
    }
}

/// A tool as offered to the model: name, description and JSON schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    pub input_schema: serde_json::Value,
}

/// Tokens used by one model call (or summed over a turn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub cache_creation_input_tokens: u64,
    #[serde(default)]
    pub cache_read_input_tokens: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_creation_input_tokens += other.cache_creation_input_tokens;
        self.cache_read_input_tokens += other.cache_read_input_tokens;
    }

    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_kind_reads_back_what_it_wrote() {
        let blocks = [
            ContentBlock::Text { text: "a \"quoted\" line\n".into() },
            ContentBlock::ToolUse {
                id: "toolu_1".into(),
                name: "bash".into(),
                input: serde_json::json!({"command": "ls"}),
            },
            ContentBlock::ToolUse { id: "toolu_2".into(), name: "noop".into(), input: serde_json::Value::Null },
            ContentBlock::ToolResult { tool_use_id: "toolu_1".into(), content: "ok".into(), is_error: true },
            ContentBlock::Image { media_type: "image/png".into(), data: "iVBORw0KGgo=".into() },
        ];
        for original in blocks {
            let json = serde_json::to_string(&original).unwrap();
            assert_eq!(serde_json::from_str::<ContentBlock>(&json).unwrap(), original, "{json}");
        }
    }

    #[test]
    fn blocks_keep_their_defaults_and_errors() {
        let result: ContentBlock =
            serde_json::from_str(r#"{"type":"tool_result","tool_use_id":"t","content":"c"}"#).unwrap();
        assert_eq!(result, ContentBlock::ToolResult { tool_use_id: "t".into(), content: "c".into(), is_error: false });
        for (bad, says) in [
            (r#"{"type":"tool_use","id":"t","name":"n"}"#, "missing field `input`"),
            (r#"{"type":"text"}"#, "missing field `text`"),
            (r#"{"type":"video","data":"x"}"#, "unknown variant `video`"),
            (r#"{"text":"no type"}"#, "missing field `type`"),
        ] {
            let error = serde_json::from_str::<ContentBlock>(bad).unwrap_err().to_string();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
