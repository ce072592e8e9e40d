//! Durations and sizes in an operator's words: "30m", "50MiB", "5 days". Parsed once, at the
//! edge (config file, command line, API), and formatted for replies and DSNs.
//!
//! Pure text functions; owns no state and must not know where the text came from.

use std::time::Duration;

/// Units of a duration in seconds.
pub const DURATION_UNITS: &[(&str, u64)] = &[("s", 1), ("m", 60), ("h", 3600), ("d", 86400)];

/// The longest duration a configuration may set: ten years (time arithmetic stays far from
/// overflow).
pub const MAX_DURATION_SECS: u64 = 3650 * 86400;

/// A duration in the operator's words: "5 days", "4 hours", "90 seconds", "1 second".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if s > 0 && s.is_multiple_of(86400) {
        plural(s / 86400, "day")
    } else if s > 0 && s.is_multiple_of(3600) {
        plural(s / 3600, "hour")
    } else if s > 0 && s.is_multiple_of(60) && s < 3600 {
        plural(s / 60, "minute")
    } else if s == 0 && d.subsec_millis() > 0 {
        format!("{} ms", d.subsec_millis())
    } else {
        plural(s, "second")
    }
}

/// A size in binary units, to a tenth: "75 MiB", "1.5 GiB", "512 B".
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            let whole = bytes / size;
            let tenth = (bytes % size) * 10 / size;
            return match tenth {
                0 => format!("{whole} {name}"),
                _ => format!("{whole}.{tenth} {name}"),
            };
        }
    }
    format!("{bytes} B")
}

/// "30m", "2h", "90" (seconds): a duration in seconds, for the command line.
pub fn parse_duration(text: &str) -> Option<u64> {
    parse_with_unit(text, DURATION_UNITS).filter(|&s| s > 0 && s <= MAX_DURATION_SECS)
}

/// "50MiB", "10MB", "1000" (bytes): a size, as in the configuration file.
pub fn parse_size(text: &str) -> Option<u64> {
    parse_with_unit(text, SIZE_UNITS).filter(|&n| n > 0)
}

pub const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
];

pub fn parse_with_unit(text: &str, units: &[(&str, u64)]) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit = unit.trim();
    if unit.is_empty() {
        return Some(number);
    }
    let factor = units.iter().find(|(u, _)| *u == unit)?.1;
    number.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_and_print() {
        assert_eq!(parse_duration("30m"), Some(1800));
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("3651d"), None);
        assert_eq!(parse_size("50MiB"), Some(50 << 20));
        assert_eq!(parse_size("18446744073709551615GiB"), None);
        assert_eq!(human_duration(Duration::from_secs(5 * 86400)), "5 days");
        assert_eq!(human_duration(Duration::from_secs(3600)), "1 hour");
        assert_eq!(human_duration(Duration::from_secs(90)), "90 seconds");
        assert_eq!(human_duration(Duration::from_millis(250)), "250 ms");
        assert_eq!(human_size(75 << 20), "75 MiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(u64::MAX), "16777215.9 TiB");
    }
}
