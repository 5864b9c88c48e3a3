//! Sender authentication for inbound mail (SPEC §8): the sender is accepted
//! only when DKIM or SPF passes *aligned* with the From domain, the way DMARC
//! defines it. Two sources of evidence feed one decision ([`decide`]):
//!
//! - [`Authenticator`]: our own checks with mail-auth over the raw message
//!   (DKIM always; SPF when the SMTP envelope is known, i.e. the built-in
//!   SMTP listener), then DMARC. DNS goes through [`DnsRecords`]: in
//!   production a bounded cache in front of the system resolver; in tests an
//!   authoritative in-memory zone, so everything runs offline.
//! - [`TrustedAuthResults`]: `Authentication-Results` headers (RFC 8601)
//!   written by the mailbox's own MTA, for IMAP. Only the topmost such
//!   header is believed, and only when its authserv-id is the configured
//!   one; headers below it may have come with the message and are ignored.
//!
//! Alignment: when the From domain publishes a DMARC record, its own verdict
//! (and its `adkim`/`aspf` modes) decides. Without one, an identifier aligns
//! when it equals the From domain or one is a parent domain of the other
//! (relaxed alignment approximated without the public-suffix list; a parent
//! must have at least two labels, so `co.uk` never aligns with `x.co.uk`).
//!
//! The verdict has four outcomes: `Pass`; `Fail` (the domain's published
//! policy or an aligned signature says no); `CannotEvaluate` (nothing to go
//! on: no aligned signature, no SPF, no DMARC record); `TempError` (DNS
//! failed; retrying may help). The caller refuses all but `Pass` unless
//! `email.require_auth = false`, which admits `CannotEvaluate` and
//! `TempError` (never `Fail`): see [`AuthVerdict::admits`].
//!
//! This module must not decide whether a sender is allowed (that is the
//! allowed-sender list) and must not log message content.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::Dmarc;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::config::{ResolverConfig, ResolverOpts};
use mail_auth::hickory_resolver::proto::op::ResponseCode;
use mail_auth::spf::Spf;
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimResult, DmarcResult, DnsError, DnssecStatus, MX, MessageAuthenticator, Parameters,
    RecordSet, ResolverCache, SpfOutput, SpfResult, Txt,
};

/// Entries kept per record type by the production cache; reaching it
/// empties that table (a crude but bounded eviction).
pub const DNS_CACHE_ENTRIES_MAX: usize = 10_000;

/// What the caller should do with the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Pass,
    Fail,
    CannotEvaluate,
    TempError,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthVerdict {
    pub outcome: AuthOutcome,
    /// One sentence for logs and the dead-letter record.
    pub reason: String,
    /// The RFC 5322 From domain that was checked.
    pub from_domain: String,
}

impl AuthVerdict {
    pub fn pass(&self) -> bool {
        self.outcome == AuthOutcome::Pass
    }

    /// Whether to admit the sender: `Pass` always; `CannotEvaluate` and
    /// `TempError` only when `require_auth` is off; `Fail` never.
    pub fn admits(&self, require_auth: bool) -> bool {
        match self.outcome {
            AuthOutcome::Pass => true,
            AuthOutcome::Fail => false,
            AuthOutcome::CannotEvaluate | AuthOutcome::TempError => !require_auth,
        }
    }

    fn new(outcome: AuthOutcome, from_domain: &str, reason: impl Into<String>) -> Self {
        Self { outcome, reason: reason.into(), from_domain: from_domain.to_owned() }
    }
}

impl fmt::Display for AuthVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.outcome, self.reason)
    }
}

/// The SMTP session a message arrived in (built-in listener only).
#[derive(Clone, Copy, Debug)]
pub struct SmtpEnvelope<'a> {
    pub client_ip: IpAddr,
    pub helo: &'a str,
    /// MAIL FROM without brackets; empty for the null sender `<>`.
    pub mail_from: &'a str,
    /// Our own host name, as SPF's `%{r}` macro sees it.
    pub receiver_host: &'a str,
}

/// The seam the platform holds: our own checks, trusted headers, or a fake.
#[async_trait]
pub trait SenderAuthenticator: Send + Sync + fmt::Debug {
    async fn authenticate(&self, raw: &[u8], envelope: Option<&SmtpEnvelope<'_>>) -> AuthVerdict;
}

// ---------------------------------------------------------------------------
// Evidence and the decision.

/// A mechanism's result, from either source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl Check {
    fn parse(s: &str) -> Check {
        match s.to_ascii_lowercase().as_str() {
            "pass" => Check::Pass,
            "fail" | "hardfail" => Check::Fail,
            "softfail" => Check::SoftFail,
            "neutral" | "policy" => Check::Neutral,
            "temperror" => Check::TempError,
            "permerror" => Check::PermError,
            _ => Check::None,
        }
    }
}

/// What the checks found, independent of where they ran.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub from_domain: String,
    /// One entry per DKIM signature: its `d=` domain (empty when the
    /// signature could not be parsed) and result. A missing key counts as
    /// `None` (nothing to verify against), a broken signature as `Fail`.
    pub dkim: Vec<(String, Check)>,
    /// The SPF result and the domain it was for (MAIL FROM or HELO).
    pub spf: Option<(String, Check)>,
    pub dmarc: DmarcEvidence,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DmarcEvidence {
    /// The From domain publishes no DMARC record.
    NoRecord,
    /// A record exists and its evaluation passed through DKIM and/or SPF.
    Pass {
        dkim: bool,
        spf: bool,
    },
    /// A record exists and neither mechanism passed aligned.
    Fail {
        policy: String,
    },
    TempError,
    PermError,
}

/// The decision of SPEC §8 from the evidence.
pub fn decide(e: &Evidence) -> AuthVerdict {
    let from = e.from_domain.as_str();
    if from.is_empty() {
        return AuthVerdict::new(AuthOutcome::Fail, from, "the message has no From domain");
    }
    let aligned_dkim = |check: Check| e.dkim.iter().find(|(d, c)| *c == check && aligned(d, from));
    let spf_aligned = e.spf.as_ref().filter(|(d, _)| aligned(d, from));

    match &e.dmarc {
        DmarcEvidence::Pass { dkim, spf } => {
            let via = match (dkim, spf) {
                (true, true) => "DKIM and SPF",
                (true, false) => "DKIM",
                (false, true) => "SPF",
                (false, false) => "DKIM or SPF",
            };
            return AuthVerdict::new(AuthOutcome::Pass, from, format!("dmarc=pass for {from} via aligned {via}"));
        }
        DmarcEvidence::Fail { policy } => {
            let seen = describe(e);
            return AuthVerdict::new(
                AuthOutcome::Fail,
                from,
                format!("dmarc=fail for {from} (p={policy}): no DKIM or SPF pass aligned with the From domain; {seen}"),
            );
        }
        DmarcEvidence::TempError => {
            return AuthVerdict::new(
                AuthOutcome::TempError,
                from,
                format!("dmarc=temperror for {from}: DNS lookup failed"),
            );
        }
        DmarcEvidence::PermError | DmarcEvidence::NoRecord => {}
    }

    // No usable DMARC record: apply relaxed alignment ourselves.
    if let Some((d, _)) = aligned_dkim(Check::Pass) {
        return AuthVerdict::new(
            AuthOutcome::Pass,
            from,
            format!("dkim=pass d={d}, aligned with {from} (no DMARC record)"),
        );
    }
    if let Some((d, Check::Pass)) = spf_aligned {
        return AuthVerdict::new(
            AuthOutcome::Pass,
            from,
            format!("spf=pass for {d}, aligned with {from} (no DMARC record)"),
        );
    }
    let seen = describe(e);
    if let Some((d, _)) = aligned_dkim(Check::Fail) {
        return AuthVerdict::new(
            AuthOutcome::Fail,
            from,
            format!("dkim=fail for aligned d={d}: the signature does not verify; {seen}"),
        );
    }
    if let Some((d, Check::Fail)) = spf_aligned {
        return AuthVerdict::new(
            AuthOutcome::Fail,
            from,
            format!("spf=fail for aligned {d}: the sending host is not permitted; {seen}"),
        );
    }
    let temp = e.dkim.iter().any(|(_, c)| *c == Check::TempError)
        || e.spf.as_ref().is_some_and(|(_, c)| *c == Check::TempError);
    if temp {
        return AuthVerdict::new(AuthOutcome::TempError, from, format!("DNS lookups failed; {seen}"));
    }
    AuthVerdict::new(
        AuthOutcome::CannotEvaluate,
        from,
        format!("no aligned DKIM or SPF pass and no DMARC record for {from}; {seen}"),
    )
}

fn describe(e: &Evidence) -> String {
    let mut parts: Vec<String> = e
        .dkim
        .iter()
        .map(|(d, c)| if d.is_empty() { format!("dkim={c:?}") } else { format!("dkim={c:?} d={d}") })
        .collect();
    if parts.is_empty() {
        parts.push("no DKIM signature".into());
    }
    match &e.spf {
        Some((d, c)) => parts.push(format!("spf={c:?} for {d}")),
        None => parts.push("SPF not checked".into()),
    }
    parts.join(", ").to_ascii_lowercase()
}

/// Relaxed alignment without the public-suffix list (see the module docs).
pub fn aligned(identifier: &str, from_domain: &str) -> bool {
    let a = identifier.trim().trim_end_matches('.').to_ascii_lowercase();
    let b = from_domain.trim().trim_end_matches('.').to_ascii_lowercase();
    if a.is_empty() || b.is_empty() {
        return false;
    }
    let parent_ok = |parent: &str, child: &str| parent.contains('.') && child.ends_with(&format!(".{parent}"));
    a == b || parent_ok(&a, &b) || parent_ok(&b, &a)
}

// ---------------------------------------------------------------------------
// Our own checks with mail-auth.

/// DKIM, SPF and DMARC with mail-auth, answering DNS from [`DnsRecords`].
pub struct Authenticator {
    resolver: MessageAuthenticator,
    records: Arc<DnsRecords>,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator").field("records", &self.records).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot set up the DNS resolver: {0}")]
    Resolver(String),
    #[error("DNS record for {name}: {reason}")]
    Record { name: String, reason: String },
}

impl Authenticator {
    /// The system's resolver (`/etc/resolv.conf`) behind a bounded cache.
    pub fn system() -> Result<Self, AuthSetupError> {
        let resolver = MessageAuthenticator::new_system_conf().map_err(|e| AuthSetupError::Resolver(e.to_string()))?;
        Ok(Self { resolver, records: Arc::new(DnsRecords::cache(DNS_CACHE_ENTRIES_MAX)) })
    }

    /// Answers every query from `records` and nothing else: no name servers
    /// are configured, so no packet leaves the process.
    pub fn offline(records: DnsRecords) -> Result<Self, AuthSetupError> {
        let config = ResolverConfig::from_parts(None, Vec::new(), Vec::new());
        let resolver = MessageAuthenticator::new(config, ResolverOpts::default())
            .map_err(|e| AuthSetupError::Resolver(e.to_string()))?;
        Ok(Self { resolver, records: Arc::new(records.authoritative()) })
    }

    /// Runs DKIM, SPF (with an envelope) and DMARC over a raw message.
    pub async fn verify(&self, raw: &[u8], envelope: Option<&SmtpEnvelope<'_>>) -> AuthVerdict {
        let Some(message) = AuthenticatedMessage::parse(raw) else {
            return AuthVerdict::new(AuthOutcome::Fail, "", "the message header could not be parsed");
        };
        let from_domains: Vec<String> = message
            .from
            .iter()
            .filter_map(|f| f.rsplit_once('@').map(|(_, d)| d.trim_end_matches('.').to_ascii_lowercase()))
            .collect();
        let from_domain = match from_domains.as_slice() {
            [one] => one.clone(),
            [] => return AuthVerdict::new(AuthOutcome::Fail, "", "the message has no From address"),
            _ => return AuthVerdict::new(AuthOutcome::Fail, "", "the message has several From addresses"),
        };

        let r = &*self.records;
        let dkim_output = self.resolver.verify_dkim(r.parameters(&message)).await;
        let dkim = dkim_output
            .iter()
            .map(|o| {
                let domain = o.signature().map(|s| s.d.to_ascii_lowercase()).unwrap_or_default();
                let check = match o.result() {
                    DkimResult::Pass => Check::Pass,
                    DkimResult::Fail(_) => Check::Fail,
                    // mail-auth reports a body altered after signing as
                    // neutral; for us it is a signature that does not verify.
                    DkimResult::Neutral(mail_auth::Error::Dkim(mail_auth::dkim::DkimError::FailedBodyHashMatch)) => {
                        Check::Fail
                    }
                    DkimResult::Neutral(_) => Check::Neutral,
                    DkimResult::TempError(_) => Check::TempError,
                    // No key published (or an unusable one): nothing verified.
                    DkimResult::PermError(_) => Check::PermError,
                    DkimResult::None => Check::None,
                };
                (domain, check)
            })
            .collect();

        let (spf_output, mail_from_domain) = match envelope {
            Some(env) => {
                let helo = env.helo.trim();
                let output = if env.mail_from.trim().is_empty() {
                    let params = SpfParameters::verify_ehlo(env.client_ip, helo, env.receiver_host);
                    self.resolver.verify_spf(r.parameters(params)).await
                } else {
                    let params =
                        SpfParameters::verify_mail_from(env.client_ip, helo, env.receiver_host, env.mail_from.trim());
                    self.resolver.verify_spf(r.parameters(params)).await
                };
                let domain = output.domain().to_ascii_lowercase();
                (output, domain)
            }
            None => (SpfOutput::new(String::new()), String::new()),
        };
        let spf = envelope.map(|_| {
            let check = match spf_output.result() {
                SpfResult::Pass => Check::Pass,
                SpfResult::Fail => Check::Fail,
                SpfResult::SoftFail => Check::SoftFail,
                SpfResult::Neutral => Check::Neutral,
                SpfResult::TempError => Check::TempError,
                SpfResult::PermError => Check::PermError,
                SpfResult::None => Check::None,
            };
            (mail_from_domain.clone(), check)
        });

        let dmarc_output = self
            .resolver
            .verify_dmarc(r.parameters(DmarcParameters::new(&message, &dkim_output, &mail_from_domain, &spf_output)))
            .await;
        let dmarc = match (dmarc_output.dmarc_record(), dmarc_output.result()) {
            (_, DmarcResult::Pass) => DmarcEvidence::Pass {
                dkim: *dmarc_output.dkim_result() == DmarcResult::Pass,
                spf: *dmarc_output.spf_result() == DmarcResult::Pass,
            },
            (_, DmarcResult::TempError(_)) => DmarcEvidence::TempError,
            (Some(record), DmarcResult::Fail(_)) => {
                DmarcEvidence::Fail { policy: format!("{:?}", record.p).to_ascii_lowercase() }
            }
            (_, DmarcResult::PermError(_)) => DmarcEvidence::PermError,
            _ => DmarcEvidence::NoRecord,
        };
        decide(&Evidence { from_domain, dkim, spf, dmarc })
    }
}

#[async_trait]
impl SenderAuthenticator for Authenticator {
    async fn authenticate(&self, raw: &[u8], envelope: Option<&SmtpEnvelope<'_>>) -> AuthVerdict {
        self.verify(raw, envelope).await
    }
}

/// DNS answers for mail-auth: a zone (authoritative: a name not added does
/// not exist) or a cache in front of the real resolver. mail-auth consults
/// these tables before every lookup; it is how its resolver is injected.
///
/// In a zone, a missing TXT name answers NXDOMAIN and a missing A, AAAA, MX
/// or PTR name an empty record set. One mail-auth quirk follows: SPF's
/// `exists:` mechanism treats any cached answer, even an empty one, as
/// existing, so zone-based tests must not rely on `exists:` failing.
pub struct DnsRecords {
    txt: Table<Box<str>, Txt>,
    mx: Table<Box<str>, RecordSet<MX>>,
    ipv4: Table<Box<str>, RecordSet<Ipv4Addr>>,
    ipv6: Table<Box<str>, RecordSet<Ipv6Addr>>,
    ptr: Table<IpAddr, RecordSet<Box<str>>>,
}

impl fmt::Debug for DnsRecords {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsRecords")
            .field("authoritative", &self.txt.authoritative)
            .field("txt", &self.txt.len())
            .finish_non_exhaustive()
    }
}

impl Default for DnsRecords {
    fn default() -> Self {
        Self::zone()
    }
}

impl DnsRecords {
    /// An empty zone to fill with `add_*` (then `Authenticator::offline`).
    pub fn zone() -> Self {
        Self::with(true, usize::MAX)
    }

    /// A cache that remembers real answers until their TTL.
    pub fn cache(entries_max: usize) -> Self {
        Self::with(false, entries_max)
    }

    fn with(authoritative: bool, entries_max: usize) -> Self {
        Self {
            txt: Table::new(authoritative, entries_max),
            mx: Table::new(authoritative, entries_max),
            ipv4: Table::new(authoritative, entries_max),
            ipv6: Table::new(authoritative, entries_max),
            ptr: Table::new(authoritative, entries_max),
        }
    }

    fn authoritative(mut self) -> Self {
        self.txt.authoritative = true;
        self.mx.authoritative = true;
        self.ipv4.authoritative = true;
        self.ipv6.authoritative = true;
        self.ptr.authoritative = true;
        self
    }

    /// Adds a TXT record, parsed by what its name says it is:
    /// `sel._domainkey.d` (DKIM key), `_dmarc.d` (DMARC), else SPF.
    pub fn add_txt(&self, name: &str, record: &str) -> Result<(), AuthSetupError> {
        let key = fqdn(name);
        let bad = |e: mail_auth::Error| AuthSetupError::Record { name: name.to_owned(), reason: e.to_string() };
        let txt: Txt = if key.contains("._domainkey.") {
            DomainKey::parse(record.as_bytes()).map_err(bad)?.into()
        } else if key.starts_with("_dmarc.") {
            Dmarc::parse(record.as_bytes()).map_err(bad)?.into()
        } else {
            Spf::parse(record.as_bytes()).map_err(bad)?.into()
        };
        self.txt.put(key.into(), txt);
        Ok(())
    }

    /// Makes lookups of `name` fail as if the DNS server were unreachable.
    pub fn add_temporary_failure(&self, name: &str) {
        let error = mail_auth::Error::Dns(DnsError::Resolver("injected failure".into()));
        self.txt.put(fqdn(name).into(), Txt::Error(error));
    }

    pub fn add_a(&self, name: &str, addresses: Vec<Ipv4Addr>) {
        self.ipv4.put(fqdn(name).into(), record_set(addresses));
    }

    pub fn add_aaaa(&self, name: &str, addresses: Vec<Ipv6Addr>) {
        self.ipv6.put(fqdn(name).into(), record_set(addresses));
    }

    pub fn add_mx(&self, name: &str, preference: u16, exchanges: Vec<String>) {
        let exchanges = exchanges.into_iter().map(|e| fqdn(&e).into_boxed_str()).collect();
        self.mx.put(fqdn(name).into(), record_set(vec![MX { exchanges, preference }]));
    }

    pub fn add_ptr(&self, address: IpAddr, names: Vec<String>) {
        self.ptr.put(address, record_set(names.into_iter().map(|n| fqdn(&n).into_boxed_str()).collect()));
    }

    fn parameters<P>(&self, params: P) -> ZoneParameters<'_, P> {
        Parameters::new(params)
            .with_txt_cache(&self.txt)
            .with_mx_cache(&self.mx)
            .with_ipv4_cache(&self.ipv4)
            .with_ipv6_cache(&self.ipv6)
            .with_ptr_cache(&self.ptr)
    }
}

/// mail-auth's parameters with every lookup answered by a [`DnsRecords`] table.
type ZoneParameters<'x, P> = Parameters<
    'x,
    P,
    Table<Box<str>, Txt>,
    Table<Box<str>, RecordSet<MX>>,
    Table<Box<str>, RecordSet<Ipv4Addr>>,
    Table<Box<str>, RecordSet<Ipv6Addr>>,
    Table<IpAddr, RecordSet<Box<str>>>,
>;

fn fqdn(name: &str) -> String {
    let mut s = name.trim().to_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    s
}

fn record_set<T>(items: Vec<T>) -> RecordSet<T> {
    RecordSet { rrset: Arc::from(items.into_boxed_slice()), dnssec_status: DnssecStatus::Indeterminate }
}

/// One record type's answers.
struct Table<K, V> {
    entries: Mutex<HashMap<K, (V, Option<Instant>)>>,
    authoritative: bool,
    entries_max: usize,
}

/// What an authoritative zone answers for a name it does not hold.
trait Absent {
    fn absent() -> Self;
}

impl Absent for Txt {
    fn absent() -> Self {
        Txt::Error(mail_auth::Error::Dns(DnsError::RecordNotFound(ResponseCode::NXDomain)))
    }
}

impl<T> Absent for RecordSet<T> {
    fn absent() -> Self {
        record_set(Vec::new())
    }
}

impl<K: Hash + Eq, V: Clone> Table<K, V> {
    fn new(authoritative: bool, entries_max: usize) -> Self {
        Self { entries: Mutex::new(HashMap::new()), authoritative, entries_max }
    }

    fn put(&self, key: K, value: V) {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).insert(key, (value, None));
    }

    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl<K: Hash + Eq, V: Clone + Absent> ResolverCache<K, V> for Table<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(name) {
            Some((value, None)) => Some(value.clone()),
            Some((value, Some(until))) if *until > Instant::now() => Some(value.clone()),
            _ if self.authoritative => Some(V::absent()),
            _ => None,
        }
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        if self.authoritative {
            return;
        }
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.entries_max {
            entries.clear();
        }
        entries.insert(key, (value, Some(valid_until)));
    }
}

// ---------------------------------------------------------------------------
// Authentication-Results (RFC 8601), for IMAP.

/// One parsed `Authentication-Results` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthResults {
    pub authserv_id: String,
    pub results: Vec<MethodResult>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MethodResult {
    /// `dkim`, `spf`, `dmarc`, … (lowercase, version dropped).
    pub method: String,
    /// `pass`, `fail`, … (lowercase).
    pub result: String,
    /// `reason` and `ptype.property` values, names lowercase.
    pub properties: Vec<(String, String)>,
}

impl MethodResult {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Parses a header value; `None` when it has no authserv-id.
pub fn parse_authentication_results(value: &str) -> Option<AuthResults> {
    let cleaned = strip_comments(value);
    let mut segments = split_outside_quotes(&cleaned, ';').into_iter();
    let authserv_id = segments.next()?.split_whitespace().next()?.to_ascii_lowercase();
    if authserv_id.contains('=') {
        return None;
    }
    let mut results = Vec::new();
    for segment in segments {
        let pairs = key_values(&segment);
        let Some(((method, result), rest)) = pairs.split_first() else { continue };
        let method = method.split('/').next().unwrap_or_default().trim().to_ascii_lowercase();
        if method.is_empty() || method == "none" {
            continue;
        }
        results.push(MethodResult {
            method,
            result: result.to_ascii_lowercase(),
            properties: rest.iter().map(|(k, v)| (k.to_ascii_lowercase(), v.clone())).collect(),
        });
    }
    Some(AuthResults { authserv_id, results })
}

/// Removes RFC 5322 comments `( … )`, nested, outside quoted strings.
fn strip_comments(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    for c in s.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => {
                depth -= 1;
                if depth == 0 {
                    out.push(' ');
                }
            }
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                parts.last_mut().expect("never empty").push(c);
            }
            c if c == sep && !quoted => parts.push(String::new()),
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    parts
}

/// `a=b c = "d e" f.g=h` → pairs; values unquoted.
fn key_values(s: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= chars.len() {
            break;
        }
        let start = i;
        while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '=' {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_ws(&mut i);
        if chars.get(i) != Some(&'=') {
            // A bare word (e.g. a version number): skip it.
            continue;
        }
        i += 1;
        skip_ws(&mut i);
        let mut value = String::new();
        if chars.get(i) == Some(&'"') {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                value.push(chars[i]);
                i += 1;
            }
        }
        out.push((key, value));
    }
    out
}

/// Trusts `Authentication-Results` from one authserv-id (IMAP mailboxes,
/// where the provider's MTA already checked the message).
#[derive(Clone, Debug)]
pub struct TrustedAuthResults {
    authserv_id: String,
}

impl TrustedAuthResults {
    pub fn new(authserv_id: &str) -> Self {
        Self { authserv_id: authserv_id.trim().to_ascii_lowercase() }
    }

    /// The verdict from the trusted headers of a raw message.
    pub fn verify(&self, raw: &[u8]) -> AuthVerdict {
        let Some(message) = mail_parser::MessageParser::default().parse(raw) else {
            return AuthVerdict::new(AuthOutcome::Fail, "", "the message header could not be parsed");
        };
        let froms: Vec<String> = message
            .from()
            .map(|a| a.iter().filter_map(|f| f.address.as_deref()).map(str::to_owned).collect())
            .unwrap_or_default();
        let from_domain = match froms.as_slice() {
            [one] => one.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()).unwrap_or_default(),
            [] => return AuthVerdict::new(AuthOutcome::Fail, "", "the message has no From address"),
            _ => return AuthVerdict::new(AuthOutcome::Fail, "", "the message has several From addresses"),
        };

        // Headers come top (newest) first. Only the topmost
        // Authentication-Results counts, and only when it is ours: the MTA
        // prepends its own last, and anything below it (even with our
        // authserv-id, if the MTA failed to strip it) may be forged.
        let topmost = message
            .headers_raw()
            .take(10_000)
            .find(|(name, _)| name.eq_ignore_ascii_case("Authentication-Results"))
            .map(|(_, value)| parse_authentication_results(value));
        let trusted = match topmost {
            Some(Some(ar)) if ar.authserv_id == self.authserv_id => vec![ar],
            Some(other) => {
                let other = other.map(|a| a.authserv_id).unwrap_or_else(|| "(unparseable)".into());
                let reason = format!(
                    "the newest Authentication-Results is from {other:?}, not the trusted {:?}",
                    self.authserv_id
                );
                return AuthVerdict::new(AuthOutcome::CannotEvaluate, &from_domain, reason);
            }
            None => {
                let reason = format!("no Authentication-Results from the trusted {:?}", self.authserv_id);
                return AuthVerdict::new(AuthOutcome::CannotEvaluate, &from_domain, reason);
            }
        };
        decide(&evidence_from_results(&from_domain, &trusted))
    }
}

#[async_trait]
impl SenderAuthenticator for TrustedAuthResults {
    async fn authenticate(&self, raw: &[u8], _envelope: Option<&SmtpEnvelope<'_>>) -> AuthVerdict {
        self.verify(raw)
    }
}

fn evidence_from_results(from_domain: &str, headers: &[AuthResults]) -> Evidence {
    let mut dkim = Vec::new();
    let mut spf = None;
    let mut dmarc = DmarcEvidence::NoRecord;
    let domain_of = |v: &str| v.rsplit_once('@').map_or(v, |(_, d)| d).trim_end_matches('.').to_ascii_lowercase();
    for r in headers.iter().flat_map(|h| &h.results) {
        match r.method.as_str() {
            "dkim" => {
                let d = r.property("header.d").or(r.property("header.i")).map(domain_of).unwrap_or_default();
                dkim.push((d, Check::parse(&r.result)));
            }
            "spf" if spf.is_none() => {
                let d = r.property("smtp.mailfrom").or(r.property("smtp.helo")).map(domain_of).unwrap_or_default();
                spf = Some((d, Check::parse(&r.result)));
            }
            "dmarc" if dmarc == DmarcEvidence::NoRecord => {
                let header_from = r.property("header.from").map(domain_of);
                // A result about another domain says nothing about ours.
                if header_from.as_deref().is_some_and(|d| d != from_domain) {
                    continue;
                }
                dmarc = match Check::parse(&r.result) {
                    Check::Pass => DmarcEvidence::Pass { dkim: false, spf: false },
                    Check::Fail => DmarcEvidence::Fail {
                        policy: r.property("policy.published-domain-policy").unwrap_or("unknown").to_owned(),
                    },
                    Check::TempError => DmarcEvidence::TempError,
                    Check::PermError => DmarcEvidence::PermError,
                    _ => DmarcEvidence::NoRecord,
                };
            }
            _ => {}
        }
    }
    if let DmarcEvidence::Pass { dkim: via_dkim, spf: via_spf } = &mut dmarc {
        *via_dkim = dkim.iter().any(|(_, c)| *c == Check::Pass);
        *via_spf = spf.as_ref().is_some_and(|(_, c)| *c == Check::Pass);
    }
    Evidence { from_domain: from_domain.to_owned(), dkim, spf, dmarc }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment() {
        for (id, from, want) in [
            ("example.org", "example.org", true),
            ("EXAMPLE.org.", "example.org", true),
            ("example.org", "mail.example.org", true),
            ("mail.example.org", "example.org", true),
            ("a.example.org", "b.example.org", false),
            ("evil.example", "example.org", false),
            ("co.uk", "x.co.uk", true),
            ("uk", "x.uk", false),
            ("notexample.org", "example.org", false),
            ("", "example.org", false),
        ] {
            assert_eq!(aligned(id, from), want, "{id} vs {from}");
        }
    }

    fn ev(dkim: &[(&str, Check)], spf: Option<(&str, Check)>, dmarc: DmarcEvidence) -> Evidence {
        Evidence {
            from_domain: "example.org".into(),
            dkim: dkim.iter().map(|(d, c)| (d.to_string(), *c)).collect(),
            spf: spf.map(|(d, c)| (d.to_string(), c)),
            dmarc,
        }
    }

    #[test]
    fn decisions() {
        use AuthOutcome as O;
        use Check as C;
        let fail = || DmarcEvidence::Fail { policy: "reject".into() };
        let cases: Vec<(Evidence, AuthOutcome)> = vec![
            (ev(&[("example.org", C::Pass)], None, DmarcEvidence::Pass { dkim: true, spf: false }), O::Pass),
            (ev(&[("evil.example", C::Pass)], None, fail()), O::Fail),
            (ev(&[("example.org", C::Pass)], None, DmarcEvidence::NoRecord), O::Pass),
            (ev(&[], Some(("example.org", C::Pass)), DmarcEvidence::NoRecord), O::Pass),
            (ev(&[], Some(("bounces.example.org", C::Pass)), DmarcEvidence::NoRecord), O::Pass),
            (ev(&[("evil.example", C::Pass)], None, DmarcEvidence::NoRecord), O::CannotEvaluate),
            (ev(&[("example.org", C::Fail)], None, DmarcEvidence::NoRecord), O::Fail),
            (ev(&[], Some(("example.org", C::Fail)), DmarcEvidence::NoRecord), O::Fail),
            (ev(&[], Some(("example.org", C::SoftFail)), DmarcEvidence::NoRecord), O::CannotEvaluate),
            (ev(&[("example.org", C::PermError)], None, DmarcEvidence::NoRecord), O::CannotEvaluate),
            (ev(&[], None, DmarcEvidence::NoRecord), O::CannotEvaluate),
            (ev(&[("example.org", C::TempError)], None, DmarcEvidence::NoRecord), O::TempError),
            (ev(&[], None, DmarcEvidence::TempError), O::TempError),
        ];
        for (i, (e, want)) in cases.into_iter().enumerate() {
            let v = decide(&e);
            assert_eq!(v.outcome, want, "case {i}: {v}");
        }
        let v = decide(&ev(&[], None, DmarcEvidence::NoRecord));
        assert!(!v.admits(true) && v.admits(false));
        let v = decide(&ev(&[("evil.example", C::Pass)], None, fail()));
        assert!(!v.admits(true) && !v.admits(false));
        assert!(v.reason.contains("dmarc=fail") && v.reason.contains("d=evil.example"), "{}", v.reason);
    }

    #[test]
    fn parses_authentication_results() {
        let ar = parse_authentication_results(
            "mx.example.net 1; dkim=pass (2048-bit key; secure) header.d=example.org header.i=@example.org header.s=sel header.b=\"abc;def\";\r\n spf=pass (mx.example.net: domain of ann@example.org designates 192.0.2.1 as permitted sender) smtp.mailfrom=ann@example.org;\r\n dmarc=pass (p=REJECT sp=REJECT dis=NONE) header.from=example.org",
        )
        .unwrap();
        assert_eq!(ar.authserv_id, "mx.example.net");
        assert_eq!(ar.results.len(), 3);
        assert_eq!(ar.results[0].method, "dkim");
        assert_eq!(ar.results[0].result, "pass");
        assert_eq!(ar.results[0].property("header.d"), Some("example.org"));
        assert_eq!(ar.results[0].property("header.b"), Some("abc;def"));
        assert_eq!(ar.results[1].property("smtp.mailfrom"), Some("ann@example.org"));
        assert_eq!(ar.results[2].property("header.from"), Some("example.org"));
        let none = parse_authentication_results("mx.example.net; none").unwrap();
        assert!(none.results.is_empty());
        assert!(parse_authentication_results("").is_none());
        assert!(parse_authentication_results("dkim=pass").is_none());
        let spaced = parse_authentication_results("mx; spf = fail smtp.mailfrom = x@y.org").unwrap();
        assert_eq!(spaced.results[0].result, "fail");
        assert_eq!(spaced.results[0].property("smtp.mailfrom"), Some("x@y.org"));
    }

    fn with_headers(headers: &str) -> Vec<u8> {
        format!("{headers}From: Ann <ann@example.org>\r\nTo: agent@agents.example.com\r\nSubject: hi\r\n\r\nbody\r\n")
            .into_bytes()
    }

    #[test]
    fn trusted_authentication_results() {
        let trusted = TrustedAuthResults::new("MX.Example.NET");
        let cases: Vec<(String, AuthOutcome)> = vec![
            ("Authentication-Results: mx.example.net; dkim=pass header.d=example.org; dmarc=pass header.from=example.org\r\n".into(), AuthOutcome::Pass),
            ("Authentication-Results: mx.example.net; dkim=pass header.i=@mail.example.org\r\n".into(), AuthOutcome::Pass),
            ("Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=bounce@example.org\r\n".into(), AuthOutcome::Pass),
            ("Authentication-Results: mx.example.net; dkim=pass header.d=evil.example; dmarc=fail (p=reject) header.from=example.org\r\n".into(), AuthOutcome::Fail),
            ("Authentication-Results: mx.example.net; none\r\n".into(), AuthOutcome::CannotEvaluate),
            ("Authentication-Results: mx.example.net; dmarc=temperror header.from=example.org\r\n".into(), AuthOutcome::TempError),
            // Only the topmost header counts: a forged one below it (even
            // with our authserv-id) is ignored.
            ("Authentication-Results: mx.example.net; dkim=none\r\nAuthentication-Results: mx.example.net; dmarc=pass header.from=example.org\r\n".into(), AuthOutcome::CannotEvaluate),
            ("Authentication-Results: mx.example.net; spf=none\r\nAuthentication-Results: evil.example; dmarc=pass\r\nAuthentication-Results: mx.example.net; dmarc=pass header.from=example.org\r\n".into(), AuthOutcome::CannotEvaluate),
            // Someone else's verdict on top: nothing is trusted.
            ("Authentication-Results: evil.example; dmarc=pass header.from=example.org\r\nAuthentication-Results: mx.example.net; dmarc=pass header.from=example.org\r\n".into(), AuthOutcome::CannotEvaluate),
            ("".into(), AuthOutcome::CannotEvaluate),
        ];
        for (headers, want) in cases {
            let v = trusted.verify(&with_headers(&headers));
            assert_eq!(v.outcome, want, "{headers}\n{v}");
            assert_eq!(v.from_domain, "example.org");
        }
    }
}
