//! Splits the controller's byte stream into commands (control-spec §2.2–2.3).
//!
//! A command is one line (`KEYWORD args CRLF`), or a multi-line command: a first line that starts
//! with `+`, then data lines up to a line holding only `.` (lines starting with `.` are
//! dot-escaped). Bare LF is accepted as a line end, as Tor does. Everything is bounded: a line
//! longer than [`MAX_LINE`] and a multi-line body longer than [`MAX_DATA`] are errors after which
//! the connection is closed, and the buffer never grows past `MAX_LINE` without a line end.

/// Longest accepted line, in bytes, without its line end.
pub const MAX_LINE: usize = 16 * 1024;
/// Longest accepted body of a multi-line command, in bytes.
pub const MAX_DATA: usize = 64 * 1024;

/// One command from the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Command {
    /// The keyword, upper-cased (without a leading `+`).
    pub keyword: String,
    /// The rest of the first line after the keyword and one space (may be empty).
    pub args: String,
    /// The body of a multi-line command (dot-unescaped, lines joined with `\n`), else `None`.
    pub data: Option<String>,
}

/// Why the byte stream cannot be framed (the connection is closed after saying so).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A line exceeded [`MAX_LINE`].
    #[error("line too long (at most {MAX_LINE} bytes)")]
    LineTooLong,
    /// A multi-line command's body exceeded [`MAX_DATA`].
    #[error("multi-line command too long (at most {MAX_DATA} bytes)")]
    DataTooLong,
}

/// The sans-IO framer: bytes in, [`Command`]s out.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    /// The first line and body so far of a multi-line command being read.
    multi: Option<(String, String)>,
}

impl Framer {
    /// A new framer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the connection. Fails once a line cannot fit [`MAX_LINE`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), FrameError> {
        self.buf.extend_from_slice(bytes);
        if !self.buf.contains(&b'\n') && self.buf.len() > MAX_LINE + 1 {
            self.buf.clear();
            return Err(FrameError::LineTooLong);
        }
        Ok(())
    }

    /// Bytes waiting for a line end.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn take_line(&mut self) -> Result<Option<String>, FrameError> {
        let Some(pos) = self.buf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        if line.len() > MAX_LINE {
            return Err(FrameError::LineTooLong);
        }
        Ok(Some(String::from_utf8_lossy(&line).into_owned()))
    }

    /// The next complete command, if one is buffered.
    pub fn next_command(&mut self) -> Result<Option<Command>, FrameError> {
        loop {
            let Some(line) = self.take_line()? else {
                return Ok(None);
            };
            if let Some((first, mut body)) = self.multi.take() {
                if line == "." {
                    return Ok(Some(split_first(&first, Some(body))));
                }
                let unescaped = line.strip_prefix('.').unwrap_or(&line);
                if body.len() + unescaped.len() + 1 > MAX_DATA {
                    return Err(FrameError::DataTooLong);
                }
                if !body.is_empty() {
                    body.push('\n');
                }
                body.push_str(unescaped);
                self.multi = Some((first, body));
                continue;
            }
            if let Some(rest) = line.strip_prefix('+') {
                self.multi = Some((rest.to_owned(), String::new()));
                continue;
            }
            return Ok(Some(split_first(&line, None)));
        }
    }
}

fn split_first(line: &str, data: Option<String>) -> Command {
    let (kw, args) = line.split_once(' ').unwrap_or((line, ""));
    Command {
        keyword: kw.to_ascii_uppercase(),
        args: args.to_owned(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_crlf_and_lf_and_partial() {
        let mut f = Framer::new();
        f.push(b"getinfo version\r\nQUIT\nPROTO").unwrap();
        let c = f.next_command().unwrap().unwrap();
        assert_eq!(c.keyword, "GETINFO");
        assert_eq!(c.args, "version");
        let c = f.next_command().unwrap().unwrap();
        assert_eq!((c.keyword.as_str(), c.args.as_str()), ("QUIT", ""));
        assert_eq!(f.next_command().unwrap(), None);
        f.push(b"COLINFO 1\r\n").unwrap();
        let c = f.next_command().unwrap().unwrap();
        assert_eq!((c.keyword.as_str(), c.args.as_str()), ("PROTOCOLINFO", "1"));
    }

    #[test]
    fn multiline_dot_unescaped() {
        let mut f = Framer::new();
        f.push(b"+LOADCONF\r\nSocksPort 1\r\n..dot\r\n.\r\nQUIT\r\n")
            .unwrap();
        let c = f.next_command().unwrap().unwrap();
        assert_eq!(c.keyword, "LOADCONF");
        assert_eq!(c.data.as_deref(), Some("SocksPort 1\n.dot"));
        assert_eq!(f.next_command().unwrap().unwrap().keyword, "QUIT");
    }

    #[test]
    fn hostile_lengths_are_bounded() {
        let mut f = Framer::new();
        let long = vec![b'A'; MAX_LINE + 10];
        assert_eq!(f.push(&long), Err(FrameError::LineTooLong));
        assert_eq!(f.buffered(), 0);

        // A long line delivered together with its line end is refused too.
        let mut f = Framer::new();
        let mut long = vec![b'A'; MAX_LINE + 1];
        long.extend_from_slice(b"\r\n");
        f.push(&long[..MAX_LINE]).unwrap();
        f.push(&long[MAX_LINE..]).unwrap();
        assert_eq!(f.next_command(), Err(FrameError::LineTooLong));

        let mut f = Framer::new();
        f.push(b"+LOADCONF\r\n").unwrap();
        let line = vec![b'x'; 1000];
        let mut res = Ok(None);
        for _ in 0..100 {
            f.push(&line).unwrap();
            f.push(b"\r\n").unwrap();
            res = f.next_command();
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(FrameError::DataTooLong));
    }

    #[test]
    fn binary_garbage_does_not_panic() {
        let mut f = Framer::new();
        f.push(&[0xff, 0xfe, 0x00, b' ', 0x80, b'\n', b'\n'])
            .unwrap();
        let c = f.next_command().unwrap().unwrap();
        assert!(!c.keyword.is_empty());
        let c = f.next_command().unwrap().unwrap();
        assert_eq!(c.keyword, "");
    }
}
