//! A token bucket: a steady rate with room for bursts.

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilling at `per_second`, holding at most `burst` tokens.
    pub fn new(per_second: f64, burst: f64, now: Instant) -> Self {
        Self { per_second, burst, tokens: burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        self.take_or_wait(now).is_ok()
    }

    /// How long since a token was last asked for.
    pub fn idle_for(&self, now: Instant) -> std::time::Duration {
        now.saturating_duration_since(self.last)
    }

    /// Takes one token, or says how long until there is one.
    pub fn take_or_wait(&mut self, now: Instant) -> Result<(), std::time::Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - self.tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 3.0, t0);
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(b.take(t0 + Duration::from_millis(500)));
        assert!(!b.take(t0 + Duration::from_millis(600)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!((0..10).filter(|_| b.take(later)).count(), 3);
    }
}
