//! The one duration grammar of every flag: `500ms`, `10s`, `1m30s`, `1.5h`, `100us`; a bare
//! number is seconds (`30`).

use std::time::Duration;

use crate::decimal;
use crate::error::GrammarError;

const EXPECTED: &str = "a duration such as 500ms, 10s, 1m30s or 1.5h (units us, ms, s, m, h; a bare number is seconds)";

/// Nanoseconds per unit.
fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Parses one duration: parts `<number><unit>` one after the other (`1m30s`), or a bare
/// number of seconds. Fractions are exact to the nanosecond.
pub fn parse_duration(s: &str) -> Result<Duration, GrammarError> {
    let err = || GrammarError::expected(EXPECTED);
    let s = s.trim();
    if s.is_empty() {
        return Err(err());
    }
    if let Some(secs) = decimal::scaled(s, 1_000_000_000, 1) {
        return nanos_to_duration(secs).ok_or_else(err);
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let (number, tail) = decimal::split_number(rest);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let nanos = unit_nanos(unit)
            .and_then(|per| decimal::scaled(number, per, 1))
            .ok_or_else(err)?;
        total = total.checked_add(nanos).ok_or_else(err)?;
        rest = next;
    }
    nanos_to_duration(total).ok_or_else(err)
}

fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / 1_000_000_000).ok()?;
    // The remainder is below 10^9, so it fits.
    let sub = u32::try_from(nanos % 1_000_000_000).ok()?;
    Some(Duration::new(secs, sub))
}

/// Writes a duration in the same grammar, for messages: whole seconds as seconds (`60s`, as
/// flags are usually written, not `1m`), else the largest exact smaller unit.
pub fn format_duration(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, per) in [("s", 1_000_000_000u128), ("ms", 1_000_000), ("us", 1_000)] {
        if nanos.is_multiple_of(per) {
            return format!("{}{unit}", nanos / per);
        }
    }
    format!("{}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Duration {
        parse_duration(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn every_unit_and_bare_seconds() {
        assert_eq!(ok("100us"), Duration::from_micros(100));
        assert_eq!(ok("100µs"), Duration::from_micros(100));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("30"), Duration::from_secs(30));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok(" 5s "), Duration::from_secs(5));
    }

    #[test]
    fn fractions_and_compound_durations() {
        assert_eq!(ok("1.5h"), Duration::from_secs(5400));
        assert_eq!(ok("0.1s"), Duration::from_millis(100));
        assert_eq!(ok("1.5"), Duration::from_millis(1500));
        assert_eq!(ok("1m30s"), Duration::from_secs(90));
        assert_eq!(ok("1h2m3s4ms"), Duration::new(3723, 4_000_000));
    }

    #[test]
    fn everything_else_is_refused_with_the_grammar() {
        for bad in [
            "", "s", "ms", "5d", "5 s", "-1s", "+1s", "1m30", "1.2.3s", "1e3s", "10S", "nan",
            "inf", "1s-",
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(
                err.to_string().contains("500ms, 10s, 1m30s or 1.5h"),
                "{bad}: {err}"
            );
        }
        assert!(parse_duration("99999999999999999999h").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_micros(100),
            Duration::from_millis(1500),
            Duration::from_secs(10),
            Duration::from_secs(90),
            Duration::from_secs(5400),
        ] {
            assert_eq!(ok(&format_duration(d)), d, "{}", format_duration(d));
        }
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_secs(3600)), "3600s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
