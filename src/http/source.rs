//! Where a callback came from: the connection's peer, or, behind a reverse proxy named by
//! `--trusted-proxy`, the address that proxy reports in `X-Forwarded-For`.
//!
//! `X-Forwarded-For` lists what each hop saw, each proxy appending its own peer on the right.
//! Only the entries written by proxies we trust can be believed, so the list is read from the
//! right for as long as the address being looked at is a trusted proxy; the first one that is
//! not is the source. Its leftmost entries are whatever the sender chose to write, which is why
//! an entry is believed only when every entry right of it names a trusted proxy (so it was
//! written by one), and why the header is ignored altogether when the peer itself is not trusted.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// The most `X-Forwarded-For` entries read, so that a long header costs bounded work.
const MAX_HOPS: usize = 32;

/// The source of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The address `--allow-from` is checked against (IPv4-mapped IPv6 made plain IPv4); `None`
    /// when a trusted proxy forwarded the request but its `X-Forwarded-For` could not be read
    /// far enough to name the sender (an unreadable entry, or more hops than are read): refused
    /// by any `--allow-from`, never taken to be the proxy itself.
    pub ip: Option<IpAddr>,
    /// As stored in the delivery log and the rejection and quarantine records: the peer's
    /// `ip:port`, the forwarded address (a proxy does not report the port), or `unknown`.
    pub text: String,
    /// The proxy that reported it, when it was forwarded.
    pub via: Option<SocketAddr>,
    /// The peer sent `X-Forwarded-For` but is not a trusted proxy, so the header was ignored:
    /// worth a hint when the request is refused (`--trusted-proxy` may be missing).
    pub ignored_forwarding: bool,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            Some(proxy) => write!(f, "{} (via {proxy})", self.text),
            None => f.write_str(&self.text),
        }
    }
}

/// The source of a request that arrived from `peer` with `headers`, believing `X-Forwarded-For`
/// only as far as it was written by `trusted` proxies.
///
/// From a trusted proxy: without the header, the proxy itself (a local tool posting directly);
/// with it, the rightmost entry that is not a trusted proxy, or the leftmost entry when all are
/// (an internal sender); unknown when the walk meets an entry that is not an address before it
/// finds one of those, or runs past [`MAX_HOPS`]. Entries are decoded one by one, so a byte
/// that is not text in an entry a sender wrote spoils that entry only.
pub fn resolve(trusted: &[IpNet], peer: SocketAddr, headers: &HeaderMap) -> Source {
    let peer_ip = peer.ip().to_canonical();
    let forwarded = headers.get_all("x-forwarded-for");
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let direct =
        |ignored_forwarding| Source { ip: Some(peer_ip), text: peer.to_string(), via: None, ignored_forwarding };
    if !is_trusted(&peer_ip) {
        return direct(forwarded.iter().next().is_some());
    }
    if forwarded.iter().next().is_none() {
        return direct(false);
    }
    // Several header lines are one list, in order (RFC 9110 §5.3).
    let entries: Vec<&[u8]> = forwarded.iter().flat_map(|line| line.as_bytes().split(|b| *b == b',')).collect();
    let forwarded_from = |ip: Option<IpAddr>| Source {
        ip,
        text: ip.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string()),
        via: Some(peer),
        ignored_forwarding: false,
    };
    for (read, entry) in entries.iter().rev().enumerate() {
        if read == MAX_HOPS {
            return forwarded_from(None);
        }
        let Some(ip) = parse_hop(entry) else {
            return forwarded_from(None);
        };
        if !is_trusted(&ip) || read + 1 == entries.len() {
            return forwarded_from(Some(ip));
        }
    }
    forwarded_from(None)
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_hop(entry: &[u8]) -> Option<IpAddr> {
    let entry = std::str::from_utf8(entry).ok()?.trim();
    let ip = entry.parse::<IpAddr>().ok().or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().expect("a CIDR")).collect()
    }

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append("x-forwarded-for", line.parse().expect("a header value"));
        }
        h
    }

    fn peer(s: &str) -> SocketAddr {
        s.parse().expect("a socket address")
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().expect("an address"))
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_source_whatever_the_header_says() {
        let s = resolve(&[], peer("127.0.0.1:4000"), &headers(&["203.0.113.7"]));
        assert_eq!(
            (s.ip, s.text.as_str(), s.via, s.ignored_forwarding),
            (ip("127.0.0.1"), "127.0.0.1:4000", None, true)
        );
        let s = resolve(&[], peer("127.0.0.1:4000"), &HeaderMap::new());
        assert!(!s.ignored_forwarding, "no header, nothing ignored");
    }

    #[test]
    fn a_peer_outside_the_trusted_networks_is_the_source() {
        let s = resolve(&nets(&["10.0.0.0/8"]), peer("198.51.100.9:5000"), &headers(&["203.0.113.7"]));
        assert_eq!(s.text, "198.51.100.9:5000");
        assert!(s.ignored_forwarding);
    }

    #[test]
    fn behind_a_trusted_proxy_the_rightmost_untrusted_entry_is_the_source() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        // The sender wrote 192.0.2.1 itself; the outer proxy (10.1.1.1) saw 203.0.113.7.
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&["192.0.2.1, 203.0.113.7, 10.1.1.1"]));
        assert_eq!(s.ip, ip("203.0.113.7"));
        assert_eq!(s.text, "203.0.113.7");
        assert_eq!(s.via, Some(peer("127.0.0.1:4000")));
        assert_eq!(s.to_string(), "203.0.113.7 (via 127.0.0.1:4000)");
    }

    #[test]
    fn several_header_lines_are_one_list_in_order() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&["192.0.2.1", "203.0.113.7, 10.1.1.1"]));
        assert_eq!(s.text, "203.0.113.7");
    }

    #[test]
    fn entries_with_ports_and_ipv4_mapped_addresses_are_read_as_plain_addresses() {
        let trusted = nets(&["127.0.0.0/8"]);
        for (entry, want) in [
            ("203.0.113.7:8443", "203.0.113.7"),
            ("[2001:db8::1]:8443", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
        ] {
            let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&[entry]));
            assert_eq!(s.text, want, "{entry}");
        }
        // The peer, too: a dual-stack listener shows an IPv4 proxy as IPv4-mapped.
        let s = resolve(&trusted, peer("[::ffff:127.0.0.1]:4000"), &headers(&["203.0.113.7"]));
        assert_eq!(s.text, "203.0.113.7");
    }

    #[test]
    fn an_entry_that_is_not_an_address_before_the_sender_makes_the_source_unknown_never_the_proxy() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        for line in ["203.0.113.7, unknown, 10.1.1.1", "203.0.113.7, _hidden", "", "  "] {
            let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&[line]));
            assert_eq!((s.ip, s.text.as_str()), (None, "unknown"), "{line:?}");
            assert_eq!(s.to_string(), "unknown (via 127.0.0.1:4000)");
        }
        // Left of the sender, nothing matters.
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&["_hidden, 203.0.113.7"]));
        assert_eq!(s.text, "203.0.113.7");
    }

    #[test]
    fn a_byte_that_is_not_text_spoils_only_its_own_entry() {
        let trusted = nets(&["127.0.0.0/8"]);
        let mut h = HeaderMap::new();
        // What nginx makes of a sender's own header with a stray byte: the proxy's entry appended.
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"203.0.113.5\xff, 198.51.100.1").expect("a value"));
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &h);
        assert_eq!(s.ip, ip("198.51.100.1"), "the proxy's entry is still read");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_bytes(b"198.51.100.1\xff").expect("a value"));
        assert_eq!(resolve(&trusted, peer("127.0.0.1:4000"), &h).ip, None);
    }

    #[test]
    fn a_trusted_proxy_without_the_header_is_the_source_and_all_trusted_hops_give_the_first() {
        let trusted = nets(&["127.0.0.0/8", "10.0.0.0/8"]);
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &HeaderMap::new());
        assert_eq!((s.text.as_str(), s.via), ("127.0.0.1:4000", None));
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&["10.2.2.2, 10.1.1.1"]));
        assert_eq!(s.text, "10.2.2.2");
    }

    #[test]
    fn more_trusted_hops_than_are_read_make_the_source_unknown() {
        let trusted = nets(&["10.0.0.0/8", "127.0.0.0/8"]);
        let mut line = String::from("203.0.113.7");
        for i in 0..MAX_HOPS {
            line.push_str(&format!(", 10.0.0.{}", i % 250 + 1));
        }
        let s = resolve(&trusted, peer("127.0.0.1:4000"), &headers(&[&line]));
        assert_eq!(s.ip, None, "stopped at the bound: {}", s.text);
        let within: String = line.split_once(", ").expect("hops").1.to_owned();
        assert_eq!(resolve(&trusted, peer("127.0.0.1:4000"), &headers(&[&within])).text, "10.0.0.1");
    }
}
