//! Runtime fault settings (`/admin/faults`) and the seeded draws against them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// The settings `POST /admin/faults` may change while the server runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Faults {
    pub error_rate: f64,
    pub rate_429: f64,
    pub rate_400: f64,
    pub hang_rate: f64,
    pub slow_rate: f64,
    pub invalid_rate: f64,
    pub slow_ms: u64,
    pub retry_after_secs: u64,
    pub fail_users: Vec<String>,
    pub invalid_users: Vec<String>,
    pub base_ms: u64,
    pub per_token_ms: f64,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            error_rate: 0.0,
            rate_429: 0.0,
            rate_400: 0.0,
            hang_rate: 0.0,
            slow_rate: 0.0,
            invalid_rate: 0.0,
            slow_ms: 5000,
            retry_after_secs: 1,
            fail_users: Vec::new(),
            invalid_users: Vec::new(),
            base_ms: 0,
            per_token_ms: 0.0,
        }
    }
}

/// A partial update: only the fields present change. Unknown fields are
/// refused so a typo in a test ("eror_rate") fails loudly instead of doing nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    pub error_rate: Option<f64>,
    pub rate_429: Option<f64>,
    pub rate_400: Option<f64>,
    pub hang_rate: Option<f64>,
    pub slow_rate: Option<f64>,
    pub invalid_rate: Option<f64>,
    pub slow_ms: Option<u64>,
    pub retry_after_secs: Option<u64>,
    pub fail_users: Option<Vec<String>>,
    pub invalid_users: Option<Vec<String>>,
    pub base_ms: Option<u64>,
    pub per_token_ms: Option<f64>,
}

pub(crate) fn check_rate(v: f64) -> Result<f64, String> {
    if (0.0..=1.0).contains(&v) { Ok(v) } else { Err(format!("a rate must be between 0 and 1, got {v}")) }
}

pub(crate) fn check_ms(v: f64) -> Result<f64, String> {
    if v.is_finite() && v >= 0.0 { Ok(v) } else { Err(format!("must be a non-negative number, got {v}")) }
}

impl Faults {
    /// The settings with `patch` applied, or why the patch is refused (nothing changes then).
    pub fn patched(&self, p: FaultsPatch) -> Result<Faults, String> {
        let mut f = self.clone();
        let rate = |name: &str, v: Option<f64>, slot: &mut f64| -> Result<(), String> {
            if let Some(v) = v {
                *slot = check_rate(v).map_err(|e| format!("{name}: {e}"))?;
            }
            Ok(())
        };
        rate("error_rate", p.error_rate, &mut f.error_rate)?;
        rate("rate_429", p.rate_429, &mut f.rate_429)?;
        rate("rate_400", p.rate_400, &mut f.rate_400)?;
        rate("hang_rate", p.hang_rate, &mut f.hang_rate)?;
        rate("slow_rate", p.slow_rate, &mut f.slow_rate)?;
        rate("invalid_rate", p.invalid_rate, &mut f.invalid_rate)?;
        if let Some(v) = p.per_token_ms {
            f.per_token_ms = check_ms(v).map_err(|e| format!("per_token_ms: {e}"))?;
        }
        f.slow_ms = p.slow_ms.unwrap_or(f.slow_ms);
        f.retry_after_secs = p.retry_after_secs.unwrap_or(f.retry_after_secs);
        f.base_ms = p.base_ms.unwrap_or(f.base_ms);
        f.fail_users = p.fail_users.unwrap_or(f.fail_users);
        f.invalid_users = p.invalid_users.unwrap_or(f.invalid_users);
        Ok(f)
    }

    /// What happens to a request, in the documented order: fail_users, then
    /// the 429, 500, 400, hang and slow draws, then the invalid-output draw.
    pub fn draw(&self, dice: &Dice, user: Option<&str>) -> Verdict {
        let user_in = |list: &[String]| user.is_some_and(|u| list.iter().any(|n| n == u));
        if user_in(&self.fail_users) {
            return Verdict::ServerError;
        }
        if dice.roll(self.rate_429) {
            return Verdict::TooManyRequests { retry_after_secs: self.retry_after_secs };
        }
        if dice.roll(self.error_rate) {
            return Verdict::ServerError;
        }
        if dice.roll(self.rate_400) {
            return Verdict::BadRequest;
        }
        if dice.roll(self.hang_rate) {
            return Verdict::Hang;
        }
        let slow = dice.roll(self.slow_rate);
        let invalid = user_in(&self.invalid_users) || dice.roll(self.invalid_rate);
        Verdict::Serve { slow, invalid }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    TooManyRequests { retry_after_secs: u64 },
    ServerError,
    BadRequest,
    Hang,
    Serve { slow: bool, invalid: bool },
}

/// Seeded draws without a lock: draw `n` hashes `seed + n` (splitmix64). The
/// sequence is fixed by the seed; which request gets which draw follows arrival order.
pub struct Dice {
    seed: u64,
    n: AtomicU64,
}

impl Dice {
    pub fn new(seed: u64) -> Dice {
        Dice { seed, n: AtomicU64::new(0) }
    }

    /// True with probability `p`. Rates of exactly 0 or 1 consume no draw, so
    /// turning a fault on or off leaves the other faults' sequence alone.
    pub fn roll(&self, p: f64) -> bool {
        if p <= 0.0 {
            return false;
        }
        if p >= 1.0 {
            return true;
        }
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let mut z = self.seed.wrapping_add(n.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        ((z >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_roughly_honoured_and_seeded() {
        let d = Dice::new(7);
        let hits = (0..10_000).filter(|_| d.roll(0.3)).count();
        assert!((2_700..3_300).contains(&hits), "{hits}");
        assert!(!d.roll(0.0));
        assert!(d.roll(1.0));
        let (x, y) = (Dice::new(1), Dice::new(1));
        let xs: Vec<bool> = (0..64).map(|_| x.roll(0.5)).collect();
        let ys: Vec<bool> = (0..64).map(|_| y.roll(0.5)).collect();
        assert_eq!(xs, ys, "same seed, same draws");
        let z = Dice::new(2);
        assert_ne!(xs, (0..64).map(|_| z.roll(0.5)).collect::<Vec<_>>(), "another seed, other draws");
    }

    #[test]
    fn patches_change_only_what_they_name() {
        let f = Faults { error_rate: 0.5, slow_ms: 10, ..Default::default() };
        let g = f
            .patched(serde_json::from_str(r#"{"error_rate": 0.0, "fail_users": ["QA-1"]}"#).unwrap())
            .unwrap();
        assert_eq!(g.error_rate, 0.0);
        assert_eq!(g.slow_ms, 10);
        assert_eq!(g.fail_users, ["QA-1"]);
        assert!(serde_json::from_str::<FaultsPatch>(r#"{"nope": 1}"#).is_err());
        assert!(f.patched(serde_json::from_str(r#"{"rate_429": 2}"#).unwrap()).is_err());
        assert!(f.patched(serde_json::from_str(r#"{"per_token_ms": -1}"#).unwrap()).is_err());
    }

    #[test]
    fn verdicts_follow_the_documented_order() {
        let d = Dice::new(0);
        let all = Faults {
            error_rate: 1.0,
            rate_429: 1.0,
            rate_400: 1.0,
            hang_rate: 1.0,
            fail_users: vec!["bad".into()],
            invalid_users: vec!["odd".into()],
            ..Default::default()
        };
        assert_eq!(all.draw(&d, Some("bad")), Verdict::ServerError);
        assert_eq!(all.draw(&d, Some("x")), Verdict::TooManyRequests { retry_after_secs: 1 });
        let no429 = Faults { rate_429: 0.0, ..all.clone() };
        assert_eq!(no429.draw(&d, None), Verdict::ServerError);
        let only400 = Faults { rate_429: 0.0, error_rate: 0.0, ..all.clone() };
        assert_eq!(only400.draw(&d, None), Verdict::BadRequest);
        let hang = Faults { rate_400: 0.0, ..only400 };
        assert_eq!(hang.draw(&d, None), Verdict::Hang);
        let healthy = Faults { invalid_users: vec!["odd".into()], ..Default::default() };
        assert_eq!(healthy.draw(&d, Some("odd")), Verdict::Serve { slow: false, invalid: true });
        assert_eq!(healthy.draw(&d, None), Verdict::Serve { slow: false, invalid: false });
    }
}
