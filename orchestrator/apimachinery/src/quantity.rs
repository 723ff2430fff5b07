//! Resource quantities (`10Gi`, `500M`, `1.5`, `250m`, `1e3`), read exactly
//! as Kubernetes' `resource.Quantity` reads them, into thousandths of the
//! base unit so sizes compare without rounding.

/// The value of `text` in thousandths of its unit (`"2"` is 2000, `"1Ki"`
/// is 1 024 000, `"250m"` is 250), or None when it is not a quantity.
/// Fractions below a thousandth round up, as Kubernetes rounds.
pub fn parse_milli(text: &str) -> Option<i128> {
    let s = text.trim();
    if s.is_empty() || s != text {
        return None;
    }
    let (negative, rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    // value = digits / 10^scale × 2^bin × 10^dec (× 1000 for milli).
    let digits: String = format!("{whole}{fraction}");
    let mut scale = fraction.len() as i32;
    let mut value: i128 = 0;
    for d in digits.bytes() {
        value = value.checked_mul(10)?.checked_add(i128::from(d - b'0'))?;
    }
    let (bin, dec): (u32, i32) = match suffix {
        "" => (0, 0),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        "n" => (0, -9),
        "u" => (0, -6),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        e if e.starts_with(['e', 'E']) && e.len() > 1 => {
            let exp: i32 = e[1..].parse().ok()?;
            if !(-30..=30).contains(&exp) {
                return None;
            }
            (0, exp)
        }
        _ => return None,
    };
    value = value.checked_mul(1i128.checked_shl(bin)?)?;
    scale -= dec + 3;
    if scale < 0 {
        value = value.checked_mul(10i128.checked_pow(scale.unsigned_abs())?)?;
    } else if scale > 0 {
        let div = 10i128.checked_pow(scale as u32)?;
        value = value.checked_add(div - 1)? / div;
    }
    // Kubernetes keeps a quantity's milli-value in an int64: anything
    // larger is refused, which also keeps sums of quantities from
    // overflowing.
    if value > i128::from(i64::MAX) {
        return None;
    }
    Some(if negative { -value } else { value })
}

/// A quantity as it stands in a JSON object: a string (`"500m"`) or, as
/// manifests may write it, a number (`2`).
pub fn milli_of(v: &serde_json::Value) -> Option<i128> {
    match v {
        serde_json::Value::String(s) => parse_milli(s),
        serde_json::Value::Number(n) => parse_milli(&n.to_string()),
        _ => None,
    }
}

/// A value in thousandths as Kubernetes prints a quantity canonically:
/// `2000` is `"2"`, `250` is `"250m"`, `1_000_000` is `"1k"`, and with
/// `binary` (the value was written in Ki, Mi, ...) `1_073_741_824_000` is
/// `"1Gi"`.
pub fn format_milli(milli: i128, binary: bool) -> String {
    if milli == 0 {
        return "0".into();
    }
    let sign = if milli < 0 { "-" } else { "" };
    let m = milli.unsigned_abs();
    if !m.is_multiple_of(1000) {
        return format!("{sign}{m}m");
    }
    let mut n = m / 1000;
    if binary {
        let mut unit = 0;
        while n.is_multiple_of(1024) && unit < 6 {
            n /= 1024;
            unit += 1;
        }
        if unit > 0 {
            let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][unit];
            return format!("{sign}{n}{suffix}");
        }
        return format!("{sign}{n}");
    }
    let mut unit = 0;
    while n.is_multiple_of(1000) && unit < 6 {
        n /= 1000;
        unit += 1;
    }
    let suffix = ["", "k", "M", "G", "T", "P", "E"][unit];
    format!("{sign}{n}{suffix}")
}

/// Whether a written quantity uses a binary suffix (Ki, Mi, ...), so sums
/// of it print in the same kind of unit.
pub fn is_binary(text: &str) -> bool {
    text.ends_with('i')
}

#[cfg(test)]
mod tests {
    use super::{format_milli, parse_milli};

    #[test]
    fn quantities_read_exactly() {
        assert_eq!(parse_milli("2"), Some(2000));
        assert_eq!(parse_milli("250m"), Some(250));
        assert_eq!(parse_milli("1Ki"), Some(1_024_000));
        assert_eq!(parse_milli("1.5Gi"), Some(1_610_612_736_000));
        assert_eq!(parse_milli("10G"), Some(10_000_000_000_000));
        assert_eq!(parse_milli("1e3"), Some(1_000_000));
        assert_eq!(parse_milli("-1"), Some(-1000));
        assert_eq!(parse_milli("1n"), Some(1));
        assert_eq!(parse_milli(".5"), Some(500));
    }

    #[test]
    fn quantities_print_canonically() {
        assert_eq!(format_milli(2000, false), "2");
        assert_eq!(format_milli(100, false), "100m");
        assert_eq!(format_milli(1_000_000, false), "1k");
        assert_eq!(format_milli(0, true), "0");
        assert_eq!(format_milli(parse_milli("1Gi").unwrap(), true), "1Gi");
        assert_eq!(format_milli(parse_milli("1.5Gi").unwrap(), true), "1536Mi");
        assert_eq!(format_milli(parse_milli("1500").unwrap(), true), "1500");
    }

    #[test]
    fn non_quantities_are_refused() {
        for bad in ["", "Gi", "1.2.3", "1X", "ten", " 1", "1e", "1e99"] {
            assert_eq!(parse_milli(bad), None, "{bad}");
        }
    }
}
