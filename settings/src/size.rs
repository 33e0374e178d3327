//! The one size grammar: plain bytes (`268435456`), binary units (`64Ki`/`64KiB`, `Mi`/`MiB`,
//! `Gi`/`GiB`: powers of 1024) or decimal ones (`k`/`kB`, `M`/`MB`, `G`/`GB`: powers of 1000),
//! as Kubernetes quantities and the IEC write them, optionally with a space (`256 MiB`).

use crate::decimal;
use crate::error::GrammarError;

const EXPECTED: &str = "a size such as 64MiB, 1GiB, 256M or 268435456 (bytes; units KiB MiB GiB, Ki Mi Gi, kB MB GB, k M G)";

fn unit_bytes(unit: &str) -> Option<u128> {
    Some(match unit {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        _ => return None,
    })
}

/// Parses a byte count; a fraction of a unit is rounded down to whole bytes (`1.5KiB` = 1536).
pub fn parse_size(s: &str) -> Result<usize, GrammarError> {
    let (number, unit) = decimal::split_number(s.trim());
    unit_bytes(unit.trim_start())
        .and_then(|per| decimal::scaled(number, per, 1))
        .and_then(|bytes| usize::try_from(bytes).ok())
        .ok_or_else(|| GrammarError::expected(EXPECTED))
}

/// Writes a byte count in the largest binary unit that divides it, for messages.
pub fn format_size(bytes: usize) -> String {
    for (unit, per) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(per) {
            return format!("{}{unit}", bytes / per);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> usize {
        parse_size(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn binary_decimal_and_plain_sizes() {
        assert_eq!(ok("268435456"), 256 << 20);
        assert_eq!(ok("64MiB"), 64 << 20);
        assert_eq!(ok("64Mi"), 64 << 20);
        assert_eq!(ok("256 MiB"), 256 << 20);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("4KiB"), 4096);
        assert_eq!(ok("256M"), 256_000_000);
        assert_eq!(ok("256MB"), 256_000_000);
        assert_eq!(ok("2k"), 2000);
        assert_eq!(ok("1G"), 1_000_000_000);
        assert_eq!(ok("100B"), 100);
        assert_eq!(ok("1.5KiB"), 1536);
        assert_eq!(ok("0"), 0);
    }

    #[test]
    fn everything_else_is_refused_with_the_grammar() {
        for bad in [
            "", "MiB", "64mib", "64 M iB", "-1", "1e6", "64MiBs", "1T", "0x100",
        ] {
            let err = parse_size(bad).expect_err(bad);
            assert!(
                err.to_string().contains("64MiB, 1GiB, 256M"),
                "{bad}: {err}"
            );
        }
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for n in [0, 1000, 4096, 64 << 20, 1 << 30, 3 << 29] {
            assert_eq!(ok(&format_size(n)), n, "{}", format_size(n));
        }
        assert_eq!(format_size(256 << 20), "256MiB");
    }
}
