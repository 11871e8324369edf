//! Durations as Istio writes them: `"1.5s"`, `"200ms"`, `"1h30m"`.
//!
//! The accepted grammar is Go's `time.ParseDuration` (what istioctl and the
//! Istio API server accept): a sequence of decimal numbers, each with an
//! optional fraction and a unit suffix `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`.
//! Negative durations are rejected: no mesh field means anything with them.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A non-negative duration written as a string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("negative duration {0:?}")]
    Negative(String),
    #[error(
        "invalid duration {input:?}: {reason} (write it like \"1.5s\", \"200ms\" or \"1h30m\")"
    )]
    Invalid { input: String, reason: &'static str },
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl Duration {
    pub const ZERO: Duration = Duration(std::time::Duration::ZERO);

    pub fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }

    pub fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }

    pub fn as_std(&self) -> std::time::Duration {
        self.0
    }

    /// Parses Go's duration syntax.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        if s.starts_with('-') {
            return Err(DurationError::Negative(input.to_string()));
        }
        let s = s.strip_prefix('+').unwrap_or(s);
        if s == "0" {
            return Ok(Duration::ZERO);
        }
        let invalid = |reason| DurationError::Invalid {
            input: input.to_string(),
            reason,
        };
        let mut total_nanos: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
            let (int_part, after) = rest.split_at(int_len);
            let (frac_part, after) = match after.strip_prefix('.') {
                Some(a) => {
                    let n = a.bytes().take_while(u8::is_ascii_digit).count();
                    a.split_at(n)
                }
                None => ("", after),
            };
            if int_part.is_empty() && frac_part.is_empty() {
                return Err(invalid("expected a number"));
            }
            let unit_len = after
                .char_indices()
                .find(|(_, c)| c.is_ascii_digit() || *c == '.')
                .map_or(after.len(), |(i, _)| i);
            let (unit, next) = after.split_at(unit_len);
            let unit_nanos: u128 = match unit {
                "ns" => 1,
                "us" | "µs" | "μs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3_600 * 1_000_000_000,
                "" => return Err(invalid("missing unit")),
                _ => return Err(invalid("unknown unit")),
            };
            let int: u128 = if int_part.is_empty() {
                0
            } else {
                int_part
                    .parse()
                    .map_err(|_| DurationError::Overflow(input.to_string()))?
            };
            let mut nanos = int
                .checked_mul(unit_nanos)
                .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
            // Fractions finer than a nanosecond are dropped, as Go does.
            let mut scale = unit_nanos;
            for d in frac_part.bytes().take(18) {
                scale /= 10;
                nanos += u128::from(d - b'0') * scale;
            }
            total_nanos = total_nanos
                .checked_add(nanos)
                .ok_or_else(|| DurationError::Overflow(input.to_string()))?;
            rest = next;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000)
            .map_err(|_| DurationError::Overflow(input.to_string()))?;
        let sub = (total_nanos % 1_000_000_000) as u32;
        Ok(Duration(std::time::Duration::new(secs, sub)))
    }
}

impl fmt::Display for Duration {
    /// The shortest exact form in one unit: `5s`, `1.5s`, `200ms`, `10us`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        let (value, unit) = if nanos.is_multiple_of(1_000_000_000) {
            let s = nanos / 1_000_000_000;
            if s.is_multiple_of(3600) {
                return write!(f, "{}h", s / 3600);
            }
            if s.is_multiple_of(60) {
                return write!(f, "{}m", s / 60);
            }
            return write!(f, "{s}s");
        } else if nanos >= 1_000_000_000 {
            (nanos, 1_000_000_000u128)
        } else if nanos.is_multiple_of(1_000_000) || nanos >= 1_000_000 {
            (nanos, 1_000_000)
        } else if nanos.is_multiple_of(1_000) || nanos >= 1_000 {
            (nanos, 1_000)
        } else {
            (nanos, 1)
        };
        let suffix = match unit {
            1_000_000_000 => "s",
            1_000_000 => "ms",
            1_000 => "us",
            _ => "ns",
        };
        let whole = value / unit;
        let frac = value % unit;
        if frac == 0 {
            write!(f, "{whole}{suffix}")
        } else {
            let width = unit.ilog10() as usize;
            let digits = format!("{frac:0width$}");
            write!(f, "{whole}.{}{suffix}", digits.trim_end_matches('0'))
        }
    }
}

impl std::str::FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Duration::parse(s)
    }
}

impl From<std::time::Duration> for Duration {
    fn from(d: std::time::Duration) -> Self {
        Duration(d)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor, so that errors point at the value itself.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"1.5s\" or \"200ms\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
                Duration::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as \"1.5s\", \"200ms\" or \"1h30m\".",
            "pattern": "^([0-9]+(\\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$|^0$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_forms() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(Duration::parse("1.5s").unwrap(), ms(1500));
        assert_eq!(Duration::parse("200ms").unwrap(), ms(200));
        assert_eq!(Duration::parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(Duration::parse("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(Duration::parse("0").unwrap(), Duration::ZERO);
        assert_eq!(Duration::parse(".5s").unwrap(), ms(500));
        assert_eq!(
            Duration::parse("10us").unwrap().0,
            std::time::Duration::from_micros(10)
        );
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        assert_eq!(Duration::parse(""), Err(DurationError::Empty));
        assert!(matches!(
            Duration::parse("-1s"),
            Err(DurationError::Negative(_))
        ));
        assert!(matches!(
            Duration::parse("5"),
            Err(DurationError::Invalid {
                reason: "missing unit",
                ..
            })
        ));
        assert!(matches!(
            Duration::parse("5 sec"),
            Err(DurationError::Invalid { .. })
        ));
        assert!(matches!(
            Duration::parse("s"),
            Err(DurationError::Invalid { .. })
        ));
        assert!(matches!(
            Duration::parse("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "5s", "1.5s", "200ms", "1h", "90s", "2m", "10us", "7ns", "1.25ms", "0s",
        ] {
            let d = Duration::parse(s).unwrap();
            assert_eq!(Duration::parse(&d.to_string()).unwrap(), d, "{s}");
        }
        assert_eq!(Duration::parse("1m30s").unwrap().to_string(), "90s");
        assert_eq!(Duration::parse("1.5s").unwrap().to_string(), "1.5s");
        assert_eq!(Duration::parse("0.2s").unwrap().to_string(), "200ms");
    }
}
