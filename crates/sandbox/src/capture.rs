//! Bounded capture of a tool's output.
//!
//! Keeps the first three quarters of the budget and a ring of the last
//! quarter (the end of a build log is where the error is), counts what falls
//! in between, and renders lossy UTF-8 that never exceeds the budget plus one
//! truncation note. Memory use is the budget, whatever the process prints.
//! This module must not do I/O.

use std::collections::VecDeque;

/// Bytes the process wrote, up to a fixed budget.
#[derive(Debug)]
pub(crate) struct Capture {
    head: Vec<u8>,
    head_max: usize,
    tail: VecDeque<u8>,
    tail_max: usize,
    total_bytes: u64,
}

impl Capture {
    pub(crate) fn new(bytes_max: usize) -> Self {
        let tail_max = bytes_max / 4;
        let head_max = bytes_max - tail_max;
        Self {
            head: Vec::with_capacity(head_max.min(64 * 1024)),
            head_max,
            tail: VecDeque::new(),
            tail_max,
            total_bytes: 0,
        }
    }

    pub(crate) fn push(&mut self, mut chunk: &[u8]) {
        self.total_bytes += chunk.len() as u64;
        if self.head.len() < self.head_max {
            let n = chunk.len().min(self.head_max - self.head.len());
            self.head.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
        }
        if chunk.is_empty() || self.tail_max == 0 {
            return;
        }
        if chunk.len() >= self.tail_max {
            self.tail.clear();
            self.tail.extend(&chunk[chunk.len() - self.tail_max..]);
            return;
        }
        let overflow = (self.tail.len() + chunk.len()).saturating_sub(self.tail_max);
        self.tail.drain(..overflow);
        self.tail.extend(chunk);
    }

    pub(crate) fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The text, and whether anything was dropped.
    pub(crate) fn render(&self) -> (String, bool) {
        let budget = self.head_max + self.tail_max;
        let kept = self.head.len() + self.tail.len();
        if self.total_bytes == kept as u64 {
            // Nothing dropped yet; the tail continues the head directly.
            let mut all = self.head.clone();
            all.extend(self.tail.iter());
            let (text, used) = lossy_prefix(&all, budget);
            if used == all.len() {
                return (text, false);
            }
            // Invalid bytes grew when replaced; fall through to the
            // head/tail rendering, which bounds each half.
        }
        let tail: Vec<u8> = self.tail.iter().copied().collect();
        let (head_text, head_used) = lossy_prefix(&self.head, self.head_max);
        let (tail_text, tail_used) = lossy_suffix(&tail, self.tail_max);
        let omitted = self.total_bytes - head_used as u64 - tail_used as u64;
        let mut out = head_text;
        out.push_str(&truncation_note(omitted));
        out.push_str(&tail_text);
        (out, true)
    }
}

/// The note placed where bytes were dropped.
pub(crate) fn truncation_note(omitted_bytes: u64) -> String {
    format!("\n[output truncated: {omitted_bytes} bytes omitted]\n")
}

/// Longest lossy rendering of a prefix of `bytes` that fits in `budget`
/// bytes; returns the text and how many input bytes it covers.
fn lossy_prefix(bytes: &[u8], budget: usize) -> (String, usize) {
    let mut out = String::new();
    let mut used = 0;
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid();
        let room = budget - out.len();
        if valid.len() > room {
            let cut = floor_char_boundary(valid, room);
            out.push_str(&valid[..cut]);
            used += cut;
            return (out, used);
        }
        out.push_str(valid);
        used += valid.len();
        let invalid = chunk.invalid();
        if !invalid.is_empty() {
            if budget - out.len() < char::REPLACEMENT_CHARACTER.len_utf8() {
                return (out, used);
            }
            out.push(char::REPLACEMENT_CHARACTER);
            used += invalid.len();
        }
    }
    (out, used)
}

/// Longest lossy rendering of a suffix of `bytes` that fits in `budget`.
fn lossy_suffix(bytes: &[u8], budget: usize) -> (String, usize) {
    // Skip continuation bytes of a character cut by the ring buffer.
    let start = bytes.iter().take(3).take_while(|b| (**b & 0xC0) == 0x80).count();
    let bytes = &bytes[start..];
    // Pieces of text with the number of input bytes each stands for.
    let mut pieces: Vec<(&str, usize)> = Vec::new();
    for chunk in bytes.utf8_chunks() {
        if !chunk.valid().is_empty() {
            pieces.push((chunk.valid(), chunk.valid().len()));
        }
        if !chunk.invalid().is_empty() {
            pieces.push(("\u{FFFD}", chunk.invalid().len()));
        }
    }
    let mut len: usize = pieces.iter().map(|(s, _)| s.len()).sum();
    let mut used: usize = bytes.len();
    let mut first = 0;
    while len > budget && first < pieces.len() {
        let (text, raw) = pieces[first];
        let excess = len - budget;
        if text != "\u{FFFD}" && text.len() > excess {
            let cut = ceil_char_boundary(text, excess);
            pieces[first] = (&text[cut..], raw - cut);
            used -= cut;
            break;
        }
        len -= text.len();
        used -= raw;
        first += 1;
    }
    let out: String = pieces[first..].iter().map(|(s, _)| *s).collect();
    (out, used)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_char_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn capture(bytes_max: usize, chunks: &[&[u8]]) -> Capture {
        let mut c = Capture::new(bytes_max);
        for chunk in chunks {
            c.push(chunk);
        }
        c
    }

    #[test]
    fn small_output_is_kept_whole() {
        let (text, truncated) = capture(100, &[b"hello ", "wörld\n".as_bytes()]).render();
        assert_eq!(text, "hello wörld\n");
        assert!(!truncated);
    }

    #[test]
    fn large_output_keeps_head_and_tail_with_a_note() {
        let mut c = Capture::new(100);
        for i in 0..1000 {
            c.push(format!("line {i:04}\n").as_bytes());
        }
        let (text, truncated) = c.render();
        assert!(truncated);
        assert!(text.starts_with("line 0000\n"));
        assert!(text.ends_with("line 0999\n"));
        assert!(text.contains("[output truncated: 9900 bytes omitted]"));
    }

    #[test]
    fn binary_output_never_grows_past_the_budget() {
        let junk = vec![0xFFu8; 10_000];
        let (text, truncated) = capture(64, &[&junk]).render();
        assert!(truncated);
        let note_len = truncation_note(10_000).len();
        assert!(text.len() <= 64 + note_len, "{}", text.len());
        // Small but expanding: 40 invalid bytes would render as 120.
        let (text, truncated) = capture(64, &[&[0xFFu8; 40]]).render();
        assert!(truncated);
        assert!(text.len() <= 64 + note_len);
    }

    proptest! {
        #[test]
        fn rendering_is_bounded_and_exact_when_it_fits(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            bytes_max in 0usize..400,
            text in "\\PC{0,50}",
        ) {
            let mut c = Capture::new(bytes_max);
            let mut total = 0u64;
            for chunk in &chunks {
                c.push(chunk);
                total += chunk.len() as u64;
            }
            let (out, truncated) = c.render();
            prop_assert_eq!(c.total_bytes(), total);
            prop_assert!(out.len() <= bytes_max + truncation_note(total).len());
            if !truncated {
                let all: Vec<u8> = chunks.concat();
                prop_assert_eq!(out, String::from_utf8_lossy(&all).into_owned());
            }
            // Valid UTF-8 that fits comes back unchanged.
            let (out, truncated) = capture(text.len(), &[text.as_bytes()]).render();
            prop_assert!(!truncated);
            prop_assert_eq!(out, text);
        }
    }
}
