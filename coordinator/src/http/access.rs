//! Who may use the HTTP side, and how a browser proves it.
//!
//! - API clients send `Authorization: Bearer <user token>` with every request.
//! - The page signs in once (`POST /login` with the token) and gets a **session
//!   cookie** that is not the token: `v1.<expiry>.<nonce>.<mac>`, signed with a key
//!   derived from the token (so every coordinator replica, and a restarted one,
//!   accepts it, and a new token ends every session), `HttpOnly`, `SameSite=Strict`,
//!   `Secure` under TLS, expiring after [`HttpLimits::session_ttl`].
//! - A form the page posts carries a **CSRF token** bound to the session: a forged
//!   cross-site form has the cookie (if `SameSite` did not stop it) but not the token.
//! - A state-changing request whose `Origin` (or `Sec-Fetch-Site`) says another site
//!   is refused, with or without a token configured.
//! - `/login` takes [`HttpLimits::logins_per_minute`] attempts per client address.
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, Method, Uri};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use defuse_proto::auth::{bearer_token, token_matches};

#[allow(unused_imports)] // named in the docs
use crate::state::HttpLimits;

/// The page's session cookie.
pub const SESSION_COOKIE: &str = "defuse_session";
/// The hidden form field (or `X-CSRF-Token` header) that carries the CSRF token.
pub const CSRF_FIELD: &str = "csrf";

type HmacSha256 = Hmac<Sha256>;

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The coordinator has no token: everyone is let in.
    Open,
    /// `Authorization: Bearer` with the user token (no CSRF check: a browser never
    /// adds that header on its own).
    Bearer,
    /// The page's session cookie; its CSRF token is [`Sessions::csrf`] of this nonce.
    Session { nonce: String },
}

/// The page's sessions: signing, checking, CSRF tokens. Holds no per-session state
/// (a cookie carries its own expiry and signature), so nothing is lost on a restart.
pub struct Sessions {
    /// HMAC key derived from the user token; `None` when the coordinator has none.
    key: Option<[u8; 32]>,
    token: Option<String>,
    ttl: Duration,
}

fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
        m.update(b"\n");
    }
    m
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Sessions {
    pub fn new(token: Option<&str>, ttl: Duration) -> Sessions {
        let key = token.map(|t| {
            let out = mac(t.as_bytes(), &[b"defuse page session key v1"]).finalize();
            let mut k = [0u8; 32];
            k.copy_from_slice(&out.into_bytes());
            k
        });
        Sessions {
            key,
            token: token.map(String::from),
            ttl,
        }
    }

    /// Whether sign-in is needed at all.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// Whether `given` is the user token.
    pub fn token_ok(&self, given: &str) -> bool {
        self.token
            .as_deref()
            .is_some_and(|t| token_matches(t, given.trim()))
    }

    /// A new session cookie's value, valid until `now + ttl`.
    pub fn issue(&self) -> Option<String> {
        self.issue_at(now_s())
    }

    fn issue_at(&self, now: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let nonce = hex(&rand::random::<[u8; 16]>());
        let expiry = (now + self.ttl.as_secs()).to_string();
        let sig = mac(key, &[b"v1", expiry.as_bytes(), nonce.as_bytes()])
            .finalize()
            .into_bytes();
        Some(format!("v1.{expiry}.{nonce}.{}", hex(&sig)))
    }

    /// The nonce of a session cookie that is well signed and not expired at `now`.
    fn check_at(&self, value: &str, now: u64) -> Option<String> {
        let key = self.key.as_ref()?;
        let mut it = value.split('.');
        let (v, expiry, nonce, sig) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if v != "v1" || it.next().is_some() || nonce.len() != 32 {
            return None;
        }
        let sig = unhex(sig)?;
        mac(key, &[b"v1", expiry.as_bytes(), nonce.as_bytes()])
            .verify_slice(&sig)
            .ok()?;
        (expiry.parse::<u64>().ok()? > now).then(|| nonce.to_string())
    }

    /// The CSRF token of a session (what its forms carry).
    pub fn csrf(&self, nonce: &str) -> String {
        match &self.key {
            Some(key) => hex(&mac(key, &[b"csrf", nonce.as_bytes()])
                .finalize()
                .into_bytes()),
            None => String::new(),
        }
    }

    /// Whether `given` is the CSRF token of the caller's session (callers that are
    /// not sessions need none).
    pub fn csrf_ok(&self, caller: &Caller, given: Option<&str>) -> bool {
        match caller {
            Caller::Open | Caller::Bearer => true,
            Caller::Session { nonce } => given.is_some_and(|g| {
                let want = self.csrf(nonce);
                token_matches(&want, g)
            }),
        }
    }

    /// Who the request is, or `Err(given)`: whether some credential was sent (a wrong
    /// one) or none.
    pub fn caller(&self, h: &HeaderMap) -> Result<Caller, bool> {
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        let bearer = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if let Some(t) = bearer {
            return if self.token_ok(t) {
                Ok(Caller::Bearer)
            } else {
                Err(true)
            };
        }
        let now = now_s();
        let mut sent = false;
        for c in cookies(h) {
            if c.name() == SESSION_COOKIE {
                sent = true;
                if let Some(nonce) = self.check_at(c.value(), now) {
                    return Ok(Caller::Session { nonce });
                }
            }
        }
        Err(sent)
    }

    /// The `Set-Cookie` value of a new session (`secure` under TLS).
    pub fn cookie(&self, value: String, secure: bool) -> String {
        cookie::Cookie::build((SESSION_COOKIE, value))
            .path("/")
            .http_only(true)
            .same_site(cookie::SameSite::Strict)
            .secure(secure)
            .max_age(cookie::time::Duration::seconds(
                i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX),
            ))
            .build()
            .to_string()
    }

    /// The `Set-Cookie` value that ends the session in the browser.
    pub fn clear_cookie(secure: bool) -> String {
        cookie::Cookie::build((SESSION_COOKIE, ""))
            .path("/")
            .http_only(true)
            .same_site(cookie::SameSite::Strict)
            .secure(secure)
            .max_age(cookie::time::Duration::ZERO)
            .build()
            .to_string()
    }
}

/// The cookies of a request's `Cookie` headers (malformed pairs skipped).
fn cookies(h: &HeaderMap) -> impl Iterator<Item = cookie::Cookie<'_>> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
}

/// Whether a request comes from another site: a state-changing method whose `Origin`
/// names another host than `Host`, or whose `Sec-Fetch-Site` says `cross-site`.
/// Requests without these headers (API clients, the CLI) are not cross-site.
pub fn cross_site(method: &Method, uri: &Uri, h: &HeaderMap) -> bool {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return false;
    }
    let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
    if get("sec-fetch-site") == Some("cross-site") {
        return true;
    }
    // behind a proxy that rewrites Host, the public host is in X-Forwarded-Host (a
    // page of another site cannot set that header without asking first)
    // (HTTP/2 names the host in the URI's authority, not in a Host header)
    let hosts = [
        get("host"),
        uri.authority().map(|a| a.as_str()),
        get("x-forwarded-host").map(|h| h.split(',').next().unwrap_or("").trim()),
    ];
    match get("origin") {
        None => false,
        // "null" is what a sandboxed or file:// page sends
        Some("null") => true,
        Some(origin) => {
            let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
            !hosts
                .iter()
                .flatten()
                .any(|h| origin_host.eq_ignore_ascii_case(h))
        }
    }
}

/// Sign-in attempts per client address in the current minute: fixed windows, the
/// table pruned of old windows when it grows.
pub struct LoginLimiter {
    per_minute: u32,
    /// (window start, attempts) per address; only the HTTP handlers touch it, never
    /// across an `.await`.
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl LoginLimiter {
    pub fn new(per_minute: u32) -> LoginLimiter {
        LoginLimiter {
            per_minute: per_minute.max(1),
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt from `ip`: `Err(seconds to wait)` once over the limit.
    pub fn attempt(&self, ip: IpAddr) -> Result<(), u64> {
        self.attempt_at(ip, Instant::now())
    }

    fn attempt_at(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        const WINDOW: Duration = Duration::from_secs(60);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > 10_000 {
            seen.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let e = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(e.0) >= WINDOW {
            *e = (now, 0);
        }
        e.1 += 1;
        if e.1 > self.per_minute {
            let left = WINDOW.saturating_sub(now.duration_since(e.0));
            return Err(left.as_secs().max(1));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn a_session_cookie_is_signed_and_expires() {
        let s = Sessions::new(Some(TOKEN), Duration::from_secs(3600));
        let v = s.issue_at(1_000).unwrap();
        assert!(!v.contains(TOKEN), "the cookie must not carry the token");
        let nonce = s.check_at(&v, 1_000).expect("a fresh cookie is good");
        assert!(s.check_at(&v, 4_599).is_some());
        assert_eq!(s.check_at(&v, 4_600), None, "expired after the ttl");
        // a later expiry written in by hand breaks the signature
        let forged = v.replacen("v1.4600.", "v1.99999999.", 1);
        assert_ne!(forged, v);
        assert_eq!(s.check_at(&forged, 1_000), None);
        // another token's coordinator does not accept it
        let other = Sessions::new(
            Some("another-token-another-token-12345"),
            Duration::from_secs(3600),
        );
        assert_eq!(other.check_at(&v, 1_000), None);
        // the CSRF token is the session's
        let caller = Caller::Session {
            nonce: nonce.clone(),
        };
        assert!(s.csrf_ok(&caller, Some(&s.csrf(&nonce))));
        assert!(!s.csrf_ok(&caller, None));
        assert!(!s.csrf_ok(&caller, Some(&s.csrf("0".repeat(32).as_str()))));
        assert!(s.csrf_ok(&Caller::Bearer, None));
    }

    #[test]
    fn the_cookie_has_its_flags() {
        let s = Sessions::new(Some(TOKEN), Duration::from_secs(7200));
        let c = s.cookie("v".into(), true);
        for flag in [
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=7200",
            "Path=/",
        ] {
            assert!(c.contains(flag), "{flag} missing: {c}");
        }
        assert!(!s.cookie("v".into(), false).contains("Secure"));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let post = Method::POST;
        let root: Uri = "/".parse().unwrap();
        assert!(!cross_site(&post, &root, &h(&[("host", "a:8080")])));
        assert!(!cross_site(
            &post,
            &root,
            &h(&[("host", "a:8080"), ("origin", "http://a:8080")])
        ));
        assert!(cross_site(
            &post,
            &root,
            &h(&[("host", "a:8080"), ("origin", "https://evil.example")])
        ));
        assert!(cross_site(
            &post,
            &root,
            &h(&[("host", "a:8080"), ("origin", "null")])
        ));
        assert!(cross_site(
            &post,
            &root,
            &h(&[("sec-fetch-site", "cross-site")])
        ));
        // HTTP/2: the host is the URI's authority
        let h2: Uri = "https://a:8443/api/jobs".parse().unwrap();
        assert!(!cross_site(&post, &h2, &h(&[("origin", "https://a:8443")])));
        assert!(cross_site(&post, &h2, &h(&[("origin", "https://b:8443")])));
        // a proxy that rewrites Host passes the public one on
        assert!(!cross_site(
            &post,
            &root,
            &h(&[
                ("host", "defuse.svc:8080"),
                ("x-forwarded-host", "defuse.example.com"),
                ("origin", "https://defuse.example.com")
            ])
        ));
        assert!(!cross_site(
            &Method::GET,
            &root,
            &h(&[("host", "a"), ("origin", "http://b")])
        ));
    }

    #[test]
    fn sign_in_attempts_are_limited_per_address() {
        let l = LoginLimiter::new(3);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.attempt_at(a, t0).is_ok());
        }
        assert!(l.attempt_at(a, t0 + Duration::from_secs(1)).is_err());
        assert!(
            l.attempt_at(b, t0).is_ok(),
            "another address has its own count"
        );
        assert!(
            l.attempt_at(a, t0 + Duration::from_secs(61)).is_ok(),
            "a new minute"
        );
    }
}
