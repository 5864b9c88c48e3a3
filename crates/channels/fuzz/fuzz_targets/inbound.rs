//! Feeds arbitrary bytes to the inbound email parser and everything built
//! on its result. The property: no input panics, and an accepted message
//! always yields a valid session id and safe attachment names.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tinyfat_channels::email::html::html_to_text;
use tinyfat_channels::email::inbound::{self, InboundLimits, split_reply, to_inbound_message};

fuzz_target!(|data: &[u8]| {
    if let Ok(email) = inbound::parse(data, &InboundLimits::default()) {
        assert!(email.session_id().as_str().starts_with("email-"));
        for attachment in &email.attachments {
            assert!(!attachment.filename.contains(['/', '\\']));
            assert!(!attachment.filename.starts_with('.'));
        }
        let _ = email.automated();
        let _ = email.is_stop();
        let _ = to_inbound_message(&email, chrono::DateTime::UNIX_EPOCH);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = html_to_text(text);
        let _ = split_reply(text);
    }
});
