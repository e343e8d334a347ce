//! Addresses of a policy: `match.address` prefixes, backend `IP:port`s and interface names.
//! Pure functions, unit tested.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::classify::{ADDR_LEN, V4_MAPPED_PREFIX, v4_mapped};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("`{0}` is not an IPv4 or IPv6 address or CIDR (e.g. 198.18.0.0/24)")]
    Invalid(String),
    #[error("prefix length /{len} is longer than the {max} bits of an {family} address")]
    PrefixTooLong {
        len: u32,
        max: u32,
        family: &'static str,
    },
    #[error("host bits are set in {given}; did you mean the network {network}?")]
    HostBitsSet { given: String, network: Cidr },
    #[error(
        "IPv4-mapped IPv6 addresses are matched as IPv4; write the IPv4 form (e.g. 198.18.0.1)"
    )]
    V4Mapped,
    #[error("DNS names are not supported in v1; use an IP address")]
    DnsName,
    #[error("`{0}` is not IP:port; expected e.g. 198.18.0.10:8080 or [2001:db8::10]:8080")]
    NotSocketAddr(String),
    #[error("IPv6 backend addresses need brackets: [{0}]:PORT")]
    Ipv6NeedsBrackets(String),
    #[error("port must be between 1 and 65535")]
    Port,
    #[error("a backend must be a unicast address, not {0}")]
    NotUnicast(IpAddr),
}

/// An address prefix with no host bits set (`198.18.0.0/24`, `2001:db8::/32`; a bare
/// address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

/// `0.0.0.0/0`; a placeholder for a missing or wrong address (validation reports it).
impl Default for Cidr {
    fn default() -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            prefix_len: 0,
        }
    }
}

/// `addr` with every bit past `len` cleared.
fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(u32::from(a) & m))
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(a) & m))
        }
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

impl Cidr {
    /// `::ffff:0:0/96`: where IPv4 addresses live in the classifier's key space.
    pub const V4_MAPPED_RANGE: Cidr = Cidr {
        addr: IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)),
        prefix_len: 96,
    };

    /// A prefix; refuses lengths past the address and set host bits.
    pub fn new(addr: IpAddr, prefix_len: u32) -> Result<Cidr, AddrError> {
        let max = max_len(&addr);
        let len = u8::try_from(prefix_len).ok().filter(|l| *l <= max).ok_or(
            AddrError::PrefixTooLong {
                len: prefix_len,
                max: u32::from(max),
                family: if addr.is_ipv4() { "IPv4" } else { "IPv6" },
            },
        )?;
        let network = mask(addr, len);
        if network != addr {
            return Err(AddrError::HostBitsSet {
                given: format!("{addr}/{prefix_len}"),
                network: Cidr {
                    addr: network,
                    prefix_len: len,
                },
            });
        }
        Ok(Cidr {
            addr,
            prefix_len: len,
        })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix_len) == self.addr
    }

    /// Every prefix that covers this one, from the shortest (`/0`) to itself.
    pub fn covering(&self) -> impl Iterator<Item = Cidr> + use<> {
        let addr = self.addr;
        (0..=self.prefix_len).map(move |len| Cidr {
            addr: mask(addr, len),
            prefix_len: len,
        })
    }

    /// Whether every address of `other` is in `self` (a prefix covers itself). Prefixes of
    /// different families never cover each other.
    pub fn covers(&self, other: &Cidr) -> bool {
        other.prefix_len >= self.prefix_len && self.contains(other.addr)
    }

    /// Key of the classifier's LPM trie: 16 address bytes (IPv4 mapped as `::ffff:a.b.c.d`)
    /// and the prefix length in that space (IPv4: 96 + len).
    pub fn trie_key(&self) -> ([u8; ADDR_LEN], u32) {
        match self.addr {
            IpAddr::V4(a) => (
                v4_mapped(a.octets()),
                V4_MAPPED_PREFIX + u32::from(self.prefix_len),
            ),
            IpAddr::V6(a) => (a.octets(), u32::from(self.prefix_len)),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Parses `match.address`: an address or a CIDR. IPv4-mapped IPv6 prefixes are refused: the
/// datapath keys IPv4 in that range, so they would silently act as IPv4 matches.
pub fn parse_cidr(text: &str) -> Result<Cidr, AddrError> {
    let invalid = || AddrError::Invalid(text.to_owned());
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => {
            if l.is_empty() || !l.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid());
            }
            let a: IpAddr = a.parse().map_err(|_| invalid())?;
            let l = l.parse::<u32>().unwrap_or(u32::MAX);
            (a, l)
        }
        None => {
            let a: IpAddr = text.parse().map_err(|_| invalid())?;
            (a, u32::from(max_len(&a)))
        }
    };
    let cidr = Cidr::new(addr, len)?;
    if let IpAddr::V6(a) = addr
        && a.to_ipv4_mapped().is_some()
        && Cidr::V4_MAPPED_RANGE.covers(&cidr)
    {
        return Err(AddrError::V4Mapped);
    }
    Ok(cidr)
}

/// Whether a host part that is not an IP address looks like a DNS name, so the error can say
/// what is wrong instead of "invalid".
fn looks_like_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && host.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Parses a backend address: `IP:port` or `[IPv6]:port`, unicast only. No DNS in v1: a name
/// would have to be re-resolved and its answers reconciled, which the agent does not do yet.
pub fn parse_backend(text: &str) -> Result<SocketAddr, AddrError> {
    let not_socket = || AddrError::NotSocketAddr(text.to_owned());
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(not_socket)?;
        let port = after.strip_prefix(':').ok_or_else(not_socket)?;
        (host, port)
    } else {
        match text.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(if text.parse::<Ipv6Addr>().is_ok() {
                    AddrError::Ipv6NeedsBrackets(text.to_owned())
                } else if host.parse::<Ipv6Addr>().is_ok() {
                    AddrError::Ipv6NeedsBrackets(host.to_owned())
                } else {
                    not_socket()
                });
            }
            Some(parts) => parts,
            None if looks_like_dns_name(text) && text.parse::<IpAddr>().is_err() => {
                return Err(AddrError::DnsName);
            }
            None => return Err(not_socket()),
        }
    };
    let ip: IpAddr = match host.parse() {
        Ok(ip) => ip,
        Err(_) if looks_like_dns_name(host) => return Err(AddrError::DnsName),
        Err(_) => return Err(not_socket()),
    };
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(not_socket());
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or(AddrError::Port)?;
    let unicast = match ip {
        IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
        IpAddr::V6(a) => !(a.is_unspecified() || a.is_multicast()),
    };
    if !unicast {
        return Err(AddrError::NotUnicast(ip));
    }
    Ok(SocketAddr::new(ip, port))
}

/// Linux accepts an interface name when it is 1 to 15 bytes (`IFNAMSIZ` - 1), not `.` or
/// `..`, and free of `/`, `:` and whitespace (`dev_valid_name` in net/core/dev.c).
pub fn check_interface_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "interface name `{name}` is {} bytes; Linux allows at most 15",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("`{name}` is not a valid interface name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "interface name `{}` contains {c:?}, which Linux does not allow",
            name.escape_debug()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        parse_cidr(s).unwrap()
    }

    #[test]
    fn parses_addresses_and_prefixes() {
        assert_eq!(cidr("198.18.0.2").prefix_len(), 32);
        assert_eq!(cidr("198.18.0.0/15").to_string(), "198.18.0.0/15");
        assert_eq!(cidr("2001:db8::1").prefix_len(), 128);
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("0.0.0.0/0").prefix_len(), 0);
        assert_eq!(cidr("::/0").prefix_len(), 0);
    }

    #[test]
    fn refuses_bad_prefixes() {
        assert_eq!(
            parse_cidr("10.0.0.0/33"),
            Err(AddrError::PrefixTooLong {
                len: 33,
                max: 32,
                family: "IPv4"
            })
        );
        assert!(matches!(
            parse_cidr("2001:db8::/129"),
            Err(AddrError::PrefixTooLong { max: 128, .. })
        ));
        assert!(matches!(
            parse_cidr("10.0.0.0/99999999999"),
            Err(AddrError::PrefixTooLong { .. })
        ));
        let e = parse_cidr("198.18.0.7/24").unwrap_err();
        assert_eq!(
            e.to_string(),
            "host bits are set in 198.18.0.7/24; did you mean the network 198.18.0.0/24?"
        );
        assert!(matches!(
            parse_cidr("2001:db8::1/64"),
            Err(AddrError::HostBitsSet { .. })
        ));
        for bad in [
            "",
            "/24",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0/8",
            "host",
            "10.0.0.0/a",
        ] {
            assert!(
                matches!(parse_cidr(bad), Err(AddrError::Invalid(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_cidr("::ffff:198.18.0.1"), Err(AddrError::V4Mapped));
        assert_eq!(parse_cidr("::ffff:0:0/96"), Err(AddrError::V4Mapped));
        // A shorter IPv6 prefix that covers the mapped range is a real IPv6 prefix.
        assert!(parse_cidr("::/64").is_ok());
    }

    #[test]
    fn covering() {
        let net = cidr("198.18.0.0/24");
        assert!(net.covers(&cidr("198.18.0.2/32")));
        assert!(net.covers(&net));
        assert!(!cidr("198.18.0.2/32").covers(&net));
        assert!(!net.covers(&cidr("198.18.1.0/24")));
        assert!(!cidr("0.0.0.0/0").covers(&cidr("2001:db8::/32")));
        assert!(!cidr("::/0").covers(&cidr("198.18.0.0/24")));
        assert!(cidr("::/0").covers(&cidr("2001:db8::/32")));
        let covering: Vec<Cidr> = cidr("198.18.0.2/32").covering().collect();
        assert_eq!(covering.len(), 33);
        assert_eq!(covering[0], cidr("0.0.0.0/0"));
        assert_eq!(covering[15], cidr("198.18.0.0/15"));
        assert_eq!(covering[32], cidr("198.18.0.2/32"));
        assert!(covering.iter().all(|c| c.covers(&cidr("198.18.0.2/32"))));
        assert_eq!(cidr("2001:db8::/32").covering().count(), 33);
    }

    #[test]
    fn trie_keys() {
        let (addr, len) = cidr("198.18.0.0/24").trie_key();
        assert_eq!(len, 120);
        assert_eq!(addr, v4_mapped([198, 18, 0, 0]));
        let (addr, len) = cidr("2001:db8::/32").trie_key();
        assert_eq!(len, 32);
        assert_eq!(&addr[..4], &[0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn backends() {
        assert_eq!(
            parse_backend("198.18.1.1:8080"),
            Ok("198.18.1.1:8080".parse().unwrap())
        );
        assert_eq!(
            parse_backend("[2001:db8::1]:443"),
            Ok("[2001:db8::1]:443".parse().unwrap())
        );
        assert_eq!(parse_backend("backend.local:80"), Err(AddrError::DnsName));
        assert_eq!(parse_backend("localhost"), Err(AddrError::DnsName));
        assert_eq!(parse_backend("198.18.1.1:0"), Err(AddrError::Port));
        assert_eq!(parse_backend("198.18.1.1:70000"), Err(AddrError::Port));
        assert!(matches!(
            parse_backend("198.18.1.1"),
            Err(AddrError::NotSocketAddr(_))
        ));
        assert!(matches!(
            parse_backend("198.18.1.1:"),
            Err(AddrError::NotSocketAddr(_))
        ));
        assert!(matches!(
            parse_backend("2001:db8::1:80"),
            Err(AddrError::Ipv6NeedsBrackets(_))
        ));
        assert!(matches!(
            parse_backend("[2001:db8::1]"),
            Err(AddrError::NotSocketAddr(_))
        ));
        assert!(matches!(
            parse_backend("0.0.0.0:80"),
            Err(AddrError::NotUnicast(_))
        ));
        assert!(matches!(
            parse_backend("[ff02::1]:80"),
            Err(AddrError::NotUnicast(_))
        ));
        assert!(matches!(
            parse_backend("1.2.3.4.5:80"),
            Err(AddrError::NotSocketAddr(_))
        ));
    }

    #[test]
    fn interface_names() {
        assert!(check_interface_name("eth0").is_ok());
        assert!(check_interface_name("veth-agent").is_ok());
        assert!(check_interface_name("123456789012345").is_ok());
        assert!(check_interface_name("1234567890123456").is_err());
        assert!(check_interface_name("").is_err());
        assert!(check_interface_name("..").is_err());
        assert!(check_interface_name("eth0:1").is_err());
        assert!(check_interface_name("a b").is_err());
        assert!(check_interface_name("a/b").is_err());
    }
}
