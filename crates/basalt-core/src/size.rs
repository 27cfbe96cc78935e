//! Human sizes: `512M`, `10G`, `4096`, `1.5T` (binary units, as operators expect).

/// Why a size string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    /// The string is empty or not a number with an optional unit.
    #[error(
        "invalid size {0:?}: expected a number with an optional unit K, M, G, T or P (e.g. 512M, 10G)"
    )]
    Malformed(String),
    /// The size does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size with an optional binary unit suffix (K, M, G, T, P; optional
/// `i`/`iB`/`B`). Fractions are allowed with a unit (`1.5G`); the result is
/// rounded down to whole bytes.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let unit = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('B').filter(|u| !u.is_empty()))
        .or_else(|| unit.strip_suffix('I'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" | "B" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        _ => return Err(SizeError::Malformed(text.to_string())),
    };
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| SizeError::Overflow(text.to_string()))?
    };
    let mut bytes = whole
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))?;
    if !fraction.is_empty() {
        if shift == 0 {
            return Err(SizeError::Malformed(text.to_string()));
        }
        if fraction.len() > 9 {
            return Err(SizeError::Malformed(text.to_string()));
        }
        // Exact decimal fraction of the unit: fraction * 2^shift / 10^digits.
        let numerator: u128 = fraction
            .parse()
            .map_err(|_| SizeError::Malformed(text.to_string()))?;
        let denominator = 10u128.pow(fraction.len() as u32);
        let extra = u64::try_from((numerator << shift) / denominator)
            .map_err(|_| SizeError::Overflow(text.to_string()))?;
        bytes = bytes
            .checked_add(extra)
            .ok_or_else(|| SizeError::Overflow(text.to_string()))?;
    }
    Ok(bytes)
}

/// Formats a byte count for people: `512 MiB`, `10 GiB`, `1.5 GiB`, `4096 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if (value - value.round()).abs() < 0.005 {
        format!("{:.0} {}", value, UNITS[unit])
    } else {
        format!("{:.2} {}", value, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10gb"), Ok(10 << 30));
        assert_eq!(parse_size("1Ki"), Ok(1024));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("0.25K"), Ok(256));
        assert_eq!(parse_size(" 2T "), Ok(2 << 40));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "G", "ten", "1.2.3G", "5X", "1.5", "-1G", "."] {
            assert!(parse_size(bad).is_err(), "{bad} should be refused");
        }
        assert!(matches!(
            parse_size("99999999999P"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(4096), "4 KiB");
        assert_eq!(format_size(512 << 20), "512 MiB");
        assert_eq!(format_size(3 << 29), "1.50 GiB");
        assert_eq!(format_size(100), "100 B");
    }
}
