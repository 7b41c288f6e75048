//! When a failed delivery is tried again, and what a dead letter says
//! when attempts ran out: the retry backoff with equal jitter, applied to
//! nacks, lease expiry and streams that end alike.

use std::time::{Duration, Instant};

use crate::storage::meta::RetryPolicy;
use crate::storage::state::NackNote;

/// How a delivery attempt failed, as an attempts-exhausted dead letter
/// tells it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Failure {
    Nacked,
    Expired,
    StreamEnded,
    /// In flight when the broker stopped (a crash or a shutdown).
    Interrupted,
}

/// The broker-written `reason_text` of an attempts-exhausted dead letter.
pub(crate) fn exhausted_text(attempts: u32, last: Failure) -> String {
    let how = match last {
        Failure::Nacked => "was nacked",
        Failure::Expired => "expired (its ack deadline passed)",
        Failure::StreamEnded => "was leased to a stream that ended",
        Failure::Interrupted => "was in flight when the broker stopped",
    };
    let plural = if attempts == 1 { "" } else { "s" };
    format!("{attempts} delivery attempt{plural} failed; the last one {how}")
}

/// `text` of an attempts-exhausted dead letter followed by the last reason
/// a consumer gave, naming its attempt unless it was the last one's.
pub(crate) fn with_nack_reason(text: String, attempts: u32, note: Option<&NackNote>) -> String {
    match note {
        None => text,
        Some(note) if note.attempt == attempts && text.ends_with("was nacked") => {
            format!("{text}: {}", note.text)
        }
        Some(note) => format!(
            "{text}; the last reason given (attempt {}): {}",
            note.attempt, note.text
        ),
    }
}

/// How long a message waits before its next delivery after `attempts`
/// failed ones (nacked, expired or released): the backoff with *equal
/// jitter*, a uniformly random delay between half of [`backoff_ms`] and
/// all of it, so messages that failed together do not all come back at
/// the same moment.
/// With `no_jitter`, exactly the backoff.
pub fn retry_delay(retry: &RetryPolicy, attempts: u32, offset: u64) -> Duration {
    let backoff = backoff_ms(retry.min_backoff_ms, retry.max_backoff_ms, attempts);
    if retry.no_jitter {
        return Duration::from_millis(backoff);
    }
    Duration::from_millis(equal_jitter(backoff, random_u64(offset, attempts)))
}

/// `backoff / 2` plus a share of the other half given by `random`.
fn equal_jitter(backoff: u64, random: u64) -> u64 {
    let half = backoff / 2;
    let spread = backoff - half;
    half + random % (spread + 1)
}

/// A random number for jitter; not for anything that needs secrecy.
fn random_u64(offset: u64, attempts: u32) -> u64 {
    use std::hash::BuildHasher as _;
    std::collections::hash_map::RandomState::new().hash_one((offset, attempts, Instant::now()))
}

/// Backoff before redelivery after `attempts` failed deliveries:
/// `min * 2^(attempts-1)`, capped at `max` (before jitter).
pub fn backoff_ms(min: u64, max: u64, attempts: u32) -> u64 {
    if min == 0 {
        return 0;
    }
    let shift = attempts.saturating_sub(1).min(32);
    min.saturating_mul(1u64 << shift).min(max.max(min))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_are_jittered_between_half_and_all_of_the_backoff() {
        let retry = RetryPolicy {
            min_backoff_ms: 1_000,
            max_backoff_ms: 60_000,
            no_jitter: false,
        };
        let delays: Vec<u64> = (0..50)
            .map(|offset| u64::try_from(retry_delay(&retry, 1, offset).as_millis()).unwrap())
            .collect();
        assert!(
            delays.iter().all(|d| (500..=1_000).contains(d)),
            "{delays:?}"
        );
        let spread = delays.iter().max().unwrap() - delays.iter().min().unwrap();
        assert!(
            spread >= 100,
            "50 delays spread over {spread} ms only: {delays:?}"
        );
        // Without jitter every delay is the backoff itself.
        let exact = RetryPolicy {
            no_jitter: true,
            ..retry
        };
        for offset in 0..10 {
            assert_eq!(retry_delay(&exact, 2, offset), Duration::from_secs(2));
        }
        assert_eq!(equal_jitter(0, 12345), 0);
        assert_eq!(equal_jitter(10, 0), 5);
        assert_eq!(equal_jitter(10, 5), 10);
        assert_eq!(
            retry_delay(&RetryPolicy::default(), 3, 7),
            Duration::ZERO,
            "no policy: at once"
        );
    }

    #[test]
    fn exhausted_texts_carry_the_last_nack_reason_and_its_attempt() {
        let note = |attempt: u32| NackNote {
            attempt,
            text: "billing timed out".into(),
        };
        let nacked = exhausted_text(3, Failure::Nacked);
        assert_eq!(
            with_nack_reason(nacked.clone(), 3, Some(&note(3))),
            "3 delivery attempts failed; the last one was nacked: billing timed out"
        );
        assert_eq!(
            with_nack_reason(nacked.clone(), 3, Some(&note(1))),
            "3 delivery attempts failed; the last one was nacked; the last reason given (attempt 1): billing timed out"
        );
        assert_eq!(
            with_nack_reason(exhausted_text(2, Failure::Expired), 2, Some(&note(1))),
            "2 delivery attempts failed; the last one expired (its ack deadline passed); the last reason given (attempt 1): billing timed out"
        );
        assert_eq!(with_nack_reason(nacked.clone(), 3, None), nacked);
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        assert_eq!(backoff_ms(0, 100, 5), 0);
        assert_eq!(backoff_ms(10, 100, 1), 10);
        assert_eq!(backoff_ms(10, 100, 2), 20);
        assert_eq!(backoff_ms(10, 100, 4), 80);
        assert_eq!(backoff_ms(10, 100, 5), 100);
        assert_eq!(backoff_ms(10, 100, 1000), 100);
    }
}
