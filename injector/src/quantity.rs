//! Kubernetes resource quantities (`100m`, `0.5`, `128Mi`, `1e3`), read
//! as the API server reads them, so the sidecar's requests and limits can
//! be checked and compared before they reach a pod.
//!
//! The grammar (k8s.io/apimachinery resource.Quantity): an optional `+`,
//! digits with at most one decimal point, then a binary suffix (`Ki` …
//! `Ei`), a decimal one (`m`, none, `k`, `M`, `G`, `T`, `P`, `E`) or a
//! decimal exponent (`e3`, `E-2`). Negative amounts are not resources.

/// The quantity's value in billionths (the API server's finest unit:
/// finer digits round up, as it rounds them), or `None` when `text` is
/// not a non-negative quantity or is too large to be a resource.
pub fn parse(text: &str) -> Option<u128> {
    let s = text.strip_prefix('+').unwrap_or(text);
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return None;
    }
    let (binary_exp, decimal_exp): (u32, i32) = match suffix {
        "" => (0, 0),
        "m" => (0, -3),
        "k" => (0, 3),
        "M" => (0, 6),
        "G" => (0, 9),
        "T" => (0, 12),
        "P" => (0, 15),
        "E" => (0, 18),
        "Ki" => (10, 0),
        "Mi" => (20, 0),
        "Gi" => (30, 0),
        "Ti" => (40, 0),
        "Pi" => (50, 0),
        "Ei" => (60, 0),
        other => {
            let exp = other.strip_prefix(['e', 'E'])?;
            let digits = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits.is_empty() || digits.len() > 4 || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (0, exp.parse().ok()?)
        }
    };
    // value = digits × 10^(exp) billionths, × 2^binary_exp.
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let exp = decimal_exp + 9 - i32::try_from(frac.len()).ok()?;
    let (kept, round_up) = if exp >= 0 {
        (digits, false)
    } else {
        let drop = usize::try_from(-exp).ok()?;
        let keep = digits.len().saturating_sub(drop);
        let (kept, dropped) = digits.split_at(keep);
        (kept, dropped.bytes().any(|b| b != b'0'))
    };
    let mantissa: u128 = if kept.is_empty() {
        0
    } else if kept.len() > 38 {
        return None;
    } else {
        kept.parse().ok()?
    };
    let mantissa = mantissa.checked_add(u128::from(round_up))?;
    let scale = 10u128.checked_pow(u32::try_from(exp.max(0)).ok()?)?;
    mantissa
        .checked_mul(scale)?
        .checked_mul(1u128.checked_shl(binary_exp)?)
}

#[cfg(test)]
mod tests {
    use super::parse;

    const N: u128 = 1_000_000_000;

    #[test]
    fn values() {
        assert_eq!(parse("100m"), Some(N / 10));
        assert_eq!(parse("0.1"), parse("100m"));
        assert_eq!(parse(".5"), Some(N / 2));
        assert_eq!(parse("5."), Some(5 * N));
        assert_eq!(parse("+2"), Some(2 * N));
        assert_eq!(parse("1.5Ki"), Some(1536 * N));
        assert_eq!(parse("1Gi"), parse("1073741824"));
        assert_eq!(parse("1e3"), parse("1k"));
        assert_eq!(parse("2E-3"), parse("2m"));
        assert_eq!(parse("1E"), Some(N * 10u128.pow(18)));
        assert_eq!(parse("0"), Some(0));
        assert_eq!(parse("000.000"), Some(0));
        // Finer than a billionth rounds up, as the API server does.
        assert_eq!(parse("0.0000000001"), Some(1));
        assert!(parse("1Mi") < parse("1M").map(|v| v + 1).map(|v| v * 2));
    }

    #[test]
    fn refused() {
        for bad in [
            "", ".", "1.5.5", "-1", "lots", "1 Gi", "1Gb", "1e", "1e+", "1ee3", "Mi", "1.2.3Mi",
            "1e99999", "0x10", "1_000",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
        // Too large to be a resource.
        assert_eq!(parse("1e40"), None);
    }
}
