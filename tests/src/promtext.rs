//! A strict, independent checker of the Prometheus text exposition format 0.0.4, line by
//! line, for tests of `/metrics` pages (the Python script in `tests/scripts/` also runs
//! Prometheus's own parser when it is installed).
//!
//! It checks: every line is a `# HELP`, a `# TYPE`, another comment or a sample; names and
//! label names are valid; label values use only the `\\`, `\"` and `\n` escapes; values are
//! floats (`NaN`, `+Inf`, `-Inf` included); a family's `TYPE` comes before its samples, once;
//! a family's samples are contiguous; counters end in `_total`; histograms have `_bucket`
//! samples with ascending `le` ending at `+Inf`, non-decreasing counts, `_sum`, and `_count`
//! equal to the `+Inf` bucket; no sample (name and labels) appears twice.

use std::collections::{BTreeMap, HashSet};

/// One sample: its labels (sorted) and value.
pub type Sample = (BTreeMap<String, String>, f64);

/// A parsed page: family name → (type, samples by full sample name).
pub type Page = BTreeMap<String, (String, Vec<(String, Sample)>)>;

fn valid_name(n: &str, colon: bool) -> bool {
    let mut b = n.bytes();
    b.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == b'_' || (colon && c == b':'))
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || (colon && c == b':'))
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}")),
    }
}

/// Parse `{a="x",b="y"}` at the start of `s`; returns the labels and the rest.
fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(mut rest) = s.strip_prefix('{') else {
        return Ok((labels, s));
    };
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without '='")?;
        let name = &rest[..eq];
        if !valid_name(name, false) {
            return Err(format!("bad label name {name:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".into()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, '\n')) => return Err("raw newline in a label value".into()),
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &rest[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        } else if !rest.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &BTreeMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types
                .get(base)
                .is_some_and(|t| t == "histogram" || t == "summary")
        {
            return Some(base);
        }
    }
    None
}

/// Check a page; returns it parsed, or the first problem with its line number.
pub fn check(text: &str) -> Result<Page, String> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("the page does not end with a newline".into());
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = HashSet::new();
    let mut page: Page = BTreeMap::new();
    let mut seen = HashSet::new();
    let mut finished: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for (i, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", i + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let mut parts = c.trim_start().splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("HELP"), Some(name), _)
                    if !valid_name(name, true) || !helps.insert(name.to_owned()) =>
                {
                    return Err(at("bad or repeated HELP".into()));
                }
                (Some("TYPE"), Some(name), Some(t)) => {
                    if !valid_name(name, true)
                        || !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t)
                    {
                        return Err(at("bad TYPE".into()));
                    }
                    if types.insert(name.to_owned(), t.to_owned()).is_some()
                        || page.contains_key(name)
                    {
                        return Err(at("TYPE repeated or after samples".into()));
                    }
                    if t == "counter" && !name.ends_with("_total") {
                        return Err(at("a counter whose name does not end in _total".into()));
                    }
                    if let Some(prev) = current.replace(name.to_owned()) {
                        finished.insert(prev);
                    }
                    page.insert(name.to_owned(), (t.to_owned(), Vec::new()));
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| at("no value".into()))?;
        let name = &line[..name_end];
        if !valid_name(name, true) {
            return Err(at("bad metric name".into()));
        }
        let (labels, rest) = parse_labels(&line[name_end..]).map_err(at)?;
        let mut fields = rest.trim_start_matches(' ').split(' ');
        let value = parse_value(fields.next().unwrap_or_default()).map_err(at)?;
        if let Some(ts) = fields.next()
            && ts.parse::<i64>().is_err()
        {
            return Err(at("bad timestamp".into()));
        }
        if fields.next().is_some() {
            return Err(at("trailing fields".into()));
        }
        let fam = family_of(name, &types)
            .ok_or_else(|| at("a sample without a TYPE line before it".into()))?
            .to_owned();
        if finished.contains(&fam) || current.as_deref() != Some(fam.as_str()) {
            return Err(at("a family's samples are not contiguous".into()));
        }
        if !seen.insert(format!("{name}{labels:?}")) {
            return Err(at("the same sample twice".into()));
        }
        if let Some((_, samples)) = page.get_mut(&fam) {
            samples.push((name.to_owned(), (labels, value)));
        }
    }
    for (fam, (t, samples)) in &page {
        if t != "histogram" {
            continue;
        }
        let bucket = format!("{fam}_bucket");
        let mut last_le = f64::NEG_INFINITY;
        let mut last_n = 0.0;
        let mut inf = None;
        for (n, (labels, v)) in samples.iter().filter(|(n, _)| *n == bucket) {
            let le = labels
                .get("le")
                .ok_or_else(|| format!("{n} without le"))
                .and_then(|l| parse_value(l))?;
            if le <= last_le || *v < last_n {
                return Err(format!("{fam}: buckets not ascending or not cumulative"));
            }
            (last_le, last_n) = (le, *v);
            if le == f64::INFINITY {
                inf = Some(*v);
            }
        }
        let get = |suffix: &str| {
            samples
                .iter()
                .find(|(n, _)| *n == format!("{fam}{suffix}"))
                .map(|(_, (_, v))| *v)
        };
        let count = get("_count").ok_or_else(|| format!("{fam}: no _count"))?;
        get("_sum").ok_or_else(|| format!("{fam}: no _sum"))?;
        if inf != Some(count) {
            return Err(format!("{fam}: the +Inf bucket is not _count"));
        }
    }
    Ok(page)
}

/// The value of the sample `name` with `labels` (all of them), if present.
pub fn value(page: &Page, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.values()
        .flat_map(|(_, s)| s.iter())
        .find(|(n, (l, _))| {
            n == name
                && l.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, (_, v))| *v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_page_and_rejects_each_fault() {
        let good = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n\
                    # TYPE g gauge\ng NaN\n";
        let p = check(good).unwrap();
        assert_eq!(value(&p, "a_total", &[("x", "q\"\\\n")]), Some(1.0));
        assert_eq!(value(&p, "h_count", &[]), Some(2.0));
        for bad in [
            "a 1\n",                                                             // no TYPE
            "# TYPE a counter\na 1\n",          // counter without _total
            "# TYPE a gauge\na{x=y} 1\n",       // unquoted
            "# TYPE a gauge\na{x=\"\\t\"} 1\n", // bad escape
            "# TYPE a gauge\na one\n",          // bad value
            "# TYPE a gauge\na 1\na 2\n",       // twice
            "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n", // not contiguous
            "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 2\n", // +Inf != count
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE a gauge\na 1", // no final newline
        ] {
            assert!(check(bad).is_err(), "accepted {bad:?}");
        }
    }
}
