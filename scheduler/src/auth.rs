//! Bearer-token protection of the scheduler's API (pure parts unit-tested).

/// Constant-time equality: the time taken does not depend on where the bytes differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    diff == 0 && a.len() == b.len()
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No credentials: 401.
    Missing,
    /// Wrong credentials: 403.
    Wrong,
}

/// Decide on an `Authorization` header value against the configured token.
pub fn check(configured: Option<&str>, header: Option<&str>) -> Verdict {
    let Some(token) = configured else { return Verdict::Allowed };
    match header.and_then(|h| h.strip_prefix("Bearer ")) {
        None => Verdict::Missing,
        Some(given) if constant_time_eq(given.trim().as_bytes(), token.as_bytes()) => Verdict::Allowed,
        Some(_) => Verdict::Wrong,
    }
}

/// The cookie `GET /?token=…` sets, so a browser can load a protected
/// dashboard (it cannot send a bearer header on a page load). The value is the
/// token in hex, so any token is a valid cookie value.
pub const COOKIE: &str = "flota_token";

/// The `Set-Cookie` value for a signed-in dashboard: script cannot read it,
/// and other sites cannot make the browser send it.
pub fn session_cookie(token: &str) -> String {
    format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", hex_of(token.as_bytes()))
}

/// Decide on a read route (`GET`): open unless reads are protected; then the
/// bearer header, or the dashboard's cookie. Mutating routes never take the
/// cookie (see [`check`]), so a forged cross-site request gains nothing.
pub fn check_read(
    configured: Option<&str>,
    protect_reads: bool,
    header: Option<&str>,
    cookie_header: Option<&str>,
) -> Verdict {
    let Some(token) = configured.filter(|_| protect_reads) else { return Verdict::Allowed };
    match check(Some(token), header) {
        Verdict::Missing => match cookie_header.and_then(cookie_value) {
            None => Verdict::Missing,
            Some(v) if constant_time_eq(v.as_bytes(), hex_of(token.as_bytes()).as_bytes()) => {
                Verdict::Allowed
            }
            Some(_) => Verdict::Wrong,
        },
        verdict => verdict,
    }
}

/// Our cookie's value in a `Cookie` header (`a=1; flota_token=…`).
fn cookie_value(header: &str) -> Option<&str> {
    header
        .split(';')
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// `token` of a query string, percent-decoded (`None` when absent or not UTF-8).
pub fn query_token(query: &str) -> Option<String> {
    let raw = query.split('&').find_map(|pair| pair.strip_prefix("token="))?;
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn verdicts() {
        assert_eq!(check(None, None), Verdict::Allowed);
        assert_eq!(check(Some("t"), None), Verdict::Missing);
        assert_eq!(check(Some("t"), Some("Basic abc")), Verdict::Missing);
        assert_eq!(check(Some("t"), Some("Bearer nope")), Verdict::Wrong);
        assert_eq!(check(Some("t"), Some("Bearer t")), Verdict::Allowed);
    }

    #[test]
    fn reads_take_the_header_or_the_dashboard_cookie() {
        let cookie = session_cookie("s3cret");
        let sent = cookie.split(';').next().unwrap();
        assert_eq!(check_read(Some("s3cret"), false, None, None), Verdict::Allowed);
        assert_eq!(check_read(None, true, None, None), Verdict::Allowed);
        assert_eq!(check_read(Some("s3cret"), true, None, None), Verdict::Missing);
        assert_eq!(check_read(Some("s3cret"), true, Some("Bearer s3cret"), None), Verdict::Allowed);
        assert_eq!(check_read(Some("s3cret"), true, Some("Bearer nope"), Some(sent)), Verdict::Wrong);
        assert_eq!(check_read(Some("s3cret"), true, None, Some(&format!("a=1; {sent}"))), Verdict::Allowed);
        assert_eq!(check_read(Some("s3cret"), true, None, Some("flota_token=00")), Verdict::Wrong);
        assert_eq!(check_read(Some("s3cret"), true, None, Some("other=1")), Verdict::Missing);
    }

    #[test]
    fn the_query_token_is_percent_decoded() {
        assert_eq!(query_token("token=a%2Bb%3D&x=1").as_deref(), Some("a+b="));
        assert_eq!(query_token("x=1&token=plain").as_deref(), Some("plain"));
        assert_eq!(query_token("x=1"), None);
        assert_eq!(query_token("token=%zz"), None);
    }
}
