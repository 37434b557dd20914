//! Human units for sizes ("64GiB") and durations ("5m", "1h", "300ms").

use crate::error::{Error, Result};

/// Parses a byte size: a plain integer, or a number with one of
/// `B, KB, MB, GB, TB` (powers of 1000) or `KiB, MiB, GiB, TiB` (powers of 1024).
/// A value that does not fit in 64 bits is an error, never clamped.
pub fn parse_size(s: &str) -> Result<u64> {
    let (num, unit) = split_number(s);
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        u => return Err(Error::config(format!("size {s:?}: unknown unit {u:?}"))),
    };
    scaled(s, num, mult, "size", "8GiB")
}

/// Parses a duration into nanoseconds: `ns, us, ms, s, m, h, d`; a plain number is seconds.
/// A value that does not fit in 64 bits of nanoseconds is an error.
pub fn parse_duration_ns(s: &str) -> Result<u64> {
    let (num, unit) = split_number(s);
    let mult: u64 = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "" | "s" => 1_000_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        u => return Err(Error::config(format!("duration {s:?}: unknown unit {u:?}"))),
    };
    scaled(s, num, mult, "duration", "5m")
}

/// Splits "1.5 GiB" into ("1.5", "GiB").
fn split_number(s: &str) -> (&str, &str) {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    (num, unit.trim())
}

/// `num × mult` as u64: integers exactly (checked), fractions through f64.
fn scaled(s: &str, num: &str, mult: u64, what: &str, example: &str) -> Result<u64> {
    let bad = || {
        Error::config(format!(
            "{what} {s:?}: expected a number with a unit such as {example}"
        ))
    };
    let range = || Error::config(format!("{what} {s:?} out of range (more than 64 bits)"));
    if num.is_empty() {
        return Err(bad());
    }
    if !num.contains('.') {
        // Exact: digits only, so u128 parsing fails only past 39 digits.
        let n: u128 = num.parse().map_err(|_| range())?;
        return n
            .checked_mul(mult as u128)
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(range);
    }
    let n: f64 = num.parse().map_err(|_| bad())?;
    let v = (n * mult as f64).round();
    // 2^64 is the first value that does not fit (u64::MAX as f64 rounds up to it).
    if !(0.0..18_446_744_073_709_551_616.0).contains(&v) {
        return Err(range());
    }
    Ok(v as u64)
}

/// Formats bytes with a binary unit ("1.50 GiB").
pub fn fmt_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("1.5 MiB").unwrap(), 1536 * 1024);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert!(parse_size("8 gigs")
            .unwrap_err()
            .message()
            .contains("unknown unit"));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
    }

    #[test]
    fn sizes_past_64_bits_are_errors_not_clamped() {
        assert_eq!(parse_size("18446744073709551615").unwrap(), u64::MAX);
        for s in [
            "18446744073709551616",
            "16777216TiB",
            "18446744073709551616.0",
            "1e30",
            "99999999999999999999999999999999999999999",
        ] {
            let e = parse_size(s).unwrap_err();
            assert!(
                e.message().contains("out of range") || e.message().contains("unknown unit"),
                "{s}: {e}"
            );
        }
        assert_eq!(parse_size("16777215TiB").unwrap(), 16_777_215u64 << 40);
        assert!(parse_duration_ns("213504d").is_err());
        assert_eq!(
            parse_duration_ns("213503m").unwrap(),
            213_503 * 60_000_000_000
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ns("5m").unwrap(), 300_000_000_000);
        assert_eq!(parse_duration_ns("250ms").unwrap(), 250_000_000);
        assert_eq!(parse_duration_ns("1h").unwrap(), 3_600_000_000_000);
        assert!(parse_duration_ns("5 fortnights").is_err());
    }

    #[test]
    fn bytes_format() {
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(3 << 29), "1.50 GiB");
    }
}
