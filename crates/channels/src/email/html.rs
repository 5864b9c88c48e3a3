//! HTML to readable plain text, for mail that has no text/plain part
//! (newsletters, some mobile clients). It keeps what a reader sees: text in
//! document order, paragraph and line breaks, list bullets, links as
//! `text (url)`, image alt text, and `<blockquote>` as `> `-prefixed lines
//! so quoted replies can be split off like in plain-text mail.
//!
//! It drops everything a reader does not see: `<script>`, `<style>`,
//! `<head>`, comments, and non-http(s)/mailto link targets. It is a small
//! tolerant tokenizer, not an HTML5 parser: malformed markup degrades to
//! text and never panics. It runs in time linear in the input, and the
//! output is capped at `TEXT_BYTES_MAX`.

/// Output cap; the input is already capped by the caller's message size.
pub const TEXT_BYTES_MAX: usize = 1024 * 1024;
/// Longest URL kept after a link's text.
const URL_BYTES_MAX: usize = 2048;

/// Converts an HTML document or fragment to plain text.
pub fn html_to_text(html: &str) -> String {
    let mut w = Writer::default();
    let mut skip_until: Option<&'static str> = None;
    let mut links: Vec<Option<String>> = Vec::new();
    let mut rest = html;
    while !rest.is_empty() && w.out.len() < TEXT_BYTES_MAX {
        let Some(lt) = rest.find('<') else {
            if skip_until.is_none() {
                w.text(&decode_entities(rest));
            }
            break;
        };
        if lt > 0 {
            if skip_until.is_none() {
                w.text(&decode_entities(&rest[..lt]));
            }
            rest = &rest[lt..];
            continue;
        }
        // `rest` starts with '<'.
        if let Some(after) = rest.strip_prefix("<!--") {
            rest = after.find("-->").map_or("", |end| &after[end + 3..]);
            continue;
        }
        let Some(tag) = Tag::parse(rest) else {
            // A lone '<' that starts no tag is text.
            if skip_until.is_none() {
                w.text("<");
            }
            rest = &rest[1..];
            continue;
        };
        rest = &rest[tag.len..];
        if let Some(until) = skip_until {
            if tag.closing && tag.name == until {
                skip_until = None;
            }
            continue;
        }
        match (tag.name.as_str(), tag.closing) {
            ("script" | "style" | "head" | "title" | "template" | "noscript", false) if !tag.self_closing => {
                skip_until = Some(match tag.name.as_str() {
                    "script" => "script",
                    "style" => "style",
                    "head" => "head",
                    "title" => "title",
                    "template" => "template",
                    _ => "noscript",
                });
            }
            ("br", _) => w.newline(),
            ("p" | "h1" | "h2" | "h3" | "h4" | "h5" | "h6" | "table" | "ul" | "ol" | "pre" | "hr", _) => {
                w.paragraph();
                if tag.name == "pre" {
                    w.pre = !tag.closing;
                }
                if tag.name == "hr" {
                    w.text("---");
                    w.paragraph();
                }
            }
            ("div" | "tr" | "section" | "article" | "header" | "footer" | "dt" | "dd" | "center" | "address", _) => {
                w.newline()
            }
            ("li", false) => {
                w.newline();
                w.text("- ");
            }
            ("li", true) => w.newline(),
            ("td" | "th", false) => w.space(),
            ("blockquote", false) => {
                // The break before the quote belongs to the outer level.
                w.paragraph();
                w.flush_break();
                w.quote_depth += 1;
            }
            ("blockquote", true) => {
                w.paragraph();
                w.quote_depth = w.quote_depth.saturating_sub(1);
            }
            ("a", false) => links.push(tag.attr("href").and_then(readable_url)),
            ("a", true) => {
                if let Some(Some(url)) = links.pop() {
                    let shown = w.current_link_text_is(&url);
                    if !shown {
                        w.text(&format!(" ({url})"));
                    }
                }
            }
            ("img", _) => {
                if let Some(alt) = tag.attr("alt").map(|a| decode_entities(&a)) {
                    let alt = alt.trim();
                    if !alt.is_empty() {
                        w.text(&format!("[{alt}]"));
                    }
                }
            }
            _ => {}
        }
    }
    w.finish()
}

/// Keeps http(s) and mailto targets; drops scripts, data: URIs, anchors.
fn readable_url(href: String) -> Option<String> {
    let href = decode_entities(href.trim());
    let lower = href.to_ascii_lowercase();
    let ok = lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:");
    (ok && href.len() <= URL_BYTES_MAX && !href.chars().any(char::is_whitespace)).then_some(href)
}

struct Tag {
    name: String,
    closing: bool,
    self_closing: bool,
    attrs: String,
    /// Bytes consumed from the input, including `<` and `>`.
    len: usize,
}

impl Tag {
    /// Parses a tag at the start of `s` (which starts with `<`). `None` when
    /// `<` starts no tag (e.g. `a < b`); `<!DOCTYPE>` and `<?…>` parse as
    /// tags with names that match nothing.
    fn parse(s: &str) -> Option<Tag> {
        let bytes = s.as_bytes();
        let mut i = 1;
        let closing = bytes.get(i) == Some(&b'/');
        if closing {
            i += 1;
        }
        let first = *bytes.get(i)?;
        if !(first.is_ascii_alphabetic() || first == b'!' || first == b'?') {
            return None;
        }
        let name_start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'!' | b'?' | b'-' | b':')) {
            i += 1;
        }
        let name = s[name_start..i].to_ascii_lowercase();
        // Find the closing '>' outside quoted attribute values.
        let attrs_start = i;
        let mut quote: Option<u8> = None;
        while i < bytes.len() {
            let b = bytes[i];
            match quote {
                Some(q) if b == q => quote = None,
                Some(_) => {}
                None if b == b'"' || b == b'\'' => quote = Some(b),
                None if b == b'>' => break,
                None => {}
            }
            i += 1;
        }
        let attrs_end = i.min(bytes.len());
        let attrs = s[attrs_start..attrs_end].to_owned();
        let self_closing = attrs.trim_end().ends_with('/');
        Some(Tag { name, closing, self_closing, attrs, len: (i + 1).min(s.len()) })
    }

    /// The value of an attribute (quoted or not), not yet entity-decoded.
    fn attr(&self, want: &str) -> Option<String> {
        let s = self.attrs.as_str();
        let bytes = s.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b'/') {
                i += 1;
            }
            let name_start = i;
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() && bytes[i] != b'=' && bytes[i] != b'/' {
                i += 1;
            }
            let name = &s[name_start..i];
            while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let mut value = None;
            if bytes.get(i) == Some(&b'=') {
                i += 1;
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                match bytes.get(i) {
                    Some(&q @ (b'"' | b'\'')) => {
                        let start = i + 1;
                        let end = s[start..].find(q as char).map_or(s.len(), |e| start + e);
                        value = Some(&s[start..end]);
                        i = (end + 1).min(s.len());
                    }
                    Some(_) => {
                        let start = i;
                        while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                            i += 1;
                        }
                        value = Some(&s[start..i]);
                    }
                    None => {}
                }
            }
            if name.eq_ignore_ascii_case(want) {
                return value.map(str::to_owned);
            }
            if name.is_empty() && value.is_none() {
                i += 1;
            }
        }
        None
    }
}

/// Builds the text: collapses whitespace, keeps at most one blank line, and
/// prefixes lines inside blockquotes.
#[derive(Default)]
struct Writer {
    out: String,
    /// Pending break before the next text: 0 none, 1 newline, 2 blank line.
    pending_break: u8,
    pending_space: bool,
    quote_depth: usize,
    pre: bool,
    /// Line breaks written since the last text.
    breaks_written: u8,
}

impl Writer {
    fn text(&mut self, text: &str) {
        if self.pre {
            for (i, line) in text.split('\n').enumerate() {
                if i > 0 {
                    self.newline();
                }
                if !line.is_empty() {
                    self.put(line.trim_end_matches('\r'));
                }
            }
            return;
        }
        // A non-breaking space joins words; every other whitespace run is
        // one space.
        let is_space = |c: char| c.is_whitespace() && c != '\u{a0}';
        if text.starts_with(is_space) {
            self.pending_space = true;
        }
        for (i, word) in text.split(is_space).filter(|w| !w.is_empty()).enumerate() {
            if i > 0 {
                self.pending_space = true;
            }
            self.put(&word.replace('\u{a0}', " "));
        }
        if text.ends_with(is_space) {
            self.pending_space = true;
        }
    }

    /// Writes a pending line or paragraph break now.
    fn flush_break(&mut self) {
        if self.pending_break > 0 && !self.out.is_empty() {
            for _ in self.breaks_written..self.pending_break {
                self.newline_raw();
            }
            self.pending_space = false;
        }
        self.pending_break = 0;
    }

    fn put(&mut self, s: &str) {
        let at_line_start = self.out.is_empty() || self.out.ends_with('\n');
        if self.pending_break > 0 {
            self.flush_break();
        } else if self.pending_space && !at_line_start {
            self.out.push(' ');
        }
        self.pending_space = false;
        if self.out.is_empty() || self.out.ends_with('\n') {
            for _ in 0..self.quote_depth {
                self.out.push_str("> ");
            }
        }
        self.out.push_str(s);
        self.breaks_written = 0;
    }

    fn newline_raw(&mut self) {
        if self.quote_depth > 0 && self.out.ends_with('\n') {
            for _ in 0..self.quote_depth {
                self.out.push('>');
            }
        }
        self.out.push('\n');
        self.breaks_written = self.breaks_written.saturating_add(1);
    }

    fn newline(&mut self) {
        if self.pre {
            self.out.push('\n');
            self.breaks_written = self.breaks_written.saturating_add(1);
            return;
        }
        self.pending_break = self.pending_break.max(1);
    }

    fn paragraph(&mut self) {
        self.pending_break = 2;
    }

    fn space(&mut self) {
        self.pending_space = true;
    }

    /// True when the link's own text already shows the URL (so `(url)`
    /// would only repeat it).
    fn current_link_text_is(&self, url: &str) -> bool {
        let shown = self.out.trim_end();
        let bare = url.strip_prefix("mailto:").unwrap_or(url);
        shown.ends_with(url) || shown.ends_with(bare)
    }

    fn finish(self) -> String {
        let mut out = String::with_capacity(self.out.len());
        let mut blank_run = 0;
        for line in self.out.lines() {
            let line = line.trim_end();
            if line.trim_start_matches(['>', ' ']).is_empty() && !line.starts_with('>') {
                blank_run += 1;
                if blank_run > 1 || out.is_empty() {
                    continue;
                }
            } else {
                blank_run = 0;
            }
            out.push_str(line);
            out.push('\n');
        }
        let mut out = out.trim_end().to_owned();
        if out.len() > TEXT_BYTES_MAX {
            let mut cut = TEXT_BYTES_MAX;
            while !out.is_char_boundary(cut) {
                cut -= 1;
            }
            out.truncate(cut);
        }
        out
    }
}

/// Decodes character references: the common named ones and all numeric
/// ones. Unknown names stay as written.
pub fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let end = rest[1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '#')).map(|e| e + 1);
        let (name, consumed) = match end {
            Some(e) if rest[e..].starts_with(';') => (&rest[1..e], e + 1),
            Some(e) => (&rest[1..e], e),
            None => (&rest[1..], rest.len()),
        };
        match decode_entity(name) {
            Some(c) if !name.is_empty() => {
                out.push(c);
                rest = &rest[consumed..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode_entity(name: &str) -> Option<char> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix(['x', 'X']) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return match char::from_u32(code) {
            Some('\0') | None => Some('\u{fffd}'),
            Some(c) => Some(c),
        };
    }
    Some(match name {
        "amp" | "AMP" => '&',
        "lt" | "LT" => '<',
        "gt" | "GT" => '>',
        "quot" | "QUOT" => '"',
        "apos" => '\'',
        "nbsp" => '\u{a0}',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "hellip" => '…',
        "mdash" => '—',
        "ndash" => '–',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "bull" => '•',
        "middot" => '·',
        "euro" => '€',
        "pound" => '£',
        "yen" => '¥',
        "cent" => '¢',
        "sect" => '§',
        "deg" => '°',
        "times" => '×',
        "auml" => 'ä',
        "ouml" => 'ö',
        "uuml" => 'ü',
        "Auml" => 'Ä',
        "Ouml" => 'Ö',
        "Uuml" => 'Ü',
        "szlig" => 'ß',
        "eacute" => 'é',
        "egrave" => 'è',
        "aacute" => 'á',
        "agrave" => 'à',
        "ccedil" => 'ç',
        "ntilde" => 'ñ',
        "zwnj" => '\u{200c}',
        "zwj" => '\u{200d}',
        "shy" => '\u{ad}',
        "ensp" | "emsp" | "thinsp" => ' ',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        let cases: &[(&str, &str)] = &[
            ("<p>Hello <b>world</b></p><p>Second</p>", "Hello world\n\nSecond"),
            ("a<br>b<br/>c", "a\nb\nc"),
            ("<script>alert(1)</script><style>p{}</style>visible", "visible"),
            ("<head><title>T</title><style>x</style></head><body>Body</body>", "Body"),
            ("<a href=\"https://x.org/a?b=1&amp;c=2\">the docs</a>", "the docs (https://x.org/a?b=1&c=2)"),
            ("<a href='https://x.org'>https://x.org</a>", "https://x.org"),
            ("<a href=\"javascript:alert(1)\">click</a>", "click"),
            ("<a href=\"mailto:a@b.org\">a@b.org</a>", "a@b.org"),
            ("<ul><li>one</li><li>two</li></ul>", "- one\n- two"),
            ("  lots   of\n\n  space\t here ", "lots of space here"),
            ("&lt;tag&gt; &amp;&amp; &#233;&#x20AC; &unknown; & alone", "<tag> && é€ &unknown; & alone"),
            ("<!-- hidden --><div>shown</div>", "shown"),
            (
                "<p>Hi</p><blockquote><p>quoted line</p><p>more</p></blockquote><p>after</p>",
                "Hi\n\n> quoted line\n>\n> more\n\nafter",
            ),
            ("<img src=x alt=\"Logo\"> text", "[Logo] text"),
            ("a < b and c > d", "a < b and c > d"),
            ("<pre>line 1\n  indented</pre>", "line 1\n  indented"),
            ("<table><tr><td>a</td><td>b</td></tr><tr><td>c</td></tr></table>", "a b\nc"),
            ("<p unclosed attr=\"x>text", ""),
            ("x&nbsp;y", "x y"),
        ];
        for (html, want) in cases {
            assert_eq!(html_to_text(html), *want, "{html:?}");
        }
    }

    #[test]
    fn hostile_markup_never_panics() {
        for s in [
            "<",
            "<<<>>>",
            "</",
            "<a",
            "<a href=",
            "<a href='",
            "&",
            "&#",
            "&#x",
            "&#xFFFFFFFF;",
            "&#0;",
            "<é>",
            "<!--",
            "<script>never closed",
        ] {
            let _ = html_to_text(s);
        }
        assert_eq!(decode_entities("&#xFFFFFFFF;"), "\u{fffd}");
    }
}
