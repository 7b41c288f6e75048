//! Parsers for command-line values shared by several commands: durations
//! (`30s`, `100ms`, `1m30s`), byte sizes (`64MiB`), `KEY=VALUE` attributes
//! and the small enums spelled in flags. Each returns a `String` error so
//! clap reports a bad value as a usage error (exit code 2).

use std::time::Duration;

use crate::broker::config::PULL_WAIT_MS_MAX;

/// A duration in whole milliseconds: `0`, `100ms`, `30s`, `1m30s`, `2h`.
pub fn duration_ms(s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); use for example 100ms, 30s, 5m or 1h")
    })?;
    to_ms(d).ok_or_else(|| format!("{s:?} is not a whole number of milliseconds"))
}

/// A Pull wait: a duration of at most one minute.
pub fn wait_ms(s: &str) -> Result<u64, String> {
    let ms = duration_ms(s)?;
    if ms > PULL_WAIT_MS_MAX {
        return Err(format!("{s:?} is longer than the longest wait, 60s"));
    }
    Ok(ms)
}

fn to_ms(d: Duration) -> Option<u64> {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return None;
    }
    u64::try_from(d.as_millis()).ok()
}

/// A byte count: a plain number, or one with a unit: `B`, decimal `KB`,
/// `MB`, `GB`, `TB`, binary `KiB`, `MiB`, `GiB`, `TiB` (case-insensitive).
pub fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("{s:?} is not a byte size; use for example 1048576, 64MiB or 1GB");
    if digits.is_empty() {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(bad()),
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A message attribute, `KEY=VALUE` (split at the first `=`; the value may
/// be empty, the key may not).
/// `on` or `off` (also `true`/`false`, `yes`/`no`).
pub fn on_off(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

pub fn attr(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not an attribute; expected KEY=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration_ms("0"), Ok(0));
        assert_eq!(duration_ms("100ms"), Ok(100));
        assert_eq!(duration_ms("30s"), Ok(30_000));
        assert_eq!(duration_ms("1m30s"), Ok(90_000));
        assert_eq!(duration_ms("1m 30s"), Ok(90_000));
        assert_eq!(duration_ms("2h"), Ok(7_200_000));
        assert!(duration_ms("30").is_err());
        assert!(duration_ms("abc").is_err());
        assert!(duration_ms("1500us").is_err());
        assert!(duration_ms("").is_err());
    }

    #[test]
    fn waits_are_capped_at_a_minute() {
        assert_eq!(wait_ms("60s"), Ok(60_000));
        assert!(wait_ms("61s").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes("0"), Ok(0));
        assert_eq!(bytes("1048576"), Ok(1 << 20));
        assert_eq!(bytes("64MiB"), Ok(64 << 20));
        assert_eq!(bytes("64mib"), Ok(64 << 20));
        assert_eq!(bytes("1 GB"), Ok(1_000_000_000));
        assert_eq!(bytes("10B"), Ok(10));
        assert!(bytes("MiB").is_err());
        assert!(bytes("-1").is_err());
        assert!(bytes("1.5MiB").is_err());
        assert!(bytes("1XB").is_err());
        assert!(bytes("99999999999TiB").is_err());
    }

    #[test]
    fn attributes() {
        assert_eq!(attr("k=v"), Ok(("k".into(), "v".into())));
        assert_eq!(attr("k="), Ok(("k".into(), String::new())));
        assert_eq!(attr("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(attr("=v").is_err());
        assert!(attr("kv").is_err());
    }
}
