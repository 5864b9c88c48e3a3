//! Sender authentication with mail-auth, offline: each test generates a
//! DKIM key, signs a message with mail-auth's signer, publishes the key and
//! the SPF/DMARC records in an in-memory zone, and runs the real DKIM, SPF
//! and DMARC checks against it. No packet leaves the process.

use std::net::{IpAddr, Ipv4Addr};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use tinyfat_channels::email::auth::{AuthOutcome, Authenticator, DnsRecords, SenderAuthenticator, SmtpEnvelope};

const MESSAGE: &str = "From: Ann Lee <ann@example.org>\r\n\
To: swiftpebble@agents.example.com\r\n\
Subject: Quarterly numbers\r\n\
Date: Wed, 01 Jul 2026 14:00:00 +0000\r\n\
Message-ID: <q3-1@example.org>\r\n\
\r\n\
Can you send the Q3 report?\r\n";

struct Key {
    signer_key: Vec<u8>,
    txt: String,
}

fn new_key() -> Key {
    let pkcs8 = Ed25519Key::generate_pkcs8().unwrap();
    let public = Ed25519Key::from_pkcs8_der(&pkcs8).unwrap().public_key();
    Key { txt: format!("v=DKIM1; k=ed25519; p={}", STANDARD.encode(public)), signer_key: pkcs8 }
}

/// `message` with a DKIM-Signature by `domain` prepended.
fn sign(key: &Key, domain: &str, message: &str) -> Vec<u8> {
    let signature = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(&key.signer_key).unwrap())
        .domain(domain)
        .selector("sel")
        .headers(["From", "To", "Subject", "Date", "Message-ID"])
        .sign(message.as_bytes())
        .unwrap();
    let mut out = signature.to_header().into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

fn authenticator(records: DnsRecords) -> Authenticator {
    Authenticator::offline(records).unwrap()
}

const SENDER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

fn envelope(ip: IpAddr, mail_from: &str) -> SmtpEnvelope<'_> {
    SmtpEnvelope { client_ip: ip, helo: "mail.example.org", mail_from, receiver_host: "mx.agents.example.com" }
}

#[tokio::test]
async fn aligned_dkim_passes() {
    let key = new_key();
    let zone = DnsRecords::zone();
    zone.add_txt("sel._domainkey.example.org", &key.txt).unwrap();
    zone.add_txt("_dmarc.example.org", "v=DMARC1; p=reject; rua=mailto:d@example.org").unwrap();
    let v = authenticator(zone).verify(&sign(&key, "example.org", MESSAGE), None).await;
    assert_eq!(v.outcome, AuthOutcome::Pass, "{v}");
    assert_eq!(v.from_domain, "example.org");
    assert!(v.reason.contains("dmarc=pass"), "{v}");
    assert!(v.admits(true));
}

#[tokio::test]
async fn aligned_dkim_passes_without_a_dmarc_record() {
    let key = new_key();
    let zone = DnsRecords::zone();
    zone.add_txt("sel._domainkey.example.org", &key.txt).unwrap();
    // Signed by the parent domain of a subdomain From: relaxed alignment.
    let message = MESSAGE.replace("ann@example.org", "ann@mail.example.org");
    let v = authenticator(zone).verify(&sign(&key, "example.org", &message), None).await;
    assert_eq!(v.outcome, AuthOutcome::Pass, "{v}");
    assert!(v.reason.contains("no DMARC record"), "{v}");
}

#[tokio::test]
async fn spoofed_from_signed_by_another_domain_fails_dmarc() {
    let key = new_key();
    let zone = DnsRecords::zone();
    zone.add_txt("sel._domainkey.evil.example", &key.txt).unwrap();
    zone.add_txt("_dmarc.example.org", "v=DMARC1; p=reject; rua=mailto:d@example.org").unwrap();
    zone.add_txt("example.org", "v=spf1 ip4:192.0.2.10 -all").unwrap();
    let raw = sign(&key, "evil.example", MESSAGE);
    let v = authenticator(zone).verify(&raw, None).await;
    assert_eq!(v.outcome, AuthOutcome::Fail, "{v}");
    assert!(v.reason.contains("dmarc=fail") && v.reason.contains("evil.example"), "{v}");
    assert!(!v.admits(true) && !v.admits(false));
}

#[tokio::test]
async fn tampered_body_fails() {
    let key = new_key();
    let zone = DnsRecords::zone();
    zone.add_txt("sel._domainkey.example.org", &key.txt).unwrap();
    let raw = String::from_utf8(sign(&key, "example.org", MESSAGE)).unwrap().replace("Q3 report", "bank password");
    let v = authenticator(zone).verify(raw.as_bytes(), None).await;
    assert_eq!(v.outcome, AuthOutcome::Fail, "{v}");
    assert!(v.reason.contains("dkim=fail"), "{v}");
}

#[tokio::test]
async fn no_dns_records_cannot_be_evaluated() {
    let key = new_key();
    // The signature names a key that is not published; no SPF, no DMARC.
    let v = authenticator(DnsRecords::zone()).verify(&sign(&key, "example.org", MESSAGE), None).await;
    assert_eq!(v.outcome, AuthOutcome::CannotEvaluate, "{v}");
    assert!(!v.admits(true), "refused while email.require_auth = true");
    assert!(v.admits(false), "admitted when email.require_auth = false");
    // Unsigned, nothing published: the same.
    let v = authenticator(DnsRecords::zone()).verify(MESSAGE.as_bytes(), None).await;
    assert_eq!(v.outcome, AuthOutcome::CannotEvaluate, "{v}");
}

#[tokio::test]
async fn dns_failure_is_temporary() {
    let key = new_key();
    let zone = DnsRecords::zone();
    zone.add_temporary_failure("sel._domainkey.example.org");
    let v = authenticator(zone).verify(&sign(&key, "example.org", MESSAGE), None).await;
    assert_eq!(v.outcome, AuthOutcome::TempError, "{v}");
}

#[tokio::test]
async fn spf_with_the_smtp_envelope() {
    let records = || {
        let zone = DnsRecords::zone();
        zone.add_txt("example.org", "v=spf1 ip4:192.0.2.10 -all").unwrap();
        zone.add_txt("_dmarc.example.org", "v=DMARC1; p=quarantine; rua=mailto:d@example.org").unwrap();
        zone
    };
    // Unsigned, but sent from a permitted host with an aligned MAIL FROM.
    let env = envelope(SENDER_IP, "ann@example.org");
    let v = authenticator(records()).authenticate(MESSAGE.as_bytes(), Some(&env)).await;
    assert_eq!(v.outcome, AuthOutcome::Pass, "{v}");
    assert!(v.reason.contains("SPF"), "{v}");
    // The same from a host the domain does not permit.
    let env = envelope(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), "ann@example.org");
    let v = authenticator(records()).authenticate(MESSAGE.as_bytes(), Some(&env)).await;
    assert_eq!(v.outcome, AuthOutcome::Fail, "{v}");
    // Permitted host, but the MAIL FROM domain is someone else's.
    let zone = records();
    zone.add_txt("bulk.example", "v=spf1 ip4:192.0.2.10 -all").unwrap();
    let env = envelope(SENDER_IP, "bounce@bulk.example");
    let v = authenticator(zone).authenticate(MESSAGE.as_bytes(), Some(&env)).await;
    assert_eq!(v.outcome, AuthOutcome::Fail, "{v}");
}
