//! A session file (`sessions/{id}.jsonl`): loading it, appending records, and
//! turning its records into the conversation the model sees.
//!
//! Records are appended and synced one at a time and never rewritten. The
//! model's view is derived: everything after the last `/clear`, with the
//! latest compaction's summary standing in for the records it replaces, then
//! sanitised (`sanitize`). A torn final line (a crash mid-append) is ignored.
//! A log remembers which file and how much of it it reflects, so that a kept
//! log (`SessionCache`) can be brought up to date by reading only what was
//! appended since (`refreshed`).

use tinyfat_core::message::{ContentBlock, Message, Role};
use tinyfat_core::session::{RecordBody, SessionId, SessionRecord};
use tinyfat_storage::{AgentDir, FileError, FileStamp, RelPath, validate_path};

/// Largest session file we load; past it the session must be compacted or cleared.
pub const SESSION_BYTES_MAX: u64 = 256 << 20;

pub const META_CLEAR: &str = "clear";
pub const META_MODEL: &str = "model";
pub const META_STOP: &str = "stop";

/// Bytes at the end of what a log parsed, compared when a cached log is
/// refreshed: a file that only grew still ends its old part with them.
const TAIL_CHECK_BYTES: usize = 64;

#[derive(Debug)]
pub struct SessionLog {
    path: RelPath,
    pub records: Vec<SessionRecord>,
    /// Lines that did not parse (a torn tail, or a hand edit); kept out of the view.
    pub skipped_lines: usize,
    /// The file ends in a torn line: the next append starts a new line first.
    torn_tail: bool,
    /// The file as `records` reflect it; `None` when that is not known (the
    /// file changed under an append), and such a log is not cached.
    stamp: Option<FileStamp>,
    /// The file's last bytes (up to `TAIL_CHECK_BYTES`) as far as `stamp.len`.
    tail: Vec<u8>,
}

impl SessionLog {
    /// Reads and parses the whole session file.
    pub fn load(dir: &AgentDir, session: &SessionId) -> Result<Self, FileError> {
        Self::load_path(dir, validate_path(&session.file_path())?)
    }

    /// Reads and parses the whole session file at `path` (validated).
    pub(crate) fn load_path(dir: &AgentDir, path: RelPath) -> Result<Self, FileError> {
        let mut log =
            Self { path, records: Vec::new(), skipped_lines: 0, torn_tail: false, stamp: None, tail: Vec::new() };
        match dir.read_from(&log.path, 0, SESSION_BYTES_MAX)? {
            Some((bytes, stamp)) => {
                log.records.reserve(bytes.len() / 256);
                log.take_in(&bytes, stamp);
            }
            // A session not started yet: the first append creates the file.
            None => log.stamp = Some(FileStamp { dev: 0, ino: 0, len: 0 }),
        }
        Ok(log)
    }

    /// This log brought up to date with its file: only what was appended
    /// since it was read is read and parsed. A file replaced, shortened or
    /// rewritten (its old end differs) is read whole again.
    pub(crate) fn refreshed(mut self, dir: &AgentDir) -> Result<Self, FileError> {
        let Some(known) = self.stamp.filter(|known| known.len > 0) else {
            return Self::load_path(dir, self.path);
        };
        let from = known.len - self.tail.len() as u64;
        match dir.read_from(&self.path, from, SESSION_BYTES_MAX)? {
            Some((bytes, now))
                if (now.dev, now.ino) == (known.dev, known.ino)
                    && now.len >= known.len
                    && bytes.starts_with(&self.tail) =>
            {
                let appended = &bytes[self.tail.len()..];
                self.take_in(appended, now);
                Ok(self)
            }
            _ => Self::load_path(dir, self.path),
        }
    }

    /// Parses `bytes`, the file's content up to `stamp.len`, after what the
    /// log already holds (which ends at a line end, or at a torn line that
    /// the next writer ended with a newline).
    fn take_in(&mut self, bytes: &[u8], stamp: FileStamp) {
        let text = String::from_utf8_lossy(bytes);
        if !text.is_empty() {
            self.torn_tail = !text.ends_with('\n');
        }
        for line in text.lines() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<SessionRecord>(line) {
                Ok(record) => self.records.push(record),
                Err(_) => self.skipped_lines += 1,
            }
        }
        self.remember_tail(bytes);
        self.stamp = Some(stamp);
    }

    fn remember_tail(&mut self, appended: &[u8]) {
        let keep_new = appended.len().min(TAIL_CHECK_BYTES);
        let keep_old = (TAIL_CHECK_BYTES - keep_new).min(self.tail.len());
        self.tail.drain(..self.tail.len() - keep_old);
        self.tail.extend_from_slice(&appended[appended.len() - keep_new..]);
    }

    /// The session file's path in the agent's storage.
    pub(crate) fn path(&self) -> &RelPath {
        &self.path
    }

    /// The file's length as the log reflects it, when known.
    pub(crate) fn known_len(&self) -> Option<u64> {
        self.stamp.map(|stamp| stamp.len)
    }

    pub fn next_id(&self) -> u64 {
        self.records.last().map_or(1, |r| r.id + 1)
    }

    /// Appends one record and syncs it before returning.
    pub fn append(&mut self, dir: &AgentDir, ts: String, body: RecordBody) -> Result<&SessionRecord, FileError> {
        let record = SessionRecord { id: self.next_id(), ts, body };
        let mut line = Vec::with_capacity(256);
        // A torn tail from a crash must not glue itself to this record.
        if self.torn_tail {
            line.push(b'\n');
        }
        serde_json::to_writer(&mut line, &record).expect("records serialise");
        line.push(b'\n');
        let after = dir.append_sync(&self.path, &line)?;
        // The log still mirrors the file if the append went right after
        // what it knew (a new file has no known identity yet).
        self.stamp = self.stamp.filter(|known| {
            (known.len == 0 || (known.dev, known.ino) == (after.dev, after.ino))
                && after.len == known.len + line.len() as u64
        });
        if self.stamp.is_some() {
            self.stamp = Some(after);
            self.remember_tail(&line);
        }
        self.torn_tail = false;
        self.records.push(record);
        Ok(self.records.last().expect("just pushed"))
    }

    /// The conversation as the model should see it, sanitised.
    pub fn model_view(&self) -> Vec<Message> {
        view_of(&self.records)
    }

    /// The model view of the live records before `index` (for compaction).
    pub fn model_view_before(&self, index: usize) -> Vec<Message> {
        view_of(&self.records[..index])
    }

    /// Whether a record of this job already exists (the job is being retried).
    pub fn has_job(&self, job: &str) -> bool {
        self.records.iter().any(|r| matches!(&r.body, RecordBody::Message { job: Some(j), .. } if j == job))
    }

    /// The final answer of `job`, if its turn already completed.
    pub fn completed_reply(&self, job: &str) -> Option<String> {
        let last = self.records.last()?;
        match &last.body {
            RecordBody::Message { message, job: Some(j), .. }
                if j == job
                    && message.role == Role::Assistant
                    && !message.content.iter().any(|b| matches!(b, ContentBlock::ToolUse { .. })) =>
            {
                Some(message.text())
            }
            _ => None,
        }
    }

    /// Estimated tokens of the model view (4 bytes a token is close enough to
    /// decide when to compact).
    pub fn estimate_tokens(messages: &[Message]) -> u64 {
        let bytes: usize = messages
            .iter()
            .flat_map(|m| &m.content)
            .map(|b| match b {
                ContentBlock::Text { text } => text.len(),
                ContentBlock::ToolUse { input, name, .. } => name.len() + input.to_string().len(),
                ContentBlock::ToolResult { content, .. } => content.len(),
                ContentBlock::Image { data, .. } => data.len() / 4,
            })
            .sum();
        (bytes / 4) as u64
    }
}

/// Records after the last `/clear`.
fn live(records: &[SessionRecord]) -> &[SessionRecord] {
    let start = records
        .iter()
        .rposition(|r| matches!(&r.body, RecordBody::Meta { event, .. } if event == META_CLEAR))
        .map_or(0, |i| i + 1);
    &records[start..]
}

/// The model's view of `records`: after the last `/clear`, the latest
/// compaction's summary in place of what it replaces, sanitised.
fn view_of(records: &[SessionRecord]) -> Vec<Message> {
    let live = live(records);
    let compaction = live.iter().rev().find_map(|r| match &r.body {
        RecordBody::Compaction { summary, replaces_through } => Some((summary.as_str(), *replaces_through)),
        _ => None,
    });
    let mut messages = Vec::new();
    let through = match compaction {
        Some((summary, through)) => {
            messages.push(Message::user_text(format!(
                "[Summary of the earlier conversation, written when it was compacted]\n{summary}"
            )));
            through
        }
        None => 0,
    };
    for record in live {
        if record.id <= through {
            continue;
        }
        if let RecordBody::Message { message, .. } = &record.body {
            messages.push(message.clone());
        }
    }
    sanitize(messages)
}

pub const INTERRUPTED_RESULT: &str = "interrupted; the tool may have run";

/// Makes a history safe to send: a `tool_result` whose `tool_use` is not in
/// the preceding assistant message is dropped; a `tool_use` with no result in
/// the next user message gets the synthetic result `interrupted; the tool may
/// have run`; consecutive messages of one role are merged; empty messages are
/// dropped; the conversation starts with a user message.
pub fn sanitize(messages: Vec<Message>) -> Vec<Message> {
    // Merge runs of one role first, so results split over records line up.
    let mut merged: Vec<Message> = Vec::with_capacity(messages.len());
    for message in messages {
        match merged.last_mut() {
            Some(last) if last.role == message.role => last.content.extend(message.content),
            _ => merged.push(message),
        }
    }

    let mut out: Vec<Message> = Vec::with_capacity(merged.len() + 1);
    let mut pending_uses: Vec<String> = Vec::new();
    for mut message in merged {
        match message.role {
            Role::Assistant => {
                if !pending_uses.is_empty() {
                    // The previous assistant's tool calls were never answered.
                    out.push(Message { role: Role::User, content: synthetic_results(&pending_uses) });
                    pending_uses.clear();
                }
                message.content.retain(|b| !matches!(b, ContentBlock::ToolResult { .. }));
                pending_uses = message
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        ContentBlock::ToolUse { id, .. } => Some(id.clone()),
                        _ => None,
                    })
                    .collect();
                if message.content.is_empty() {
                    continue;
                }
                if out.is_empty() {
                    out.push(Message::user_text("(conversation resumed)"));
                }
                out.push(message);
            }
            Role::User => {
                let mut answered = Vec::new();
                message.content.retain(|b| match b {
                    ContentBlock::ToolResult { tool_use_id, .. } => {
                        let known = pending_uses.contains(tool_use_id) && !answered.contains(tool_use_id);
                        if known {
                            answered.push(tool_use_id.clone());
                        }
                        known
                    }
                    _ => true,
                });
                let missing: Vec<String> = pending_uses.iter().filter(|id| !answered.contains(id)).cloned().collect();
                pending_uses.clear();
                if !missing.is_empty() {
                    // Results must come first in the user message that answers.
                    let mut content = synthetic_results(&missing);
                    content.append(&mut message.content);
                    message.content = content;
                }
                // Tool results must precede any text in the same message.
                message.content.sort_by_key(|b| !matches!(b, ContentBlock::ToolResult { .. }));
                if !message.content.is_empty() {
                    out.push(message);
                }
            }
        }
    }
    if !pending_uses.is_empty() {
        out.push(Message { role: Role::User, content: synthetic_results(&pending_uses) });
    }
    // Dropping messages may have left two of one role side by side.
    let mut result: Vec<Message> = Vec::with_capacity(out.len());
    for message in out {
        match result.last_mut() {
            Some(last) if last.role == message.role => last.content.extend(message.content),
            _ => result.push(message),
        }
    }
    result
}

fn synthetic_results(ids: &[String]) -> Vec<ContentBlock> {
    ids.iter()
        .map(|id| ContentBlock::ToolResult {
            tool_use_id: id.clone(),
            content: INTERRUPTED_RESULT.into(),
            is_error: true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn user(text: &str) -> Message {
        Message::user_text(text)
    }

    fn assistant(text: &str) -> Message {
        Message::assistant_text(text)
    }

    fn tool_use(id: &str) -> Message {
        Message {
            role: Role::Assistant,
            content: vec![
                ContentBlock::Text { text: "let me check".into() },
                ContentBlock::ToolUse { id: id.into(), name: "bash".into(), input: json!({"command": "ls"}) },
            ],
        }
    }

    fn result(id: &str) -> Message {
        Message {
            role: Role::User,
            content: vec![ContentBlock::ToolResult { tool_use_id: id.into(), content: "ok".into(), is_error: false }],
        }
    }

    /// Every tool_use is answered in the next message, every result has its use.
    fn assert_valid(messages: &[Message]) {
        assert_eq!(messages.first().map(|m| m.role), Some(Role::User), "{messages:#?}");
        for pair in messages.windows(2) {
            assert_ne!(pair[0].role, pair[1].role, "roles alternate: {messages:#?}");
        }
        for (i, m) in messages.iter().enumerate() {
            for b in &m.content {
                if let ContentBlock::ToolUse { id, .. } = b {
                    let next = messages.get(i + 1).expect("a tool_use is followed by its result");
                    assert!(
                        next.content
                            .iter()
                            .any(|r| matches!(r, ContentBlock::ToolResult { tool_use_id, .. } if tool_use_id == id))
                    );
                }
                if let ContentBlock::ToolResult { tool_use_id, .. } = b {
                    let prev = &messages[i - 1];
                    assert!(
                        prev.content.iter().any(|u| matches!(u, ContentBlock::ToolUse { id, .. } if id == tool_use_id))
                    );
                }
            }
        }
    }

    #[test]
    fn clean_history_is_unchanged() {
        let history = vec![user("hi"), tool_use("t1"), result("t1"), assistant("done")];
        assert_eq!(sanitize(history.clone()), history);
    }

    #[test]
    fn turn_interrupted_in_the_middle_of_a_tool_call() {
        // The process died after recording the tool_use, before its result.
        let out = sanitize(vec![user("hi"), tool_use("t1"), user("are you there?")]);
        assert_valid(&out);
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[2].content[0],
            ContentBlock::ToolResult { tool_use_id, content, is_error: true } if tool_use_id == "t1" && content == INTERRUPTED_RESULT));
        assert_eq!(out[2].text(), "are you there?");
        // Interrupted at the very end of the file.
        let out = sanitize(vec![user("hi"), tool_use("t1")]);
        assert_valid(&out);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn partial_results_get_synthetic_ones_for_the_rest() {
        let mut two = tool_use("a");
        two.content.push(ContentBlock::ToolUse { id: "b".into(), name: "read".into(), input: json!({}) });
        let out = sanitize(vec![user("go"), two, result("a")]);
        assert_valid(&out);
        let ids: Vec<_> = out[2]
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::ToolResult { tool_use_id, content, .. } => Some((tool_use_id.as_str(), content.as_str())),
                _ => None,
            })
            .collect();
        assert!(ids.contains(&("a", "ok")) && ids.contains(&("b", INTERRUPTED_RESULT)), "{ids:?}");
    }

    #[test]
    fn orphaned_results_are_dropped() {
        let out = sanitize(vec![user("hi"), result("ghost"), assistant("hello")]);
        assert_valid(&out);
        assert!(out.iter().all(|m| m.content.iter().all(|b| !matches!(b, ContentBlock::ToolResult { .. }))));
        // A result whose assistant message was compacted away.
        let out = sanitize(vec![result("t0"), user("next"), assistant("ok")]);
        assert_valid(&out);
        assert_eq!(out[0].text(), "next");
        // A duplicated result (written twice) is kept once.
        let out = sanitize(vec![user("hi"), tool_use("t1"), result("t1"), result("t1"), assistant("x")]);
        assert_valid(&out);
        assert_eq!(out[2].content.len(), 1);
    }

    #[test]
    fn history_starting_with_assistant_or_split_records() {
        let out = sanitize(vec![assistant("left over"), user("hi")]);
        assert_valid(&out);
        let out = sanitize(vec![user("a"), user("b"), tool_use("t"), result("t"), assistant("x"), assistant("y")]);
        assert_valid(&out);
        assert_eq!(out.len(), 4);
    }
}
