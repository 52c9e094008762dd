//! Per-shard token buckets. A Kinesis shard takes 1,000 records/s and 1 MiB/s; each bucket
//! aims at a fraction of that (the headroom), halves it when its shard reports
//! `ProvisionedThroughputExceededException` (at most once per [`SHARD_COOLDOWN`], so that
//! the answers to requests already in flight count as one signal), and grows it back as
//! requests succeed. A
//! bucket may go into debt by one request, so a record larger than a second's allowance
//! still goes, then waits its turn.
//! <https://docs.aws.amazon.com/streams/latest/dev/service-sizes-and-limits.html>

use std::time::{Duration, Instant};

pub const SHARD_RECORDS_PER_SEC: f64 = 1000.0;
pub const SHARD_BYTES_PER_SEC: f64 = 1024.0 * 1024.0;

/// The lowest fraction a throttled shard falls to.
const MIN_FRACTION: f64 = 0.05;

/// How soon after a cut a shard's rate may be cut again: Kinesis counts a shard's
/// throughput per second.
pub const SHARD_COOLDOWN: Duration = Duration::from_secs(1);

/// Times are seconds since the limiter's epoch, as `f64`: a request touches hundreds of
/// buckets, and a subtraction per bucket is what keeps that cheap.
#[derive(Clone, Debug)]
struct Bucket {
    records: f64,
    bytes: f64,
    fraction: f64,
    at: f64,
    cut: Option<Instant>,
}

impl Bucket {
    fn full(fraction: f64, at: f64) -> Self {
        Bucket {
            records: SHARD_RECORDS_PER_SEC * fraction,
            bytes: SHARD_BYTES_PER_SEC * fraction,
            fraction,
            at,
            cut: None,
        }
    }

    /// Adds what has dripped in since the last look, up to one second's worth.
    fn refill(&mut self, now: f64) {
        let dt = (now - self.at).max(0.0);
        self.at = now;
        self.records = (self.records + dt * SHARD_RECORDS_PER_SEC * self.fraction)
            .min(SHARD_RECORDS_PER_SEC * self.fraction);
        self.bytes = (self.bytes + dt * SHARD_BYTES_PER_SEC * self.fraction)
            .min(SHARD_BYTES_PER_SEC * self.fraction);
    }

    /// Seconds until both counts are out of debt.
    fn wait(&self) -> f64 {
        let r = (-self.records).max(0.0) / (SHARD_RECORDS_PER_SEC * self.fraction);
        let b = (-self.bytes).max(0.0) / (SHARD_BYTES_PER_SEC * self.fraction);
        r.max(b)
    }
}

/// One bucket per shard of a stream.
#[derive(Clone, Debug)]
pub struct ShardLimiter {
    buckets: Vec<Bucket>,
    headroom: f64,
    epoch: Instant,
}

impl ShardLimiter {
    pub fn new(shards: usize, headroom: f64, now: Instant) -> Self {
        ShardLimiter {
            buckets: vec![Bucket::full(headroom, 0.0); shards.max(1)],
            headroom,
            epoch: now,
        }
    }

    /// After a reshard: one full bucket per shard of the new map.
    pub fn reset(&mut self, shards: usize, now: Instant) {
        *self = ShardLimiter::new(shards, self.headroom, now);
    }

    /// Takes what a request needs, `(shard, records, bytes)` per shard, if no shard it
    /// touches is in debt; otherwise says how long to wait before asking again.
    pub fn take(&mut self, now: Instant, need: &[(usize, u64, u64)]) -> Result<(), Duration> {
        let now = now.saturating_duration_since(self.epoch).as_secs_f64();
        let mut wait = 0.0f64;
        for &(s, _, _) in need {
            if let Some(b) = self.buckets.get_mut(s) {
                b.refill(now);
                wait = wait.max(b.wait());
            }
        }
        if wait > 0.0 {
            return Err(Duration::from_secs_f64(wait).max(Duration::from_nanos(1)));
        }
        for &(s, records, bytes) in need {
            if let Some(b) = self.buckets.get_mut(s) {
                b.records -= records as f64;
                b.bytes -= bytes as f64;
            }
        }
        Ok(())
    }

    /// Halves `shard`'s rate unless it was cut within the cooldown; returns whether it was.
    pub fn throttled(&mut self, shard: usize, now: Instant) -> bool {
        let Some(b) = self.buckets.get_mut(shard) else {
            return false;
        };
        let cut = b
            .cut
            .is_none_or(|t| now.duration_since(t) >= SHARD_COOLDOWN);
        if cut {
            b.fraction = (b.fraction * 0.5).max(MIN_FRACTION);
            b.cut = Some(now);
        }
        cut
    }

    pub fn succeeded(&mut self, shard: usize) {
        if let Some(b) = self.buckets.get_mut(shard) {
            b.fraction = (b.fraction + self.headroom * 0.05).min(self.headroom);
        }
    }

    /// A shard's current allowance, in records per second.
    pub fn rate(&self, shard: usize) -> u64 {
        self.buckets
            .get(shard)
            .map_or(0, |b| (b.fraction * SHARD_RECORDS_PER_SEC) as u64)
    }

    /// The rate a shard that is not slowed aims at, in records per second.
    pub fn full_rate(&self) -> u64 {
        (self.headroom * SHARD_RECORDS_PER_SEC) as u64
    }

    pub fn shards(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_takes_its_rate_and_no_more() {
        let t0 = Instant::now();
        let mut l = ShardLimiter::new(2, 1.0, t0);
        // A full second's worth goes at once; the next request waits for the refill.
        assert!(l.take(t0, &[(0, 1000, 1000)]).is_ok());
        assert!(
            l.take(t0, &[(0, 1, 1)]).is_ok(),
            "debt of one request is allowed"
        );
        let wait = l.take(t0, &[(0, 1, 1)]).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait < Duration::from_millis(10),
            "{wait:?}"
        );
        // The other shard is untouched.
        assert!(l.take(t0, &[(1, 500, 500)]).is_ok());
        // After a second, the first shard is back.
        assert!(l.take(t0 + Duration::from_secs(1), &[(0, 900, 1)]).is_ok());
    }

    #[test]
    fn bytes_limit_too() {
        let t0 = Instant::now();
        let mut l = ShardLimiter::new(1, 1.0, t0);
        assert!(l.take(t0, &[(0, 1, 2 << 20)]).is_ok());
        let wait = l.take(t0, &[(0, 1, 1)]).unwrap_err();
        assert!(wait >= Duration::from_millis(990), "{wait:?}");
    }

    #[test]
    fn throttles_halve_a_shard_and_successes_bring_it_back() {
        let t0 = Instant::now();
        let mut l = ShardLimiter::new(2, 0.9, t0);
        assert_eq!(l.rate(0), 900);
        l.throttled(0, t0);
        l.throttled(0, t0 + Duration::from_millis(300));
        assert_eq!(l.rate(0), 450, "one cut per cooldown");
        l.throttled(0, t0 + SHARD_COOLDOWN);
        assert_eq!(l.rate(0), 225);
        assert_eq!(l.rate(1), 900);
        for k in 2..8 {
            l.throttled(0, t0 + SHARD_COOLDOWN * k);
        }
        assert_eq!(l.rate(0), 50, "floor");
        for _ in 0..100 {
            l.succeeded(0);
        }
        assert_eq!(l.rate(0), 900);
    }
}
