//! Which address an HTTP request came from: the TCP peer, or, when the peer is one of the
//! configured `trusted_proxies`, the client that proxy forwarded for (`X-Forwarded-For`,
//! else `Forwarded: for=`). Rate limits, login throttling and the audit log all ask
//! [`client_ip`], so they agree on the address.
//!
//! Forwarding headers from any other peer are ignored entirely: a client must not be able
//! to choose the address it is counted and recorded under. This module only reads headers;
//! it decides nothing about what the address is used for.

use crate::config::IpNet;
use crate::Hub;
use axum::extract::ConnectInfo;
use axum::http::header::{HeaderMap, FORWARDED};
use axum::http::request::Parts;
use std::net::{IpAddr, SocketAddr};

/// The de-facto header most proxies (nginx, HAProxy, Traefik, Caddy, cloud balancers) send.
pub const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client address of a request: `None` when it did not come over TCP (handler tests
/// driven with `oneshot`), else as [`forwarded_client`] decides from the TCP peer.
pub(crate) fn client_ip(hub: &Hub, parts: &Parts) -> Option<IpAddr> {
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>()?.0.ip();
    Some(forwarded_client(peer, &parts.headers, &hub.config.trusted_proxies))
}

/// The client address behind `peer`. Unless `peer` is in `trusted`, that is `peer` itself.
/// Otherwise it is the right-most address of the forwarding chain that is not itself a
/// trusted proxy: each proxy appends the address it saw, so everything left of the first
/// untrusted hop may have been written by the client and is not believed. The chain is
/// `X-Forwarded-For` (all its headers, in order) if present, else the `for=` parameters of
/// `Forwarded`. An entry that is not an address (`unknown`, an obfuscated `_name`) where the
/// client should be yields the last trusted hop; a chain of only trusted proxies yields its
/// left-most entry.
pub fn forwarded_client(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let chain = forwarding_chain(headers);
    let mut last_trusted = peer;
    for entry in chain.iter().rev() {
        match entry {
            Some(ip) if is_trusted(*ip) => last_trusted = *ip,
            Some(ip) => return *ip,
            None => return last_trusted,
        }
    }
    last_trusted
}

/// The forwarded-for entries, left (farthest from the hub) to right; `None` for an entry
/// that is not an IP address.
fn forwarding_chain(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let values = |name| headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    let xff = values(X_FORWARDED_FOR);
    if !xff.is_empty() {
        return xff.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|e| !e.is_empty()).map(parse_node).collect();
    }
    values(FORWARDED.as_str())
        .iter()
        .flat_map(|v| v.split(','))
        .filter_map(|element| {
            element.split(';').filter_map(|pair| pair.trim().split_once('=')).find(|(key, _)| key.trim().eq_ignore_ascii_case("for")).map(|(_, value)| value)
        })
        .map(|value| parse_node(value.trim().trim_matches('"')))
        .collect()
}

/// An address as proxies write it: `192.0.2.7`, `192.0.2.7:4711`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:4711`.
fn parse_node(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some(addr.ip());
    }
    text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address() {
        let spoofed = headers(&[("x-forwarded-for", "203.0.113.9"), ("forwarded", "for=203.0.113.9")]);
        assert_eq!(forwarded_client(ip("198.51.100.4"), &spoofed, &[]), ip("198.51.100.4"));
        assert_eq!(forwarded_client(ip("198.51.100.4"), &spoofed, &nets(&["127.0.0.1", "10.0.0.0/8"])), ip("198.51.100.4"));
    }

    #[test]
    fn behind_a_trusted_proxy_the_right_most_untrusted_address_is_the_client() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let one = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &one, &trusted), ip("203.0.113.9"));
        // The client prepended a fake address; the proxy appended the real one.
        let prepended = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.9")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &prepended, &trusted), ip("203.0.113.9"));
        // Two trusted proxies in a row are skipped.
        let chained = headers(&[("x-forwarded-for", "1.2.3.4"), ("x-forwarded-for", "203.0.113.9, 10.1.2.3")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &chained, &trusted), ip("203.0.113.9"));
        // Only trusted hops: the farthest one is the client.
        let internal = headers(&[("x-forwarded-for", "10.9.9.9, 10.1.2.3")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &internal, &trusted), ip("10.9.9.9"));
        // No header: the proxy itself.
        assert_eq!(forwarded_client(ip("127.0.0.1"), &HeaderMap::new(), &trusted), ip("127.0.0.1"));
    }

    #[test]
    fn forwarded_for_is_read_when_there_is_no_x_forwarded_for() {
        let trusted = nets(&["::1", "127.0.0.1"]);
        let standard = headers(&[("forwarded", "for=1.2.3.4, for=\"[2001:db8:cafe::17]:4711\";proto=https;by=10.0.0.1")]);
        assert_eq!(forwarded_client(ip("::1"), &standard, &trusted), ip("2001:db8:cafe::17"));
        let mixed_case = headers(&[("forwarded", "proto=https;For=198.51.100.7:8080")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &mixed_case, &trusted), ip("198.51.100.7"));
        // With both, X-Forwarded-For wins.
        let both = headers(&[("forwarded", "for=198.51.100.7"), ("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &both, &trusted), ip("203.0.113.9"));
    }

    #[test]
    fn an_entry_that_is_not_an_address_yields_the_last_trusted_hop() {
        let trusted = nets(&["127.0.0.1", "10.0.0.0/8"]);
        let hidden = headers(&[("forwarded", "for=_hidden, for=10.1.2.3")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &hidden, &trusted), ip("10.1.2.3"));
        let unknown = headers(&[("x-forwarded-for", "unknown")]);
        assert_eq!(forwarded_client(ip("127.0.0.1"), &unknown, &trusted), ip("127.0.0.1"));
    }

    #[test]
    fn a_dual_stack_peer_matches_its_ipv4_network() {
        let forwarded = headers(&[("x-forwarded-for", "[2001:db8::5]:1234")]);
        assert_eq!(forwarded_client(ip("::ffff:127.0.0.1"), &forwarded, &nets(&["127.0.0.1"])), ip("2001:db8::5"));
    }
}
