//! Dates for people: RFC 3339 UTC text for unix seconds (logs, key tools, `consensus show`).

/// `YYYY-MM-DDTHH:MM:SSZ` (RFC 3339, UTC) for unix seconds.
pub fn rfc3339(t: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(t);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// `YYYY-MM-DD HH:MM:SS` (UTC, for tables) for unix seconds.
pub fn utc_table(t: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(t);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02}")
}

/// Year, month, day, hour, minute, second of unix seconds (proleptic Gregorian, UTC).
fn civil(t: u64) -> (i64, i64, i64, u64, u64, u64) {
    let days = i64::try_from(t / 86400).unwrap_or(i64::MAX / 2);
    let secs = t % 86400;
    // Civil-from-days (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_800_000_000), "2027-01-15T08:00:00Z");
        assert_eq!(utc_table(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(rfc3339(951_868_799), "2000-02-29T23:59:59Z");
    }
}
