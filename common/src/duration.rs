//! Durations as people write them in flags, env and the CRD: `250ms`, `5s`,
//! `2m`, `1h`, `7d`, and sums like `1h30m`.

use std::time::Duration;

/// The pattern the CRD schema enforces for duration strings.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h|d))+$";

/// Parses a duration; the error says what form is expected.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration; use e.g. 500ms, 5s, 2m, 1h or 7d".into());
    }
    let mut rest = t;
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| {
                format!("'{t}' has no unit; use a number with ms, s, m, h or d, e.g. 500ms or 5s")
            })?;
        if num_end == 0 {
            return Err(format!(
                "'{t}' is not a duration; use e.g. 500ms, 5s, 2m, 1h or 7d"
            ));
        }
        let n: f64 = rest[..num_end]
            .parse()
            .map_err(|_| format!("'{t}' is not a duration; use e.g. 500ms, 5s, 2m, 1h or 7d"))?;
        let after = &rest[num_end..];
        let unit_end = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let factor = match &after[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            u => {
                return Err(format!(
                    "'{t}' has an unknown unit '{u}'; use ms, s, m, h or d"
                ));
            }
        };
        total += n * factor;
        rest = &after[unit_end..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(format!("'{t}' is too long a duration"));
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration in the same notation (whole units where possible).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{ms}ms");
    }
    let s = d.as_secs();
    if s != 0 && s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s != 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s != 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn errors_say_the_expected_form() {
        assert!(parse_duration("5").unwrap_err().contains("no unit"));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn formats_round_trip() {
        for s in ["250ms", "5s", "2m", "1h", "7d", "90s"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
