//! The number part of durations and sizes: digits with an optional fraction, in exact integer
//! arithmetic (`0.1s` is 100 ms, not 99.999… ms).

/// `number × numerator / denominator`, rounded down; `None` when `number` is not plain decimal
/// digits with at most one `.`, or the result overflows.
pub(crate) fn scaled(number: &str, numerator: u128, denominator: u128) -> Option<u128> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    // Digits past the 18th cannot change a result counted in nanoseconds or bytes.
    let frac = &frac[..frac.len().min(18)];
    let parse = |s: &str| {
        if s.is_empty() {
            Some(0)
        } else {
            s.parse::<u128>().ok()
        }
    };
    let ten_k = 10u128.pow(u32::try_from(frac.len()).ok()?);
    let mantissa = parse(int)?.checked_mul(ten_k)?.checked_add(parse(frac)?)?;
    Some(mantissa.checked_mul(numerator)? / ten_k.checked_mul(denominator)?)
}

/// Splits `s` at the first character that is not a digit or `.`.
pub(crate) fn split_number(s: &str) -> (&str, &str) {
    s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_are_exact_and_garbage_is_refused() {
        assert_eq!(scaled("0.1", 1_000_000_000, 1), Some(100_000_000));
        assert_eq!(scaled("1.5", 1024, 1), Some(1536));
        assert_eq!(scaled(".5", 10, 1), Some(5));
        assert_eq!(scaled("7.", 1, 1), Some(7));
        assert_eq!(scaled("1", 1, 3), Some(0));
        for bad in ["", ".", "1.2.3", "-1", "+1", "1e3", " 1"] {
            assert_eq!(scaled(bad, 1, 1), None, "{bad:?}");
        }
        assert_eq!(
            scaled("99999999999999999999999999999999999999", 10, 1),
            None
        );
    }
}
