//! A server-sent-events decoder with hard size limits. It turns the bytes of
//! a `text/event-stream` body into `(event, data)` pairs and knows nothing of
//! what the data means.
//!
//! Why not `eventsource-stream`: it buffers a line of any length, and a
//! misbehaving server must not be able to grow our memory without bound. This
//! decoder rejects a line longer than `line_bytes_max` and an event whose data
//! exceeds `event_bytes_max`.

use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, `message` when absent.
    pub event: String,
    /// The `data:` lines joined by `\n`.
    pub data: String,
}

#[derive(Debug)]
pub(crate) struct SseDecoder {
    line: Vec<u8>,
    /// The previous chunk ended in `\r`; a `\n` starting this one belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    line_bytes_max: usize,
    event_bytes_max: usize,
}

impl SseDecoder {
    pub fn new(line_bytes_max: usize, event_bytes_max: usize) -> Self {
        Self {
            line: Vec::new(),
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            line_bytes_max,
            event_bytes_max,
        }
    }

    /// Feeds a chunk of the body; complete events are appended to `out`.
    pub fn push(&mut self, mut bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), ModelError> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.after_cr && bytes[0] == b'\n' {
            bytes = &bytes[1..];
        }
        self.after_cr = false;
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n' || *b == b'\r') {
                Some(end) => {
                    self.extend_line(&bytes[..end])?;
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out)?;
                    if bytes[end] == b'\r' {
                        match bytes.get(end + 1) {
                            Some(b'\n') => bytes = &bytes[end + 2..],
                            Some(_) => bytes = &bytes[end + 1..],
                            None => {
                                self.after_cr = true;
                                bytes = &[];
                            }
                        }
                    } else {
                        bytes = &bytes[end + 1..];
                    }
                }
                None => {
                    self.extend_line(bytes)?;
                    bytes = &[];
                }
            }
        }
        Ok(())
    }

    /// Ends the body. A final event missing its blank line is still delivered:
    /// some servers omit it, and dropping their last event helps nobody.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Result<(), ModelError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.process_line(&line, out)?;
        }
        self.process_line(b"", out)
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), ModelError> {
        if self.line.len() + bytes.len() > self.line_bytes_max {
            return Err(ModelError::protocol(format!("an event-stream line exceeds {} bytes", self.line_bytes_max)));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), ModelError> {
        if line.is_empty() {
            if self.has_data {
                let event = if self.event.is_empty() { "message".to_string() } else { std::mem::take(&mut self.event) };
                out.push(SseEvent { event, data: std::mem::take(&mut self.data) });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| ModelError::protocol("an event-stream line is not UTF-8"))?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                if self.data.len() + value.len() + 1 > self.event_bytes_max {
                    return Err(ModelError::protocol(format!(
                        "an event-stream event exceeds {} bytes",
                        self.event_bytes_max
                    )));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id`, `retry` and unknown fields do not matter for a one-shot stream.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(chunks: &[&[u8]]) -> Result<Vec<SseEvent>, ModelError> {
        let mut decoder = SseDecoder::new(64, 128);
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk, &mut out)?;
        }
        decoder.finish(&mut out)?;
        Ok(out)
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent { event: event.into(), data: data.into() }
    }

    #[test]
    fn decodes_named_events_and_plain_data() {
        let out = decode(&[b"event: ping\ndata: {\"type\": \"ping\"}\n\ndata: [DONE]\n\n"]).unwrap();
        assert_eq!(out, vec![ev("ping", "{\"type\": \"ping\"}"), ev("message", "[DONE]")]);
    }

    #[test]
    fn events_survive_any_chunk_boundary() {
        let body = b"event: a\r\ndata: one\r\ndata:two\r\n\r\n: comment\n\nevent: b\rdata: x\r\r";
        let whole = decode(&[body]).unwrap();
        assert_eq!(whole, vec![ev("a", "one\ntwo"), ev("b", "x")]);
        for split in 0..body.len() {
            let (left, right) = body.split_at(split);
            assert_eq!(decode(&[left, right]).unwrap(), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode(&bytes).unwrap(), whole);
    }

    #[test]
    fn a_final_event_without_blank_line_is_delivered() {
        assert_eq!(decode(&[b"data: [DONE]"]).unwrap(), vec![ev("message", "[DONE]")]);
    }

    #[test]
    fn limits_lines_and_events() {
        let long_line = vec![b'x'; 65];
        assert!(matches!(decode(&[&long_line]), Err(ModelError::Protocol { .. })));
        let body = "data: 0123456789012345678901234567890123456789\n".repeat(4);
        let err = decode(&[body.as_bytes()]).unwrap_err();
        assert!(err.to_string().contains("exceeds 128 bytes"), "{err}");
        assert!(matches!(decode(&[b"data: \xff\n\n"]), Err(ModelError::Protocol { .. })));
    }
}
