//! Command arguments: bare words, `KEY=VALUE` pairs and quoted strings (control-spec §2.1).
//!
//! A quoted string is `"` ... `"` with backslash escapes: `\\`, `\"`, `\n`, `\r`, `\t`, octal
//! `\ooo` (1 to 3 digits, at most 255), and `\x` for any other `x`. Anything malformed is an
//! [`ArgError`], never a panic.

/// Most arguments one command may carry.
pub const MAX_ARGS: usize = 512;

/// One argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arg {
    /// The key of a `KEY=VALUE` argument.
    pub key: Option<String>,
    /// The (unescaped) value, or the bare word.
    pub value: String,
    /// Whether the value was a quoted string.
    pub quoted: bool,
}

/// A syntax error in arguments (reply 512).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    /// A quoted string has no closing quote.
    #[error("unterminated quoted string")]
    Unterminated,
    /// A backslash escape is malformed.
    #[error("bad escape in quoted string")]
    BadEscape,
    /// Something follows a closing quote without a space.
    #[error("garbage after quoted string")]
    TrailingGarbage,
    /// More than [`MAX_ARGS`] arguments.
    #[error("too many arguments")]
    TooMany,
}

/// Parse a quoted string at the start of `s` (which starts with `"`); returns the value and the
/// rest of `s` after the closing quote.
pub fn parse_quoted(s: &str) -> Result<(String, &str), ArgError> {
    let mut chars = s.char_indices();
    if chars.next().map(|(_, c)| c) != Some('"') {
        return Err(ArgError::Unterminated);
    }
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, s.get(i + 1..).unwrap_or(""))),
            '\\' => {
                let Some((_, e)) = chars.next() else {
                    return Err(ArgError::Unterminated);
                };
                match e {
                    'n' => out.push('\n'),
                    'r' => out.push('\r'),
                    't' => out.push('\t'),
                    '0'..='7' => {
                        let mut v = u32::from(e) - u32::from('0');
                        for _ in 0..2 {
                            let rest = chars.as_str();
                            match rest.chars().next() {
                                Some(d @ '0'..='7') => {
                                    v = v * 8 + (u32::from(d) - u32::from('0'));
                                    chars.next();
                                }
                                _ => break,
                            }
                        }
                        let b = u8::try_from(v).map_err(|_| ArgError::BadEscape)?;
                        out.push(char::from(b));
                    }
                    other => out.push(other),
                }
            }
            other => out.push(other),
        }
    }
    Err(ArgError::Unterminated)
}

/// Quote `s` as a control-protocol quoted string.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\{:03o}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Split `s` into arguments.
pub fn parse_args(s: &str) -> Result<Vec<Arg>, ArgError> {
    let mut out = Vec::new();
    let mut rest = s.trim_start_matches([' ', '\t']);
    while !rest.is_empty() {
        if out.len() >= MAX_ARGS {
            return Err(ArgError::TooMany);
        }
        if rest.starts_with('"') {
            let (value, after) = parse_quoted(rest)?;
            out.push(Arg {
                key: None,
                value,
                quoted: true,
            });
            rest = after;
        } else {
            let end = rest.find([' ', '\t', '=']).unwrap_or(rest.len());
            let (word, after) = rest.split_at(end);
            if let Some(after_eq) = after.strip_prefix('=') {
                if after_eq.starts_with('"') {
                    let (value, after) = parse_quoted(after_eq)?;
                    out.push(Arg {
                        key: Some(word.to_owned()),
                        value,
                        quoted: true,
                    });
                    rest = after;
                } else {
                    let end = after_eq.find([' ', '\t']).unwrap_or(after_eq.len());
                    let (value, after) = after_eq.split_at(end);
                    out.push(Arg {
                        key: Some(word.to_owned()),
                        value: value.to_owned(),
                        quoted: false,
                    });
                    rest = after;
                }
            } else {
                out.push(Arg {
                    key: None,
                    value: word.to_owned(),
                    quoted: false,
                });
                rest = after;
            }
        }
        if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
            return Err(ArgError::TrailingGarbage);
        }
        rest = rest.trim_start_matches([' ', '\t']);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_pairs_and_quotes() {
        let a = parse_args(r#"SAFECOOKIE  ab12 Key="a \"b\" \\ \n\101" K2=v "x y""#).unwrap();
        assert_eq!(a.len(), 5);
        assert_eq!(a[0].value, "SAFECOOKIE");
        assert_eq!(a[2].key.as_deref(), Some("Key"));
        assert_eq!(a[2].value, "a \"b\" \\ \nA");
        assert!(a[2].quoted);
        assert_eq!(
            (a[3].key.as_deref(), a[3].value.as_str()),
            (Some("K2"), "v")
        );
        assert_eq!(a[4].value, "x y");
        assert!(parse_args("").unwrap().is_empty());
        assert!(parse_args("   ").unwrap().is_empty());
    }

    #[test]
    fn bad_quoting_is_an_error() {
        assert_eq!(parse_args(r#""abc"#), Err(ArgError::Unterminated));
        assert_eq!(parse_args(r#""abc\"#), Err(ArgError::Unterminated));
        assert_eq!(parse_args(r#"K="abc"x"#), Err(ArgError::TrailingGarbage));
        assert_eq!(parse_args(r#""\777""#), Err(ArgError::BadEscape));
        assert_eq!(
            parse_args(&"a ".repeat(MAX_ARGS + 1)),
            Err(ArgError::TooMany)
        );
    }

    #[test]
    fn quote_round_trips() {
        for s in [
            "",
            "plain",
            "a \"q\" \\ b",
            "line\nbreak\r\t",
            "\u{1}\u{7f}é",
        ] {
            let q = quote(s);
            let (back, rest) = parse_quoted(&q).unwrap();
            assert_eq!(back, s);
            assert_eq!(rest, "");
        }
    }
}
