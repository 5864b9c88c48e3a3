//! Outbound mail: a reply or a new message composed from the agent's
//! markdown, threaded and quoted, then rendered either as RFC 5322 bytes
//! (mail-builder, for SMTP) or as a Resend `POST /emails` request.
//!
//! Threading (RFC 5322 §3.6.4): `In-Reply-To` = the parent's Message-ID;
//! `References` = the parent's References + the parent's Message-ID; the
//! subject gets one `Re: `. The Message-ID is `<{delivery_id}@{domain}>`, so
//! a delivery resent after a crash carries the same id (SPEC §5), and the
//! Resend `Idempotency-Key` is `{agent_id}:{delivery_id}`.
//!
//! The markdown becomes the text part as written and an HTML part through
//! pulldown-cmark, with raw HTML escaped, links kept only for http(s) and
//! mailto, and images turned into links (no remote loads on open). Mail from
//! an agent carries `Auto-Submitted` (RFC 3834) so other systems' responders
//! do not answer it and loops stop on both sides.
//!
//! This module must not read files, the clock or the network: attachments
//! arrive as bytes the caller read, the date is passed in.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use mail_builder::MessageBuilder;
use mail_builder::headers::address::Address;
use mail_builder::headers::message_id::MessageId;
use mail_builder::headers::raw::Raw;
use pulldown_cmark::{CowStr, Event, Options, Parser, Tag, TagEnd};
use tinyfat_core::{AgentId, EmailAddress};

use super::inbound::{
    InboundEmail, REFERENCES_MAX, cap_references, clean_line, normalize_message_id, sanitize_filename,
};
use super::resend::{self, wire};

pub const RECIPIENTS_MAX: usize = 50;
/// Resend's limit is 40 MB after base64; SMTP servers commonly take 25 MB.
pub const ATTACHMENTS_BYTES_MAX: usize = 20 * 1024 * 1024;
pub const ATTACHMENTS_MAX: usize = 10;
/// Quoted parent text is cut here, marked with `[…]`.
pub const QUOTE_BYTES_MAX: usize = 64 * 1024;
pub const SUBJECT_CHARS_MAX: usize = 500;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ComposeError {
    #[error("no recipients")]
    NoRecipients,
    #[error("{0} recipients; the limit is {RECIPIENTS_MAX}")]
    TooManyRecipients(usize),
    #[error("{0} attachments; the limit is {ATTACHMENTS_MAX}")]
    TooManyAttachments(usize),
    #[error("attachments total {0} bytes; the limit is {ATTACHMENTS_BYTES_MAX}")]
    AttachmentsTooLarge(usize),
    #[error("delivery id {0:?} must be 1-100 letters, digits, '-' or '_'")]
    InvalidDeliveryId(String),
    #[error("invalid Message-ID domain {0:?}")]
    InvalidDomain(String),
}

/// A sender or recipient with an optional display name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub address: EmailAddress,
}

impl Mailbox {
    pub fn new(name: Option<&str>, address: EmailAddress) -> Self {
        let name = name.map(|n| clean_line(n, 100)).filter(|n| !n.is_empty());
        Self { name, address }
    }
}

/// `"Name" <a@b.c>` with the name quoted and escaped, or the bare address.
impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "\"{}\" <{}>", name.replace('\\', "\\\\").replace('"', "\\\""), self.address),
            None => write!(f, "{}", self.address),
        }
    }
}

/// The message being answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// Normal form (no brackets).
    pub message_id: String,
    pub references: Vec<String>,
    pub subject: String,
    /// What to quote; `None` threads without quoting (outbox files).
    pub quote: Option<Quote>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// Shown in the attribution line, e.g. `Ann Lee <ann@x.org>`.
    pub from: String,
    pub date: Option<DateTime<Utc>>,
    pub text: String,
}

impl Parent {
    /// Replying to an inbound email, quoting its whole text.
    pub fn from_inbound(email: &InboundEmail) -> Self {
        let from = match &email.from_name {
            Some(name) => format!("{name} <{}>", email.from),
            None => email.from.to_string(),
        };
        Self {
            message_id: email.message_id.clone(),
            references: email.references.clone(),
            subject: email.subject.clone(),
            quote: Some(Quote { from, date: email.date, text: email.text.clone() }),
        }
    }

    /// Threading only, from ids an outbox file names (`in_reply_to`,
    /// `references`); the subject is the file's.
    pub fn from_ids(in_reply_to: &str, references: &[String]) -> Option<Self> {
        Some(Self {
            message_id: normalize_message_id(in_reply_to)?,
            references: references.to_vec(),
            subject: String::new(),
            quote: None,
        })
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct OutboundAttachment {
    pub filename: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

impl OutboundAttachment {
    /// The name is sanitised; the type is guessed from the extension.
    pub fn new(filename: &str, bytes: Vec<u8>) -> Self {
        let filename = sanitize_filename(filename);
        let content_type = content_type_for(&filename).to_owned();
        Self { filename, content_type, bytes }
    }
}

impl fmt::Debug for OutboundAttachment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OutboundAttachment({:?}, {}, {} bytes)", self.filename, self.content_type, self.bytes.len())
    }
}

/// What the platform wants to send.
#[derive(Clone, Debug)]
pub struct Draft {
    pub from: Mailbox,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Option<EmailAddress>,
    /// `None` for a reply: `Re: ` + the parent's subject.
    pub subject: Option<String>,
    pub body_markdown: String,
    pub parent: Option<Parent>,
    pub attachments: Vec<OutboundAttachment>,
}

/// A composed message, ready to render for either transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundEmail {
    pub from: Mailbox,
    pub to: Vec<EmailAddress>,
    pub cc: Vec<EmailAddress>,
    /// In the SMTP envelope and Resend's `bcc`, never in the headers.
    pub bcc: Vec<EmailAddress>,
    pub reply_to: Option<EmailAddress>,
    pub subject: String,
    pub text: String,
    pub html: String,
    /// Normal form: `{delivery_id}@{domain}`.
    pub message_id: String,
    pub in_reply_to: Option<String>,
    pub references: Vec<String>,
    pub date: DateTime<Utc>,
    /// `auto-replied` for replies, `auto-generated` otherwise.
    pub auto_submitted: &'static str,
    pub attachments: Vec<OutboundAttachment>,
}

/// Composes a message for delivery `delivery_id` (a ULID) sent at `date`.
pub fn compose(
    draft: Draft,
    delivery_id: &str,
    domain: &str,
    date: DateTime<Utc>,
) -> Result<OutboundEmail, ComposeError> {
    let message_id = message_id_for(delivery_id, domain)?;
    let count = draft.to.len() + draft.cc.len() + draft.bcc.len();
    if draft.to.is_empty() && draft.cc.is_empty() && draft.bcc.is_empty() {
        return Err(ComposeError::NoRecipients);
    }
    if count > RECIPIENTS_MAX {
        return Err(ComposeError::TooManyRecipients(count));
    }
    if draft.attachments.len() > ATTACHMENTS_MAX {
        return Err(ComposeError::TooManyAttachments(draft.attachments.len()));
    }
    let attachment_bytes: usize = draft.attachments.iter().map(|a| a.bytes.len()).sum();
    if attachment_bytes > ATTACHMENTS_BYTES_MAX {
        return Err(ComposeError::AttachmentsTooLarge(attachment_bytes));
    }

    let subject = match (&draft.subject, &draft.parent) {
        (Some(s), _) => clean_line(s, SUBJECT_CHARS_MAX),
        (None, Some(parent)) => reply_subject(&parent.subject),
        (None, None) => String::new(),
    };
    let (in_reply_to, references) = match &draft.parent {
        Some(parent) => {
            let mut refs: Vec<String> = parent.references.iter().filter_map(|r| normalize_message_id(r)).collect();
            refs.retain(|r| r != &parent.message_id);
            refs.push(parent.message_id.clone());
            (Some(parent.message_id.clone()), cap_references(refs))
        }
        None => (None, Vec::new()),
    };
    debug_assert!(references.len() <= REFERENCES_MAX);

    let body = draft.body_markdown.replace("\r\n", "\n");
    let quote = draft.parent.as_ref().and_then(|p| p.quote.as_ref());
    let mut text = body.trim_end().to_owned();
    let mut html = markdown_to_html(&body);
    if let Some(quote) = quote {
        let attribution = attribution(quote);
        let quoted = cut(&quote.text.replace("\r\n", "\n"), QUOTE_BYTES_MAX);
        text.push_str("\n\n");
        text.push_str(&attribution);
        text.push('\n');
        for line in quoted.lines() {
            text.push_str(if line.starts_with('>') || line.is_empty() { ">" } else { "> " });
            text.push_str(line);
            text.push('\n');
        }
        html.push_str(&format!(
            "<div class=\"tinyfat_quote\"><p>{}</p><blockquote type=\"cite\" style=\"margin:0 0 0 .8ex;border-left:1px solid #ccc;padding-left:1ex\">{}</blockquote></div>",
            escape_html(&attribution),
            quoted.lines().map(escape_html).collect::<Vec<_>>().join("<br>\n")
        ));
    }
    let html = format!("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body>\n{html}</body></html>\n");

    Ok(OutboundEmail {
        from: draft.from,
        to: draft.to,
        cc: draft.cc,
        bcc: draft.bcc,
        reply_to: draft.reply_to,
        subject,
        text: format!("{}\n", text.trim_end()),
        html,
        message_id,
        in_reply_to,
        references,
        date,
        auto_submitted: if draft.parent.is_some() { "auto-replied" } else { "auto-generated" },
        attachments: draft.attachments,
    })
}

impl OutboundEmail {
    /// The RFC 5322 message for SMTP (CRLF line ends, no Bcc header).
    pub fn to_rfc5322(&self) -> Vec<u8> {
        let mailbox = |m: &EmailAddress| Address::new_address(None::<&str>, m.as_str().to_owned());
        let list = |v: &[EmailAddress]| Address::new_list(v.iter().map(mailbox).collect());
        let mut builder = MessageBuilder::new()
            .from(Address::new_address(self.from.name.clone(), self.from.address.as_str().to_owned()))
            .subject(self.subject.as_str())
            .message_id(self.message_id.as_str())
            .date(self.date.timestamp())
            .header("Auto-Submitted", Raw::new(self.auto_submitted))
            .text_body(self.text.as_str())
            .html_body(self.html.as_str());
        if !self.to.is_empty() {
            builder = builder.to(list(&self.to));
        }
        if !self.cc.is_empty() {
            builder = builder.cc(list(&self.cc));
        }
        if let Some(reply_to) = &self.reply_to {
            builder = builder.reply_to(mailbox(reply_to));
        }
        if let Some(irt) = &self.in_reply_to {
            builder = builder.in_reply_to(irt.as_str());
        }
        if !self.references.is_empty() {
            builder = builder.references(MessageId::new_list(self.references.iter().map(String::as_str)));
        }
        for a in &self.attachments {
            builder = builder.attachment(a.content_type.as_str(), a.filename.as_str(), a.bytes.as_slice());
        }
        builder.write_to_vec().expect("writing to a Vec cannot fail")
    }

    /// Every envelope recipient (`RCPT TO`): to, cc and bcc.
    pub fn smtp_recipients(&self) -> impl Iterator<Item = &EmailAddress> {
        self.to.iter().chain(&self.cc).chain(&self.bcc)
    }

    /// The Resend `POST /emails` body. Threading and `Auto-Submitted` travel
    /// in `headers`; Resend sets its own Message-ID.
    pub fn to_resend_request(&self) -> wire::SendEmailRequest {
        let mut headers = BTreeMap::new();
        if let Some(irt) = &self.in_reply_to {
            headers.insert("In-Reply-To".to_owned(), format!("<{irt}>"));
        }
        if !self.references.is_empty() {
            let refs: Vec<String> = self.references.iter().map(|r| format!("<{r}>")).collect();
            headers.insert("References".to_owned(), refs.join(" "));
        }
        headers.insert("Auto-Submitted".to_owned(), self.auto_submitted.to_owned());
        let strings = |v: &[EmailAddress]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        wire::SendEmailRequest {
            from: self.from.to_string(),
            to: strings(&self.to),
            subject: self.subject.clone(),
            cc: strings(&self.cc),
            bcc: strings(&self.bcc),
            reply_to: self.reply_to.iter().map(ToString::to_string).collect(),
            html: self.html.clone(),
            text: self.text.clone(),
            headers,
            attachments: self
                .attachments
                .iter()
                .map(|a| wire::SendAttachment {
                    filename: a.filename.clone(),
                    content: STANDARD.encode(&a.bytes),
                    content_type: Some(a.content_type.clone()),
                })
                .collect(),
        }
    }

    /// The request body as JSON bytes.
    pub fn resend_json(&self) -> Vec<u8> {
        resend::to_json(&self.to_resend_request())
    }
}

/// `{delivery_id}@{domain}` (normal form; write it as `<…>` in headers).
pub fn message_id_for(delivery_id: &str, domain: &str) -> Result<String, ComposeError> {
    let id_ok = !delivery_id.is_empty()
        && delivery_id.len() <= 100
        && delivery_id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !id_ok {
        return Err(ComposeError::InvalidDeliveryId(delivery_id.chars().take(100).collect()));
    }
    let domain = domain.trim().to_ascii_lowercase();
    if !tinyfat_core::email::is_domain(&domain) {
        return Err(ComposeError::InvalidDomain(domain.chars().take(100).collect()));
    }
    Ok(format!("{delivery_id}@{domain}"))
}

/// `Idempotency-Key: {agent_id}:{delivery_id}` for Resend (SPEC §5).
pub fn idempotency_key(agent: &AgentId, delivery_id: &str) -> String {
    let key = format!("{agent}:{delivery_id}");
    debug_assert!(key.len() <= resend::IDEMPOTENCY_KEY_BYTES_MAX);
    key
}

/// `Re: ` once: an existing `Re:` (any case, any spacing) is kept as is.
pub fn reply_subject(parent_subject: &str) -> String {
    let s = clean_line(parent_subject, SUBJECT_CHARS_MAX);
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("re:") || lower.starts_with("re :") {
        s
    } else if s.is_empty() {
        "Re:".to_owned()
    } else {
        format!("Re: {s}")
    }
}

/// `On Tue, 1 Jul 2026 at 14:00 UTC, Ann Lee <ann@x.org> wrote:`
pub fn attribution(quote: &Quote) -> String {
    let from = clean_line(&quote.from, 200);
    match quote.date {
        Some(date) => format!("On {}, {from} wrote:", date.format("%a, %-d %b %Y at %H:%M UTC")),
        None => format!("{from} wrote:"),
    }
}

/// Markdown → an HTML fragment, safe to send: raw HTML is escaped, only
/// http(s) and mailto links survive, images become links.
pub fn markdown_to_html(markdown: &str) -> String {
    let options = Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS;
    // For each open link: whether its start tag was kept.
    let mut links: Vec<bool> = Vec::new();
    let events = Parser::new_ext(markdown, options).filter_map(|event| match event {
        Event::Html(raw) | Event::InlineHtml(raw) => Some(Event::Text(raw)),
        Event::Start(Tag::Link { link_type, dest_url, title, id }) => {
            let keep = is_safe_url(&dest_url);
            links.push(keep);
            keep.then_some(Event::Start(Tag::Link { link_type, dest_url, title, id }))
        }
        Event::End(TagEnd::Link) => links.pop().unwrap_or(false).then_some(Event::End(TagEnd::Link)),
        Event::Start(Tag::Image { dest_url, .. }) => {
            let keep = is_safe_url(&dest_url);
            links.push(keep);
            Some(if keep {
                Event::Start(Tag::Link {
                    link_type: pulldown_cmark::LinkType::Inline,
                    dest_url,
                    title: CowStr::Borrowed(""),
                    id: CowStr::Borrowed(""),
                })
            } else {
                Event::Text(CowStr::Borrowed(""))
            })
        }
        Event::End(TagEnd::Image) => links.pop().unwrap_or(false).then_some(Event::End(TagEnd::Link)),
        other => Some(other),
    });
    let mut out = String::with_capacity(markdown.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut out, events);
    out
}

fn is_safe_url(url: &str) -> bool {
    let lower = url.trim().to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://") || lower.starts_with("mailto:")
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn cut(s: &str, bytes_max: usize) -> String {
    if s.len() <= bytes_max {
        return s.trim_end().to_owned();
    }
    let mut end = bytes_max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n[…]", s[..end].trim_end())
}

/// A MIME type from a file name's extension.
pub fn content_type_for(filename: &str) -> &'static str {
    let ext = filename.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "txt" | "log" => "text/plain",
        "md" => "text/markdown",
        "csv" => "text/csv",
        "html" | "htm" => "text/html",
        "json" => "application/json",
        "xml" => "application/xml",
        "ics" => "text/calendar",
        "eml" => "message/rfc822",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "svg" => "image/svg+xml",
        "zip" => "application/zip",
        "gz" => "application/gzip",
        "tar" => "application/x-tar",
        "doc" => "application/msword",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xls" => "application/vnd.ms-excel",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        "pptx" => "application/vnd.openxmlformats-officedocument.presentationml.presentation",
        "odt" => "application/vnd.oasis.opendocument.text",
        "mp3" => "audio/mpeg",
        "mp4" => "video/mp4",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> EmailAddress {
        EmailAddress::parse(s).unwrap()
    }

    fn at() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-07-01T14:00:00Z").unwrap().to_utc()
    }

    fn reply_draft() -> Draft {
        Draft {
            from: Mailbox::new(Some("Swift Pebble"), addr("swiftpebble@agents.example.com")),
            to: vec![addr("ann@example.org")],
            cc: vec![],
            bcc: vec![addr("audit@example.org")],
            reply_to: None,
            subject: None,
            body_markdown: "Here are the **numbers**.\n\n- Q3: 12\n- Q4: 15\n".into(),
            parent: Some(Parent {
                message_id: "m2@example.org".into(),
                references: vec!["m0@example.org".into(), "m1@agents.example.com".into()],
                subject: "Re: Quarterly numbers".into(),
                quote: Some(Quote {
                    from: "Ann Lee <ann@example.org>".into(),
                    date: Some(at()),
                    text: "Can you send them?\n\n> earlier\n".into(),
                }),
            }),
            attachments: vec![OutboundAttachment::new("../q3 report.pdf", b"%PDF-1.7 fake".to_vec())],
        }
    }

    #[test]
    fn reply_threading_and_quoting() {
        let email = compose(reply_draft(), "01J2ABCDEF0000000000000000", "Agents.Example.com", at()).unwrap();
        assert_eq!(email.message_id, "01J2ABCDEF0000000000000000@agents.example.com");
        assert_eq!(email.in_reply_to.as_deref(), Some("m2@example.org"));
        assert_eq!(email.references, ["m0@example.org", "m1@agents.example.com", "m2@example.org"]);
        assert_eq!(email.subject, "Re: Quarterly numbers");
        assert_eq!(
            email.text,
            "Here are the **numbers**.\n\n- Q3: 12\n- Q4: 15\n\nOn Wed, 1 Jul 2026 at 14:00 UTC, Ann Lee <ann@example.org> wrote:\n> Can you send them?\n>\n>> earlier\n"
        );
        assert!(email.html.contains("<strong>numbers</strong>"));
        assert!(email.html.contains("<blockquote type=\"cite\""));
        assert!(email.html.contains("Ann Lee &lt;ann@example.org&gt; wrote:"));
        assert_eq!(email.attachments[0].filename, "q3 report.pdf");
        assert_eq!(email.attachments[0].content_type, "application/pdf");
        assert_eq!(email.auto_submitted, "auto-replied");
    }

    #[test]
    fn rfc5322_round_trips_through_the_parser() {
        let email = compose(reply_draft(), "01J2ABCDEF0000000000000000", "agents.example.com", at()).unwrap();
        let raw = email.to_rfc5322();
        let text = String::from_utf8_lossy(&raw);
        assert!(text.contains("Message-ID: <01J2ABCDEF0000000000000000@agents.example.com>\r\n"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("bcc:"), "{text}");
        let parsed = super::super::inbound::parse(&raw, &Default::default()).unwrap();
        assert_eq!(parsed.from.as_str(), "swiftpebble@agents.example.com");
        assert_eq!(parsed.from_name.as_deref(), Some("Swift Pebble"));
        assert_eq!(parsed.message_id, "01J2ABCDEF0000000000000000@agents.example.com");
        assert_eq!(parsed.in_reply_to.as_deref(), Some("m2@example.org"));
        assert_eq!(parsed.references, ["m0@example.org", "m1@agents.example.com", "m2@example.org"]);
        assert_eq!(parsed.subject, "Re: Quarterly numbers");
        assert_eq!(parsed.date, Some(at()));
        assert_eq!(parsed.auto_submitted.as_deref(), Some("auto-replied"));
        assert_eq!(parsed.attachments.len(), 1);
        assert_eq!(parsed.attachments[0].bytes, b"%PDF-1.7 fake");
        assert!(parsed.reply.new_text.starts_with("Here are the **numbers**."));
        assert!(parsed.reply.quoted.as_deref().unwrap().contains("> Can you send them?"));
        // The reply continues the thread of the root.
        assert_eq!(parsed.session_id(), super::super::inbound::session_id_for_root("<m0@example.org>"));
        assert_eq!(email.smtp_recipients().count(), 2);
    }

    #[test]
    fn resend_request() {
        let email = compose(reply_draft(), "01J2ABCDEF0000000000000000", "agents.example.com", at()).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&email.resend_json()).unwrap();
        assert_eq!(json["from"], "\"Swift Pebble\" <swiftpebble@agents.example.com>");
        assert_eq!(json["to"], serde_json::json!(["ann@example.org"]));
        assert_eq!(json["bcc"], serde_json::json!(["audit@example.org"]));
        assert!(json.get("cc").is_none());
        assert_eq!(json["subject"], "Re: Quarterly numbers");
        assert_eq!(json["headers"]["In-Reply-To"], "<m2@example.org>");
        assert_eq!(json["headers"]["References"], "<m0@example.org> <m1@agents.example.com> <m2@example.org>");
        assert_eq!(json["attachments"][0]["filename"], "q3 report.pdf");
        assert_eq!(json["attachments"][0]["content"], STANDARD.encode(b"%PDF-1.7 fake"));
        let agent = AgentId::parse("ag_01j2abcdef0000000000000000").unwrap();
        assert_eq!(idempotency_key(&agent, "01J2X"), "ag_01j2abcdef0000000000000000:01J2X");
    }

    #[test]
    fn new_message_without_parent() {
        let draft = Draft {
            subject: Some("Weekly\r\nBcc: evil@x.org summary".into()),
            parent: None,
            attachments: vec![],
            bcc: vec![],
            ..reply_draft()
        };
        let email = compose(draft, "d1", "agents.example.com", at()).unwrap();
        assert_eq!(email.subject, "Weekly Bcc: evil@x.org summary");
        assert_eq!(email.in_reply_to, None);
        assert!(email.references.is_empty());
        assert_eq!(email.auto_submitted, "auto-generated");
        assert_eq!(email.text, "Here are the **numbers**.\n\n- Q3: 12\n- Q4: 15\n");
        // Threading-only parent from an outbox file: references not doubled.
        let refs = vec!["a@h".to_owned(), "id@h".to_owned()];
        let parent = Parent::from_ids("<id@h>", &refs).unwrap();
        let draft = Draft { subject: Some("Hello".into()), parent: Some(parent), ..reply_draft() };
        let email = compose(draft, "d2", "agents.example.com", at()).unwrap();
        assert_eq!(email.references, ["a@h", "id@h"]);
        assert_eq!(email.subject, "Hello");
        assert!(!email.text.contains("wrote:"));
    }

    #[test]
    fn refusals() {
        let none = Draft { to: vec![], cc: vec![], bcc: vec![], ..reply_draft() };
        assert_eq!(compose(none, "d", "x.org", at()).unwrap_err(), ComposeError::NoRecipients);
        let many = Draft { to: (0..51).map(|i| addr(&format!("u{i}@x.org"))).collect(), bcc: vec![], ..reply_draft() };
        assert_eq!(compose(many, "d", "x.org", at()).unwrap_err(), ComposeError::TooManyRecipients(51));
        assert!(matches!(compose(reply_draft(), "a b", "x.org", at()), Err(ComposeError::InvalidDeliveryId(_))));
        assert!(matches!(compose(reply_draft(), "d", "localhost", at()), Err(ComposeError::InvalidDomain(_))));
        let big = Draft {
            attachments: vec![OutboundAttachment::new("big.bin", vec![0; ATTACHMENTS_BYTES_MAX + 1])],
            ..reply_draft()
        };
        assert!(matches!(compose(big, "d", "x.org", at()), Err(ComposeError::AttachmentsTooLarge(_))));
    }

    #[test]
    fn subjects() {
        for (parent, want) in [
            ("Hello", "Re: Hello"),
            ("Re: Hello", "Re: Hello"),
            ("RE: Hello", "RE: Hello"),
            ("re : Hello", "re : Hello"),
            ("", "Re:"),
            ("Fwd: x", "Re: Fwd: x"),
        ] {
            assert_eq!(reply_subject(parent), want, "{parent:?}");
        }
    }

    #[test]
    fn markdown_is_made_safe() {
        let html = markdown_to_html(
            "<script>alert(1)</script>\n\n[ok](https://x.org) [bad](javascript:alert(1)) ![pixel](https://evil.example/p.png?secret=1)",
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;"), "{html}");
        assert!(html.contains("<a href=\"https://x.org\">ok</a>"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(html.contains("<a href=\"https://evil.example/p.png?secret=1\">pixel</a>"), "{html}");
    }
}
