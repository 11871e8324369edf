//! The traffic-capture lists: ports and CIDRs, as `mesh-proxy init` takes
//! them in its flags and the injector takes them in pod annotations. One
//! parser for both, so a value the injector accepts is a value the init
//! container accepts.
//!
//! Lists are comma separated; blanks around items and empty items are
//! ignored, repeated items are kept once. Where everything can be captured
//! (`--inbound-ports`, `--outbound-ips`), `*` alone means everything and an
//! empty value means nothing; `*` mixed with other items is refused.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What to capture: everything, or only the listed items (an empty list
/// captures nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture<T> {
    All,
    Only(Vec<T>),
}

impl<T: fmt::Display> fmt::Display for Capture<T> {
    /// The canonical form: `*`, or the items joined by commas.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Capture::All => f.write_str("*"),
            Capture::Only(items) => f.write_str(&join(items)),
        }
    }
}

/// Items joined by commas: the canonical form of a list.
pub fn join<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Why a list was refused; the value is the item at fault (or the whole
/// list for a misplaced `*`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    #[error("{value:?} is not a port: must be an integer 1-65535")]
    InvalidPort { value: String },
    #[error("{value:?} is not a CIDR: {reason}")]
    InvalidCidr { value: String, reason: String },
    #[error("{value:?}: \"*\" must be the only value")]
    MixedWildcard { value: String },
}

/// An IP network. A bare address means a single host; host bits are
/// cleared (`10.1.2.3/8` is `10.0.0.0/8`), as iptables itself does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR[/PREFIX]`; the error is the reason.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{addr_text:?} is not an IPv4 or IPv6 address"))?;
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix = match prefix_text {
            None => max,
            Some(prefix) => parse_prefix_len(prefix, max)
                .ok_or_else(|| format!("prefix length must be 0-{max}"))?,
        };
        Ok(Cidr {
            addr: network(addr, prefix),
            prefix,
        })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn parse_prefix_len(text: &str, max: u8) -> Option<u8> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u8>().ok().filter(|&len| len <= max)
}

/// Clears the bits of `addr` after the first `prefix` bits.
fn network(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
        }
        IpAddr::V6(v6) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
    }
}

/// One port: decimal digits only (no sign, no blanks), 1-65535.
pub fn parse_port(item: &str) -> Result<u16, ListError> {
    let invalid = || ListError::InvalidPort {
        value: item.to_owned(),
    };
    if item.is_empty() || !item.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    item.parse::<u16>()
        .ok()
        .filter(|&port| port != 0)
        .ok_or_else(invalid)
}

/// One CIDR (see [`Cidr::parse`]).
pub fn parse_cidr(item: &str) -> Result<Cidr, ListError> {
    Cidr::parse(item).map_err(|reason| ListError::InvalidCidr {
        value: item.to_owned(),
        reason,
    })
}

/// The items of a comma list, trimmed, empty ones left out.
fn items(value: &str) -> impl Iterator<Item = &str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

fn list<T: PartialEq>(
    value: &str,
    parse: fn(&str) -> Result<T, ListError>,
) -> Result<Vec<T>, ListError> {
    let mut unique = Vec::new();
    for item in items(value) {
        let item = parse(item)?;
        if !unique.contains(&item) {
            unique.push(item);
        }
    }
    Ok(unique)
}

fn capture<T: PartialEq>(
    value: &str,
    parse: fn(&str) -> Result<T, ListError>,
) -> Result<Capture<T>, ListError> {
    if value.trim() == "*" {
        return Ok(Capture::All);
    }
    if items(value).any(|item| item == "*") {
        return Err(ListError::MixedWildcard {
            value: value.to_owned(),
        });
    }
    list(value, parse).map(Capture::Only)
}

/// A list of ports (`--exclude-inbound-ports`, `--include-outbound-ports`,
/// `--exclude-outbound-ports`); `*` is not a port here.
pub fn port_list(value: &str) -> Result<Vec<u16>, ListError> {
    list(value, parse_port)
}

/// Ports to capture (`--inbound-ports`): `*`, a list, or empty for none.
pub fn port_capture(value: &str) -> Result<Capture<u16>, ListError> {
    capture(value, parse_port)
}

/// A list of CIDRs (`--exclude-outbound-ips`); `*` is not a CIDR here.
pub fn cidr_list(value: &str) -> Result<Vec<Cidr>, ListError> {
    list(value, parse_cidr)
}

/// CIDRs to capture (`--outbound-ips`): `*`, a list, or empty for none.
pub fn cidr_capture(value: &str) -> Result<Capture<Cidr>, ListError> {
    capture(value, parse_cidr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(port_list(" 80, 443,,80 "), Ok(vec![80, 443]));
        assert_eq!(port_list(""), Ok(vec![]));
        for bad in [
            "*", "+80", "-1", "0", "65536", "8 0", "http", "0x50", "80.0",
        ] {
            assert!(port_list(bad).is_err(), "{bad}");
        }
        assert_eq!(
            port_list("80,+80"),
            Err(ListError::InvalidPort {
                value: "+80".into()
            })
        );
        assert_eq!(port_capture(" * "), Ok(Capture::All));
        assert_eq!(port_capture(""), Ok(Capture::Only(vec![])));
        assert_eq!(
            port_capture("9080,9090"),
            Ok(Capture::Only(vec![9080, 9090]))
        );
        assert_eq!(
            port_capture("*,80"),
            Err(ListError::MixedWildcard {
                value: "*,80".into()
            })
        );
    }

    #[test]
    fn cidrs() {
        let all = cidr_list("10.1.2.3/8, 192.168.0.1, fd00::1/64").unwrap();
        assert_eq!(join(&all), "10.0.0.0/8,192.168.0.1/32,fd00::/64");
        assert!(all[0].is_ipv4() && !all[2].is_ipv4());
        for bad in [
            "*",
            "10.0.0.1/",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "fd00::/129",
            "10.0.0",
            "host",
            "10.0.0.0/8/8",
        ] {
            assert!(cidr_list(bad).is_err(), "{bad}");
        }
        assert_eq!(cidr_capture("*"), Ok(Capture::All));
        assert!(matches!(
            cidr_capture("10.0.0.0/8,*"),
            Err(ListError::MixedWildcard { .. })
        ));
        assert_eq!(Capture::<Cidr>::All.to_string(), "*");
        assert_eq!(cidr_capture("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
    }
}
