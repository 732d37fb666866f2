//! Human-readable sizes: `10G`, `512M`, `4096` (bytes), binary multiples.

use thiserror::Error;

/// A size string that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SizeError {
    /// Empty input.
    #[error("empty size")]
    Empty,
    /// Not `NUMBER[K|M|G|T][iB|B]`.
    #[error("invalid size {input:?} (expected e.g. 512M, 10G or a byte count)")]
    Invalid {
        /// The rejected input.
        input: String,
    },
    /// The value does not fit in 64 bits.
    #[error("size {input:?} is too large")]
    Overflow {
        /// The rejected input.
        input: String,
    },
}

impl SizeError {
    /// What kind of failure this is (see [`crate::error`]): always invalid input.
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::Invalid
    }
}

/// Parse a size: a decimal number of bytes, optionally followed by a binary unit
/// `K`, `M`, `G`, `T` (also written `KiB`, `KB`, `k`, ...). `10G` is 10 GiB.
///
/// ```
/// use vm_rs::storage::parse_size;
/// assert_eq!(parse_size("512M").unwrap(), 512 * 1024 * 1024);
/// assert_eq!(parse_size("4096").unwrap(), 4096);
/// assert!(parse_size("10X").is_err());
/// ```
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits_end);
    if num.is_empty() {
        return Err(SizeError::Invalid {
            input: input.to_string(),
        });
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(SizeError::Invalid {
                input: input.to_string(),
            })
        }
    };
    let value: u64 = num.parse().map_err(|_| SizeError::Overflow {
        input: input.to_string(),
    })?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow {
            input: input.to_string(),
        })
}

/// Format a byte count with the largest binary unit that divides it exactly (`10G`, `1536K`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes % (1u64 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1KiB"), Ok(1024));
        assert_eq!(parse_size("3t"), Ok(3 << 40));
        assert_eq!(parse_size(" 7 "), Ok(7));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow { .. })
        ));
        assert!(matches!(
            parse_size("999999999999999999999999"),
            Err(SizeError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["10G", "512M", "1536K", "4095"] {
            let n = parse_size(s).expect("parse");
            assert_eq!(format_size(n), s);
        }
    }
}
