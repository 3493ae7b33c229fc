//! Replies (control-spec §2.3 and §4): `CODE-text` (more lines follow), `CODE+key=` with a
//! dot-escaped data block, and a final `CODE text`. Every line ends with CRLF; text never carries a
//! bare CR or LF (they are replaced by spaces, or the value goes into a data block).

/// Reply status codes used here (control-spec §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Code(pub u16);

impl Code {
    /// OK.
    pub const OK: Self = Self(250);
    /// Operation was unnecessary.
    pub const UNNECESSARY: Self = Self(251);
    /// Resource exhausted.
    pub const EXHAUSTED: Self = Self(451);
    /// Syntax error: protocol.
    pub const PROTOCOL: Self = Self(500);
    /// Unrecognized command.
    pub const UNRECOGNIZED: Self = Self(510);
    /// Unimplemented command.
    pub const UNIMPLEMENTED: Self = Self(511);
    /// Syntax error in command argument.
    pub const SYNTAX: Self = Self(512);
    /// Unrecognized command argument.
    pub const BAD_ARG: Self = Self(513);
    /// Authentication required.
    pub const AUTH_REQUIRED: Self = Self(514);
    /// Bad authentication.
    pub const BAD_AUTH: Self = Self(515);
    /// Unspecified error.
    pub const UNSPECIFIED: Self = Self(550);
    /// Internal error.
    pub const INTERNAL: Self = Self(551);
    /// Unrecognized entity.
    pub const UNRECOGNIZED_ENTITY: Self = Self(552);
    /// Invalid configuration value.
    pub const INVALID_CONFIG: Self = Self(553);
    /// Asynchronous event.
    pub const EVENT: Self = Self(650);
}

/// Replace CR and LF so that `s` fits on one reply line.
pub fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// Builds one reply of several lines.
#[derive(Debug)]
pub struct Reply {
    code: Code,
    out: String,
}

impl Reply {
    /// A reply whose lines carry `code`.
    pub fn new(code: Code) -> Self {
        Self {
            code,
            out: String::new(),
        }
    }

    /// A mid-reply line `CODE-text`.
    pub fn mid(&mut self, text: &str) -> &mut Self {
        self.out
            .push_str(&format!("{}-{}\r\n", self.code.0, one_line(text)));
        self
    }

    /// `key=value`: a mid line if `value` is one line, else a `CODE+key=` data block.
    pub fn key_value(&mut self, key: &str, value: &str) -> &mut Self {
        if value.contains(['\r', '\n']) {
            self.out
                .push_str(&format!("{}+{}=\r\n", self.code.0, one_line(key)));
            self.out.push_str(&data_block(value));
        } else {
            self.mid(&format!("{key}={value}"));
        }
        self
    }

    /// A data block `CODE+text` followed by `body`, dot-escaped and ended by `.`.
    pub fn data(&mut self, text: &str, body: &str) -> &mut Self {
        self.out
            .push_str(&format!("{}+{}\r\n", self.code.0, one_line(text)));
        self.out.push_str(&data_block(body));
        self
    }

    /// Finish with `CODE text`.
    pub fn end(mut self, text: &str) -> String {
        self.out
            .push_str(&format!("{} {}\r\n", self.code.0, one_line(text)));
        self.out
    }
}

/// A one-line reply `CODE text`.
pub fn single(code: Code, text: &str) -> String {
    Reply::new(code).end(text)
}

/// `body` as data lines: dot-escaped, CRLF line ends, then `.`.
pub fn data_block(body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 8);
    for line in body.lines() {
        if line.starts_with('.') {
            out.push('.');
        }
        out.push_str(line.trim_end_matches('\r'));
        out.push_str("\r\n");
    }
    out.push_str(".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let mut r = Reply::new(Code::OK);
        r.key_value("version", "1.2")
            .key_value("ns/all", "r a\n.s b\n");
        let s = r.end("OK");
        assert_eq!(
            s,
            "250-version=1.2\r\n250+ns/all=\r\nr a\r\n..s b\r\n.\r\n250 OK\r\n"
        );
        assert_eq!(
            single(Code::UNRECOGNIZED, "Unrecognized command \"X\ny\""),
            "510 Unrecognized command \"X y\"\r\n"
        );
        assert_eq!(data_block(""), ".\r\n");
    }
}
