//! The arithmetic of the bench's figures: latency histograms (in
//! microseconds, summarised as [`Percentiles`]), rates, megabytes per
//! second, bytes per message, and the rounding every reported float gets.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency the histograms track, in microseconds (saturating).
const HISTOGRAM_MAX_US: u64 = 3_600_000_000;

/// A histogram of microseconds.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HISTOGRAM_MAX_US, 3).expect("constant histogram bounds are valid")
}

/// A duration in whole microseconds (saturating).
pub(super) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `x` rounded to `digits` decimals.
pub(super) fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// `count / seconds`, rounded to 0.1.
pub(super) fn rate(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return 0.0;
    }
    round(count as f64 / s, 1)
}

/// Megabytes (10^6 bytes) of `count` payloads of `size` bytes per second.
pub(super) fn mb_rate(count: u64, size: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        return 0.0;
    }
    round(count as f64 * size as f64 / 1e6 / s, 3)
}

/// `(after - before) / n` as a float (negative if the size shrank).
pub(super) fn per_message(before: u64, after: u64, n: u64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    round((after as f64 - before as f64) / n as f64, 2)
}

/// A duration in seconds, rounded to 0.1 ms.
pub(super) fn secs(d: Duration) -> f64 {
    round(d.as_secs_f64(), 4)
}

/// Latency percentiles in milliseconds (microsecond resolution).
#[derive(Debug, Clone, Default, Serialize)]
pub(super) struct Percentiles {
    count: u64,
    min_ms: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

impl Percentiles {
    /// The 99th percentile, in milliseconds.
    pub(super) fn p99_ms(&self) -> f64 {
        self.p99_ms
    }

    /// The figures of a histogram of microseconds (all zero if empty).
    pub(super) fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            min_ms: ms(h.min()),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: round(h.mean() / 1000.0, 3),
        }
    }

    /// `p50 .. ms, p99 .. ms, p99.9 .. ms, max .. ms (N samples)`.
    pub(super) fn human(&self) -> String {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms ({} samples)",
            self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}
