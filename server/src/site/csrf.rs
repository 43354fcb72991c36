//! Cross-site request forgery protection for every POST form, in two layers:
//!
//! 1. A double-submit token: a random value in a cookie that only this site can set (named with
//!    the `__Host-` prefix under https) must equal the form's hidden `csrf` field.
//! 2. The browser's own word: a request whose `Origin` is not the site's, or whose
//!    `Sec-Fetch-Site` says `cross-site`, is refused before any handler runs.

use axum::http::{HeaderMap, header};
use axum_extra::extract::CookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use subtle::ConstantTimeEq;

use crate::config::Config;

/// The form field that carries the token.
pub const FIELD: &str = "csrf";

fn cookie_name(config: &Config) -> &'static str {
    if config.secure_cookies { "__Host-rp_csrf" } else { "rp_csrf" }
}

/// The request's token, creating one (and the cookie that holds it) when there is none.
pub fn ensure(config: &Config, jar: CookieJar) -> (CookieJar, String) {
    let name = cookie_name(config);
    if let Some(token) = jar.get(name).map(Cookie::value).filter(|t| t.len() == 43) {
        let token = token.to_owned();
        return (jar, token);
    }
    let token = crate::random::token();
    let cookie = Cookie::build((name, token.clone()))
        .path("/")
        .http_only(true)
        .secure(config.secure_cookies)
        .same_site(SameSite::Lax)
        .build();
    (jar.add(cookie), token)
}

/// Whether the form's token matches the cookie's.
pub fn verify(config: &Config, jar: &CookieJar, submitted: &str) -> bool {
    jar.get(cookie_name(config))
        .is_some_and(|c| c.value().len() == 43 && bool::from(c.value().as_bytes().ct_eq(submitted.as_bytes())))
}

/// Whether a request's `Origin` (when the browser sent one) is this site's own.
///
/// Without `--public-url`, the site's origin is taken from the request's `Host`: a page on
/// another site cannot choose the Host of a request it makes to this one.
pub fn same_origin(config: &Config, headers: &HeaderMap) -> bool {
    if headers.get("sec-fetch-site").is_some_and(|v| v == "cross-site") {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    if let Some(public) = &config.public_origin {
        return origin.eq_ignore_ascii_case(public);
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let authority = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn origin_is_compared_with_host_without_public_url() {
        let c = Config::new("sqlite::memory:", "static");
        assert!(same_origin(&c, &headers(&[("host", "localhost:8080")])));
        assert!(same_origin(&c, &headers(&[("host", "localhost:8080"), ("origin", "http://localhost:8080")])));
        assert!(!same_origin(&c, &headers(&[("host", "localhost:8080"), ("origin", "http://evil.test")])));
        assert!(!same_origin(&c, &headers(&[("host", "localhost:8080"), ("origin", "null")])));
        assert!(!same_origin(&c, &headers(&[("host", "localhost:8080"), ("sec-fetch-site", "cross-site")])));
    }

    #[test]
    fn origin_must_equal_the_public_url_when_set() {
        let mut c = Config::new("sqlite::memory:", "static");
        c.public_origin = Some("https://play.example.com".into());
        let ok = headers(&[("host", "internal:8080"), ("origin", "https://play.example.com")]);
        assert!(same_origin(&c, &ok));
        let bad = headers(&[("host", "internal:8080"), ("origin", "http://internal:8080")]);
        assert!(!same_origin(&c, &bad));
    }

    #[test]
    fn tokens_must_match_the_cookie() {
        let c = Config::new("sqlite::memory:", "static");
        let (jar, token) = ensure(&c, CookieJar::new());
        assert_eq!(token.len(), 43);
        assert!(verify(&c, &jar, &token));
        assert!(!verify(&c, &jar, "x"));
        assert!(!verify(&c, &CookieJar::new(), &token));
        let (_, again) = ensure(&c, jar);
        assert_eq!(again, token, "an existing token is kept");
    }
}
