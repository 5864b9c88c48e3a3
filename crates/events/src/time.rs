//! How this crate writes instants: RFC 3339 in UTC with a `Z` (e.g.
//! `2026-12-01T08:00:00Z`), in dedup keys, history lines and the manifest, so
//! one instant always has one spelling. It owns formatting only; it must not
//! read the clock.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer, de};

/// `t` as RFC 3339 UTC: whole seconds print without a fraction.
pub(crate) fn format_utc(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn parse_utc<E: de::Error>(s: &str) -> Result<DateTime<Utc>, E> {
    DateTime::parse_from_rfc3339(s).map(|t| t.to_utc()).map_err(E::custom)
}

/// Serde adapter for `DateTime<Utc>` fields.
pub(crate) mod utc {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_utc(*t))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        parse_utc(&String::deserialize(d)?)
    }
}

/// Serde adapter for `Option<DateTime<Utc>>` fields (`null` when absent).
pub(crate) mod utc_opt {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&format_utc(*t)),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?.map(|s| parse_utc(&s)).transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_with_z_and_only_needed_fractions() {
        let t: DateTime<Utc> = "2026-12-01T09:00:00+01:00".parse().unwrap();
        assert_eq!(format_utc(t), "2026-12-01T08:00:00Z");
        let t: DateTime<Utc> = "2026-12-01T08:00:00.250Z".parse().unwrap();
        assert_eq!(format_utc(t), "2026-12-01T08:00:00.250Z");
    }
}
