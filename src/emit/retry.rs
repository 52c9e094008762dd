//! Retry policy as pure functions: every response is classified (done, retry the failed
//! records, retry the whole request, give up), backoff is full-jitter exponential, and the
//! number of requests in flight follows AIMD. Time and randomness are passed in, so all of
//! it is tested like any other state machine (ARCHITECTURE.md, rule 9).

use std::borrow::Cow;
use std::time::{Duration, Instant};

/// A service's error code: one of the known ones without an allocation, as most are.
pub type Code = Cow<'static, str>;

/// What a request came back with, whichever service it went to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The service answered: for each record of the request, `None` if it was accepted or
    /// its error code.
    Records(Vec<Option<Code>>),
    /// The request failed as a whole: the service's error code, if it sent one, and the
    /// HTTP status, if there was a response.
    Failed {
        code: Option<String>,
        status: Option<u16>,
    },
    /// No response at all: a timeout, a refused or reset connection.
    Unreachable,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// Some records failed: send `retry` again (by position in the request), dead-letter
    /// `dead` with their codes. `throttled`: the positions in `retry` that said to slow
    /// down.
    Partial {
        retry: Vec<usize>,
        dead: Vec<(usize, String)>,
        throttled: Vec<usize>,
    },
    /// Send the whole request again after backing off.
    RetryAll {
        throttled: bool,
    },
    /// The service refused for good: dead-letter every record.
    GiveUp {
        reason: String,
    },
}

/// Codes that mean "too fast, slow down".
const THROTTLES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "KMSThrottlingException",
    "LimitExceededException",
    "ServiceUnavailableException",
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
];

/// Codes that mean "try again": the service or the credentials are briefly not there.
const TRANSIENT: &[&str] = &[
    "InternalFailure",
    "InternalFailureException",
    "InternalServerError",
    "InternalError",
    "ServiceUnavailable",
    "ExpiredToken",
    "ExpiredTokenException",
    "RequestExpired",
    "RequestTimeout",
    "RequestTimeoutException",
    "IDPCommunicationError",
];

/// `code` as a [`Code`], borrowed when it is one the classifier knows.
pub fn code(code: &str) -> Code {
    match THROTTLES.iter().chain(TRANSIENT).find(|k| **k == code) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(code.to_string()),
    }
}

fn is_throttle(code: &str) -> bool {
    THROTTLES.contains(&code)
}

fn is_transient(code: &str) -> bool {
    TRANSIENT.contains(&code)
}

/// Classifies one response. Per record, throttles and internal failures are retried and
/// anything else (an oversize record, say) is permanent. For a whole request, throttles,
/// transient codes, 5xx and no response are retried; other client errors (invalid
/// argument, not found, access denied, validation) are permanent.
pub fn classify(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Records(codes) => {
            let (mut retry, mut dead, mut throttled) = (Vec::new(), Vec::new(), Vec::new());
            for (i, code) in codes.iter().enumerate() {
                match code.as_deref() {
                    None => {}
                    Some(c) if is_throttle(c) => {
                        throttled.push(i);
                        retry.push(i);
                    }
                    Some(c) if is_transient(c) => retry.push(i),
                    Some(c) => dead.push((i, c.to_string())),
                }
            }
            if retry.is_empty() && dead.is_empty() {
                Verdict::Done
            } else {
                Verdict::Partial {
                    retry,
                    dead,
                    throttled,
                }
            }
        }
        Outcome::Failed { code, status } => match (code.as_deref(), status) {
            (Some(c), _) if is_throttle(c) => Verdict::RetryAll { throttled: true },
            (Some(c), _) if is_transient(c) => Verdict::RetryAll { throttled: false },
            (_, Some(429)) => Verdict::RetryAll { throttled: true },
            (_, Some(500..=599)) => Verdict::RetryAll { throttled: false },
            (Some(c), _) => Verdict::GiveUp {
                reason: format!("the service refused the request: {c}"),
            },
            (None, Some(s)) => Verdict::GiveUp {
                reason: format!("the service refused the request with HTTP {s}"),
            },
            (None, None) => Verdict::RetryAll { throttled: false },
        },
        Outcome::Unreachable => Verdict::RetryAll { throttled: false },
    }
}

/// Full-jitter exponential backoff: a uniform wait in `[0, min(cap, base * 2^attempt)]`.
/// `unit` is a uniform random number in `[0, 1)`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.min(20)).min(cap);
    ceiling.mul_f64(unit.clamp(0.0, 1.0))
}

/// The share of an answer's records that must be throttled for the stream-wide limit to
/// be cut, as a whole-request throttle cuts it.
pub const STREAM_THROTTLE_SHARE: f64 = 0.5;

/// The number of requests allowed in flight: up by one per window of successes, halved on
/// a throttle (at most once per `cooldown`, so one burst of throttled replies counts once).
#[derive(Clone, Debug)]
pub struct Aimd {
    limit: f64,
    max: f64,
    cooldown: Duration,
    last_cut: Option<Instant>,
}

impl Aimd {
    pub fn new(start: usize, max: usize, cooldown: Duration) -> Self {
        Aimd {
            limit: start.clamp(1, max) as f64,
            max: max as f64,
            cooldown,
            last_cut: None,
        }
    }

    /// Requests that may be in flight now.
    pub fn limit(&self) -> usize {
        self.limit as usize
    }

    pub fn success(&mut self) {
        self.limit = (self.limit + 1.0 / self.limit).min(self.max);
    }

    /// Reacts to an answer that throttled `throttled` of its `records`: a cut when most
    /// of them were, growth otherwise. Per-record throttles are mostly a few hot shards
    /// (Kinesis) or a share the service refuses whatever the rate; a limit halved on each
    /// such answer collapses to one request in flight and stays there.
    pub fn answered(&mut self, now: Instant, throttled: usize, records: usize) {
        if throttled as f64 > STREAM_THROTTLE_SHARE * records as f64 {
            self.throttled(now);
        } else {
            self.success();
        }
    }

    pub fn throttled(&mut self, now: Instant) {
        if self
            .last_cut
            .is_none_or(|t| now.duration_since(t) >= self.cooldown)
        {
            self.limit = (self.limit / 2.0).max(1.0);
            self.last_cut = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(c: &[Option<&str>]) -> Outcome {
        Outcome::Records(c.iter().map(|c| c.map(code)).collect())
    }

    #[test]
    fn per_record_failures_are_retried_or_dead_lettered() {
        assert_eq!(classify(&codes(&[None, None])), Verdict::Done);
        assert_eq!(
            classify(&codes(&[
                None,
                Some("ProvisionedThroughputExceededException"),
                Some("InternalFailure")
            ])),
            Verdict::Partial {
                retry: vec![1, 2],
                dead: vec![],
                throttled: vec![1]
            }
        );
        // kinesis-local reports an oversize record as a per-record failure.
        assert_eq!(
            classify(&codes(&[
                Some("InternalFailure"),
                Some("InvalidArgumentException")
            ])),
            Verdict::Partial {
                retry: vec![0],
                dead: vec![(1, "InvalidArgumentException".into())],
                throttled: vec![]
            }
        );
        // Firehose throttles records with ServiceUnavailableException.
        assert_eq!(
            classify(&codes(&[Some("ServiceUnavailableException")])),
            Verdict::Partial {
                retry: vec![0],
                dead: vec![],
                throttled: vec![0]
            }
        );
    }

    fn failed(code: Option<&str>, status: Option<u16>) -> Verdict {
        classify(&Outcome::Failed {
            code: code.map(str::to_string),
            status,
        })
    }

    #[test]
    fn whole_requests_are_retried_unless_refused_for_good() {
        for c in [
            "ProvisionedThroughputExceededException",
            "KMSThrottlingException",
            "LimitExceededException",
        ] {
            assert_eq!(
                failed(Some(c), Some(400)),
                Verdict::RetryAll { throttled: true },
                "{c}"
            );
        }
        assert_eq!(
            failed(None, Some(503)),
            Verdict::RetryAll { throttled: false }
        );
        assert_eq!(
            failed(Some("InternalFailure"), Some(500)),
            Verdict::RetryAll { throttled: false }
        );
        assert_eq!(
            failed(Some("ExpiredTokenException"), Some(400)),
            Verdict::RetryAll { throttled: false }
        );
        assert_eq!(
            classify(&Outcome::Unreachable),
            Verdict::RetryAll { throttled: false }
        );
        for c in [
            "InvalidArgumentException",
            "ResourceNotFoundException",
            "AccessDeniedException",
            "ValidationException",
        ] {
            assert!(
                matches!(failed(Some(c), Some(400)), Verdict::GiveUp { .. }),
                "{c}"
            );
        }
        assert!(matches!(failed(None, Some(413)), Verdict::GiveUp { .. }));
    }

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let (b, cap) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(backoff(0, b, cap, 0.0), Duration::ZERO);
        assert_eq!(backoff(0, b, cap, 0.5), Duration::from_millis(50));
        assert_eq!(backoff(3, b, cap, 0.5), Duration::from_millis(400));
        assert_eq!(backoff(30, b, cap, 0.999_999), cap.mul_f64(0.999_999));
    }

    #[test]
    fn aimd_halves_on_throttle_once_per_cooldown_and_grows_back() {
        let t0 = Instant::now();
        let mut a = Aimd::new(16, 64, Duration::from_millis(100));
        a.throttled(t0);
        assert_eq!(a.limit(), 8);
        a.throttled(t0 + Duration::from_millis(10));
        assert_eq!(a.limit(), 8, "one burst of throttles cuts once");
        a.throttled(t0 + Duration::from_millis(150));
        assert_eq!(a.limit(), 4);
        for _ in 0..200 {
            a.success();
        }
        assert!(a.limit() > 8, "grows back: {}", a.limit());
        for _ in 0..100_000 {
            a.success();
        }
        assert_eq!(a.limit(), 64);
        let mut low = Aimd::new(1, 64, Duration::ZERO);
        low.throttled(t0);
        assert_eq!(low.limit(), 1);
    }

    #[test]
    fn aimd_is_cut_only_when_most_of_an_answer_throttled() {
        let t0 = Instant::now();
        let mut a = Aimd::new(16, 64, Duration::ZERO);
        // 30% of every answer throttled, answer after answer: the limit grows, not falls.
        for k in 0..100 {
            a.answered(t0 + Duration::from_millis(k), 150, 500);
        }
        assert!(a.limit() > 16, "{}", a.limit());
        let before = a.limit();
        a.answered(t0 + Duration::from_secs(1), 400, 500);
        assert_eq!(a.limit(), before / 2, "a majority throttled cuts the limit");
    }
}
