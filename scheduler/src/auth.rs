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
}
