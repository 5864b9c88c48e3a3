//! The built-in SMTP listener (SPEC §8) for people who point their MX at
//! the platform: EHLO/HELO, STARTTLS, MAIL (with `SIZE=`), RCPT, DATA,
//! RSET, NOOP, QUIT. Commands are parsed by smtp-proto; DATA is
//! dot-unstuffed by its `DataReceiver` and capped at
//! `gateway.email_body_bytes_max` while it is read (552, nothing kept).
//!
//! A recipient is accepted only if it is a known agent's address (else
//! `550 5.1.1`); `start@{email.domain}` is accepted when self-provisioning
//! is on (`provisioning.allow` not empty) and becomes a start request
//! (`provision::enqueue_start`, dedup `smtp:start:{Message-ID or SHA-256}`),
//! whose job checks the sender like any mail. After DATA, one `email` job per agent recipient is enqueued
//! through `email::enqueue_raw_email` (dedup `smtp:{agent_id}:{Message-ID}`,
//! or the SHA-256 of the message), and `250` is answered only after every
//! one of them is committed; a store error answers `451 4.3.0` so the
//! sender retries, and a retry enqueues nothing twice.
//!
//! Bounds: `email.smtp_connections_max` sessions at once (more get 421),
//! `email.smtp_recipients_max` per message (452), `smtp_command_timeout_s`
//! per command or block of DATA (421), 4 KiB per command line, 20 bad
//! commands per connection; so memory is at most connections × the size cap.
//! On shutdown, sessions waiting for a command get 421 and the rest have
//! 10 s to finish.
//!
//! Must not: judge the message (only its Message-ID is read here; the job
//! checks loops, allowed senders and DKIM/SPF/DMARC under the lease, with
//! the envelope kept here), or acknowledge anything not yet durable.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use smtp_proto::request::receiver::DataReceiver;
use smtp_proto::{Error as ProtoError, Request};
use tinyfat_channels::email::smtp_in::{self, Extensions};
use tinyfat_core::EmailAddress;
use tinyfat_store::Agent;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::JobEnvelope;
use crate::config::Settings;
use crate::state::AppState;

/// Longest command line read (smtp-proto's own limit).
const LINE_BYTES_MAX: usize = smtp_proto::request::receiver::MAX_LINE_LENGTH;
/// Bad commands tolerated on one connection before it is closed.
const ERRORS_MAX: u32 = 20;
/// How long running sessions may take to finish after shutdown is asked.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A bound listener, ready to serve (`bind` fails startup on a bad address
/// or unreadable certificate, before any mail could be lost to it).
pub struct SmtpListener {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for SmtpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpListener").field("local", &self.listener.local_addr().ok()).finish()
    }
}

/// Binds `email.smtp_listen` and loads the STARTTLS certificate; `None`
/// when the listener is off.
pub async fn bind(settings: &Settings) -> anyhow::Result<Option<SmtpListener>> {
    let email = &settings.email;
    let listen = email.smtp_listen.trim();
    if listen.is_empty() {
        return Ok(None);
    }
    let tls = match (&email.smtp_tls_cert, &email.smtp_tls_key) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
        _ => None,
    };
    let addr: SocketAddr =
        listen.parse().map_err(|e| anyhow::anyhow!("email.smtp_listen {listen:?} is not a socket address: {e}"))?;
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("the SMTP listener cannot listen on {addr}: {e} (port 25 needs root or CAP_NET_BIND_SERVICE)")
    })?;
    Ok(Some(SmtpListener { listener, tls }))
}

fn tls_acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("email.smtp_tls_cert {}: cannot read a PEM certificate: {e}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("email.smtp_tls_cert {}: no certificate in the file", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("email.smtp_tls_key {}: cannot read a PEM private key: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| anyhow::anyhow!("email.smtp_tls_cert/smtp_tls_key do not make a TLS identity: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

impl SmtpListener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn starttls(&self) -> bool {
        self.tls.is_some()
    }

    /// One line for the log and `/readyz`.
    pub fn describe(&self) -> String {
        let addr = self.local_addr().map(|a| a.to_string()).unwrap_or_default();
        format!("listening on {addr}, STARTTLS {}", if self.starttls() { "on" } else { "off" })
    }

    /// Accepts connections until `shutdown`, then gives running sessions a
    /// short grace to finish.
    pub async fn run(self, state: AppState, mut shutdown: watch::Receiver<bool>) {
        let settings = &state.platform.settings;
        let slots = Arc::new(Semaphore::new(settings.email.smtp_connections_max as usize));
        let config = Arc::new(SessionConfig::from_settings(settings, self.tls));
        let mut sessions = tokio::task::JoinSet::new();
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.changed() => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "SMTP accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            while sessions.try_join_next().is_some() {}
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(peer = %peer, "SMTP connection refused: email.smtp_connections_max reached");
                let mut stream = stream;
                let _ = stream.write_all(b"421 4.3.2 Too many connections, try again later\r\n").await;
                continue;
            };
            let (state, config, shutdown) = (state.clone(), config.clone(), shutdown.clone());
            sessions.spawn(async move {
                serve_connection(stream, peer, &state, &config, shutdown).await;
                drop(slot);
            });
        }
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async { while sessions.join_next().await.is_some() {} }).await;
        sessions.abort_all();
        tracing::info!("SMTP listener stopped");
    }
}

struct SessionConfig {
    domain: String,
    size_max: u64,
    recipients_max: usize,
    timeout: Duration,
    tls: Option<TlsAcceptor>,
}

impl SessionConfig {
    fn from_settings(settings: &Settings, tls: Option<TlsAcceptor>) -> Self {
        Self {
            domain: settings.email.domain.clone(),
            size_max: settings.gateway.email_body_bytes_max,
            recipients_max: settings.email.smtp_recipients_max as usize,
            timeout: Duration::from_secs(settings.email.smtp_command_timeout_s),
            tls,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: &AppState,
    config: &SessionConfig,
    shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let mut session = Session::new(peer, config, state, shutdown);
    let mut plain = BufReader::new(stream);
    let greeting = format!("220 {} ESMTP tinyfat\r\n", config.domain);
    if plain.get_mut().write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    match session.run(&mut plain).await {
        End::Closed => {}
        End::StartTls => {
            let Some(acceptor) = config.tls.clone() else { return };
            match tokio::time::timeout(config.timeout, acceptor.accept(plain.into_inner())).await {
                Ok(Ok(tls)) => {
                    session.reset_after_tls();
                    let mut tls = BufReader::new(tls);
                    session.run(&mut tls).await;
                }
                Ok(Err(e)) => tracing::debug!(peer = %peer, error = %e, "SMTP STARTTLS handshake failed"),
                Err(_) => tracing::debug!(peer = %peer, "SMTP STARTTLS handshake timed out"),
            }
        }
    }
}

/// How a session's command loop ended.
enum End {
    Closed,
    /// `220` was sent to STARTTLS: the caller wraps the stream and resumes.
    StartTls,
}

/// What a read of one command line gave.
enum Line {
    Command(Vec<u8>),
    TooLong,
    /// The peer closed, timed out, or the server is shutting down (the
    /// reply, if any, was sent).
    Gone,
}

struct Session<'a> {
    peer: SocketAddr,
    config: &'a SessionConfig,
    state: &'a AppState,
    shutdown: watch::Receiver<bool>,
    tls_active: bool,
    helo: Option<String>,
    mail_from: Option<String>,
    /// Agent recipients, each agent once, with the address it was named by.
    recipients: Vec<(Agent, EmailAddress)>,
    /// `start@` was a recipient (self-provisioning on).
    start_requested: bool,
    rcpt_count: usize,
    errors: u32,
}

impl<'a> Session<'a> {
    fn new(peer: SocketAddr, config: &'a SessionConfig, state: &'a AppState, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            peer,
            config,
            state,
            shutdown,
            tls_active: false,
            helo: None,
            mail_from: None,
            recipients: Vec::new(),
            start_requested: false,
            rcpt_count: 0,
            errors: 0,
        }
    }

    fn reset_transaction(&mut self) {
        self.mail_from = None;
        self.recipients.clear();
        self.start_requested = false;
        self.rcpt_count = 0;
    }

    /// RFC 3207: after the handshake the client starts over with EHLO.
    fn reset_after_tls(&mut self) {
        self.reset_transaction();
        self.helo = None;
        self.tls_active = true;
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> End {
        loop {
            let line = match self.read_line(io).await {
                Line::Command(line) => line,
                Line::TooLong => {
                    if self.reply_error(io, "500 5.5.6 Line too long").await {
                        continue;
                    }
                    return End::Closed;
                }
                Line::Gone => return End::Closed,
            };
            let request = Request::parse(&mut line.iter()).map(Request::into_owned);
            let reply: String = match request {
                Err(e) => {
                    let reply = match e {
                        ProtoError::UnknownCommand => "500 5.5.1 Command unrecognized".to_owned(),
                        ProtoError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_owned(),
                        ProtoError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_owned(),
                        ProtoError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
                        ProtoError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param}"),
                        ProtoError::UnsupportedParameter { param } => {
                            format!("555 5.5.4 Unsupported parameter {}", param.chars().take(40).collect::<String>())
                        }
                        _ => "500 5.5.2 Syntax error".to_owned(),
                    };
                    if self.reply_error(io, &reply).await {
                        continue;
                    }
                    return End::Closed;
                }
                Ok(Request::Ehlo { host }) => {
                    self.reset_transaction();
                    let reply = smtp_in::ehlo_reply(
                        &self.config.domain,
                        &host,
                        Extensions {
                            size_max: self.config.size_max,
                            starttls: self.config.tls.is_some() && !self.tls_active,
                        },
                    );
                    self.helo = Some(host);
                    if write(io, reply.trim_end()).await.is_err() {
                        return End::Closed;
                    }
                    continue;
                }
                Ok(Request::Helo { host }) => {
                    self.reset_transaction();
                    self.helo = Some(host);
                    format!("250 {}", self.config.domain)
                }
                Ok(Request::StartTls) => {
                    if self.config.tls.is_none() || self.tls_active {
                        "502 5.5.1 STARTTLS not available".to_owned()
                    } else if !io.buffer().is_empty() {
                        // RFC 3207 §5: nothing may be pipelined after STARTTLS.
                        "501 5.5.4 Nothing may follow STARTTLS before the handshake".to_owned()
                    } else {
                        if write(io, "220 2.0.0 Ready to start TLS").await.is_err() {
                            return End::Closed;
                        }
                        return End::StartTls;
                    }
                }
                Ok(Request::Mail { from }) => self.mail(from.address, from.size as u64),
                Ok(Request::Rcpt { to }) => self.rcpt(&to.address).await,
                Ok(Request::Data) => {
                    if self.mail_from.is_none() {
                        "503 5.5.1 MAIL first".to_owned()
                    } else if self.rcpt_count == 0 {
                        "503 5.5.1 RCPT first".to_owned()
                    } else {
                        if write(io, "354 Start mail input; end with <CRLF>.<CRLF>").await.is_err() {
                            return End::Closed;
                        }
                        match self.data(io).await {
                            Some(reply) => reply,
                            None => return End::Closed,
                        }
                    }
                }
                Ok(Request::Rset) => {
                    self.reset_transaction();
                    "250 2.0.0 OK".to_owned()
                }
                Ok(Request::Noop { .. }) => "250 2.0.0 OK".to_owned(),
                Ok(Request::Vrfy { .. }) => "252 2.1.5 Cannot VRFY; send some mail".to_owned(),
                Ok(Request::Quit) => {
                    let _ = write(io, "221 2.0.0 Bye").await;
                    return End::Closed;
                }
                Ok(other) => format!("502 5.5.1 {} not implemented", other.name()),
            };
            let is_error = reply.starts_with('5');
            let sent = if is_error { self.reply_error(io, &reply).await } else { write(io, &reply).await.is_ok() };
            if !sent {
                return End::Closed;
            }
        }
    }

    /// Sends a 5xx reply and counts it; false when the connection should
    /// end (write failed, or too many errors: 421 sent).
    async fn reply_error<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>, reply: &str) -> bool {
        self.errors += 1;
        if write(io, reply).await.is_err() {
            return false;
        }
        if self.errors >= ERRORS_MAX {
            let _ = write(io, "421 4.7.0 Too many errors, closing").await;
            return false;
        }
        true
    }

    fn mail(&mut self, address: String, size: u64) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Say EHLO or HELO first".to_owned();
        }
        if self.mail_from.is_some() {
            return "503 5.5.1 Nested MAIL command".to_owned();
        }
        if size > self.config.size_max {
            return format!("552 5.3.4 Message too big (SIZE {} is above {})", size, self.config.size_max);
        }
        self.mail_from = Some(address);
        "250 2.1.0 OK".to_owned()
    }

    async fn rcpt(&mut self, address: &str) -> String {
        if self.mail_from.is_none() {
            return "503 5.5.1 MAIL first".to_owned();
        }
        if self.rcpt_count >= self.config.recipients_max {
            return "452 4.5.3 Too many recipients".to_owned();
        }
        let Ok(address) = EmailAddress::parse(address) else {
            return "501 5.1.3 Bad recipient address syntax".to_owned();
        };
        let settings = &self.state.platform.settings;
        if !settings.provisioning.allow.is_empty()
            && super::provision::is_start_address(&settings.email.domain, &address)
        {
            self.rcpt_count += 1;
            self.start_requested = true;
            return "250 2.1.5 OK".to_owned();
        }
        // Any other address (other domains included) is no mailbox here.
        let agent = match self.state.platform.store.agent_by_email(&address).await {
            Ok(Some(agent)) => agent,
            Ok(None) => return "550 5.1.1 No such mailbox".to_owned(),
            Err(e) => {
                tracing::error!(error = %e, "SMTP: resolving a recipient failed");
                return "451 4.3.0 Temporary failure, try again later".to_owned();
            }
        };
        self.rcpt_count += 1;
        if !self.recipients.iter().any(|(a, _)| a.id == agent.id) {
            self.recipients.push((agent, address));
        }
        "250 2.1.5 OK".to_owned()
    }

    /// Reads DATA to the final dot; `None` when the connection is gone.
    async fn data<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> Option<String> {
        let max = self.config.size_max as usize;
        let mut receiver = DataReceiver::new();
        // The DATA line ended with CRLF: a "." on the first line is a dot line.
        receiver.ingest(&mut b"\r\n".iter(), &mut Vec::new());
        let mut message = Vec::new();
        let mut too_big = false;
        let mut seen = 0usize;
        loop {
            let chunk = match tokio::time::timeout(self.config.timeout, io.fill_buf()).await {
                Ok(Ok(chunk)) if !chunk.is_empty() => chunk,
                _ => return None,
            };
            let mut bytes = chunk.iter();
            let done = if too_big {
                receiver.ingest(&mut bytes, &mut Vec::new())
            } else {
                receiver.ingest(&mut bytes, &mut message)
            };
            let used = chunk.len() - bytes.as_slice().len();
            io.consume(used);
            seen += used;
            if seen > max.saturating_mul(2).saturating_add(LINE_BYTES_MAX) {
                // Far past the limit: stop reading rather than drain it all.
                let _ = write(io, &format!("552 5.3.4 Message too big (the limit is {max} bytes); closing")).await;
                return None;
            }
            if !too_big && message.len() > max {
                too_big = true;
                message = Vec::new();
            }
            if done {
                break;
            }
        }
        let reply = if too_big {
            tracing::info!(peer = %self.peer, max, "SMTP message refused: larger than gateway.email_body_bytes_max");
            format!("552 5.3.4 Message too big (the limit is {max} bytes)")
        } else {
            self.enqueue(&message).await
        };
        self.reset_transaction();
        Some(reply)
    }

    /// One `email` job per agent recipient; `250` only after all committed.
    async fn enqueue(&self, raw: &[u8]) -> String {
        let envelope = JobEnvelope {
            client_ip: self.peer.ip(),
            helo: self.helo.clone().unwrap_or_default(),
            mail_from: self.mail_from.clone().unwrap_or_default(),
        };
        for (agent, recipient) in &self.recipients {
            let dedup_key = smtp_in::dedup_key(&agent.id, raw);
            if let Err(e) =
                super::enqueue_raw_email(self.state, agent, recipient, "smtp", raw, Some(envelope.clone()), dedup_key)
                    .await
            {
                tracing::error!(agent = %agent.name, error = %e, "SMTP: enqueueing a message failed; the sender will retry");
                return "451 4.3.0 Temporary failure, try again later".to_owned();
            }
        }
        if self.start_requested {
            let dedup_key = smtp_in::dedup_key_for("start", raw);
            if let Err(e) = super::provision::enqueue_start(self.state, raw, Some(envelope), dedup_key).await {
                tracing::error!(error = %e, "SMTP: enqueueing a start request failed; the sender will retry");
                return "451 4.3.0 Temporary failure, try again later".to_owned();
            }
        }
        "250 2.0.0 OK: queued".to_owned()
    }

    /// One command line, within the timeout; a shutdown answers 421.
    async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut BufReader<S>) -> Line {
        let read = async {
            let mut line = Vec::new();
            let n = (&mut *io).take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(Line::Gone);
            }
            if line.last() == Some(&b'\n') {
                return Ok(Line::Command(line));
            }
            if line.len() < LINE_BYTES_MAX {
                return Ok(Line::Gone); // closed in the middle of a line
            }
            // Too long: skip to the end of the line.
            loop {
                let mut skipped = Vec::new();
                let n = (&mut *io).take(LINE_BYTES_MAX as u64).read_until(b'\n', &mut skipped).await?;
                if n == 0 {
                    return Ok(Line::Gone);
                }
                if skipped.last() == Some(&b'\n') {
                    return Ok(Line::TooLong);
                }
            }
        };
        let mut shutdown = self.shutdown.clone();
        let stopping = async move {
            if !*shutdown.borrow_and_update() {
                let _ = shutdown.changed().await;
            }
        };
        let farewell = tokio::select! {
            result = tokio::time::timeout(self.config.timeout, read) => match result {
                Ok(Ok(line)) => return line,
                Ok(Err(_)) => return Line::Gone,
                Err(_) => "421 4.4.2 Timeout, closing",
            },
            _ = stopping => "421 4.3.2 Shutting down, try again later",
        };
        let _ = write(io, farewell).await;
        Line::Gone
    }
}

async fn write<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>, reply: &str) -> std::io::Result<()> {
    // One write per reply: two small segments would wait on the peer's
    // delayed ACK (Nagle), ~40-200 ms per command.
    let stream = io.get_mut();
    stream.write_all(format!("{reply}\r\n").as_bytes()).await?;
    stream.flush().await
}
