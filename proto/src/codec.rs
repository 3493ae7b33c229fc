//! The one byte codec: a bounded [`Reader`] over a byte slice and its mirror, a [`Writer`] into a
//! caller-provided buffer.
//!
//! Invariants:
//! - Integers are big-endian.
//! - Every read is checked against the bytes remaining before anything is copied or allocated; a
//!   short input yields [`ProtoError::Truncated`], never a panic.
//! - Messages that must be consumed completely end with [`Reader::should_be_exhausted`].
//! - The writer never grows its buffer: running out of room is [`ProtoError::NoRoom`], so encoding a
//!   cell never allocates.

use crate::err::{ProtoError, Result};

/// A cursor over untrusted bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    off: usize,
    object: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader over `buf`; errors name the object as "message".
    pub fn new(buf: &'a [u8]) -> Self {
        Self::for_object(buf, "message")
    }

    /// A reader over `buf` whose errors name `object` (for example `"CREATE body"`).
    pub fn for_object(buf: &'a [u8], object: &'static str) -> Self {
        Self {
            buf,
            off: 0,
            object,
        }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.off)
    }

    /// Bytes read so far.
    pub fn consumed(&self) -> usize {
        self.off
    }

    /// The object name used in errors.
    pub fn object(&self) -> &'static str {
        self.object
    }

    /// Fail with [`ProtoError::TrailingBytes`] unless every byte was read.
    pub fn should_be_exhausted(&self) -> Result<()> {
        match self.remaining() {
            0 => Ok(()),
            count => Err(ProtoError::TrailingBytes {
                object: self.object,
                count,
            }),
        }
    }

    /// The next `n` bytes, borrowed.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let rest = self.buf.get(self.off..).unwrap_or_default();
        let (head, _) = rest.split_at_checked(n).ok_or(ProtoError::Truncated {
            object: self.object,
            needed: n,
            remaining: rest.len(),
        })?;
        self.off += n;
        Ok(head)
    }

    /// Everything not read yet.
    pub fn take_rest(&mut self) -> &'a [u8] {
        let rest = self.buf.get(self.off..).unwrap_or_default();
        self.off = self.buf.len();
        rest
    }

    /// Peek at the next `n` bytes without consuming them.
    pub fn peek(&self, n: usize) -> Result<&'a [u8]> {
        let mut copy = self.clone();
        copy.take(n)
    }

    /// The next `N` bytes as an array.
    pub fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let b = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// One byte.
    pub fn take_u8(&mut self) -> Result<u8> {
        Ok(u8::from_be_bytes(self.take_array()?))
    }

    /// A big-endian `u16`.
    pub fn take_u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }

    /// A big-endian `u32`.
    pub fn take_u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }

    /// A big-endian `u64`.
    pub fn take_u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take_array()?))
    }

    /// The bytes up to (not including) the first `delim`, which is consumed too.
    /// Fails if `delim` does not occur.
    pub fn take_until(&mut self, delim: u8) -> Result<&'a [u8]> {
        let rest = self.buf.get(self.off..).unwrap_or_default();
        let pos = rest
            .iter()
            .position(|&b| b == delim)
            .ok_or(ProtoError::Invalid {
                object: self.object,
                problem: "missing terminator",
            })?;
        let out = self.take(pos)?;
        self.take(1)?;
        Ok(out)
    }

    /// A `u8` length `n`, then `n` bytes, borrowed.
    pub fn take_u8len(&mut self) -> Result<&'a [u8]> {
        let n = self.take_u8()?;
        self.take(usize::from(n))
    }

    /// A `u16` length `n`, then `n` bytes, borrowed.
    pub fn take_u16len(&mut self) -> Result<&'a [u8]> {
        let n = self.take_u16()?;
        self.take(usize::from(n))
    }

    /// A `u8` length `n`, then `n` bytes parsed by `f` with a nested reader that must be exhausted.
    pub fn read_nested_u8len<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let inner = self.take_u8len()?;
        self.nested(inner, f)
    }

    /// A `u16` length `n`, then `n` bytes parsed by `f` with a nested reader that must be exhausted.
    pub fn read_nested_u16len<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let inner = self.take_u16len()?;
        self.nested(inner, f)
    }

    fn nested<T>(&self, inner: &'a [u8], f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let mut r = Self::for_object(inner, self.object);
        let v = f(&mut r)?;
        r.should_be_exhausted()?;
        Ok(v)
    }

    /// Fail unless every remaining byte is zero (fixed-size bodies with zero padding), consuming them.
    pub fn expect_zero_padding(&mut self) -> Result<()> {
        let rest = self.take_rest();
        if rest.iter().any(|&b| b != 0) {
            return Err(ProtoError::Invalid {
                object: self.object,
                problem: "non-zero padding",
            });
        }
        Ok(())
    }
}

/// A cursor writing into a fixed caller-provided buffer (never allocates, never panics).
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    off: usize,
    object: &'static str,
}

impl<'a> Writer<'a> {
    /// A writer at the start of `buf`; errors name the object as "message".
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self::for_object(buf, "message")
    }

    /// A writer at the start of `buf` whose errors name `object`.
    pub fn for_object(buf: &'a mut [u8], object: &'static str) -> Self {
        Self {
            buf,
            off: 0,
            object,
        }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.off
    }

    /// Room left.
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.off)
    }

    fn slot(&mut self, n: usize) -> Result<&mut [u8]> {
        let remaining = self.remaining();
        let object = self.object;
        let rest = self.buf.get_mut(self.off..).unwrap_or_default();
        let (head, _) = rest.split_at_mut_checked(n).ok_or(ProtoError::NoRoom {
            object,
            needed: n,
            remaining,
        })?;
        self.off += n;
        Ok(head)
    }

    /// Write bytes as they are.
    pub fn write_all(&mut self, b: &[u8]) -> Result<()> {
        self.slot(b.len())?.copy_from_slice(b);
        Ok(())
    }

    /// Write `n` zero bytes.
    pub fn write_zeros(&mut self, n: usize) -> Result<()> {
        self.slot(n)?.fill(0);
        Ok(())
    }

    /// Zero the rest of the buffer (fixed-size bodies).
    pub fn zero_pad_to_end(&mut self) {
        let n = self.remaining();
        if let Ok(s) = self.slot(n) {
            s.fill(0);
        }
    }

    /// One byte.
    pub fn write_u8(&mut self, v: u8) -> Result<()> {
        self.write_all(&[v])
    }

    /// A big-endian `u16`.
    pub fn write_u16(&mut self, v: u16) -> Result<()> {
        self.write_all(&v.to_be_bytes())
    }

    /// A big-endian `u32`.
    pub fn write_u32(&mut self, v: u32) -> Result<()> {
        self.write_all(&v.to_be_bytes())
    }

    /// A big-endian `u64`.
    pub fn write_u64(&mut self, v: u64) -> Result<()> {
        self.write_all(&v.to_be_bytes())
    }

    /// A `u8` length, then `b`.
    pub fn write_u8len(&mut self, b: &[u8]) -> Result<()> {
        let n = u8::try_from(b.len()).map_err(|_| ProtoError::TooLong {
            object: self.object,
            len: b.len(),
            max: usize::from(u8::MAX),
        })?;
        self.write_u8(n)?;
        self.write_all(b)
    }

    /// A `u16` length, then `b`.
    pub fn write_u16len(&mut self, b: &[u8]) -> Result<()> {
        let n = u16::try_from(b.len()).map_err(|_| ProtoError::TooLong {
            object: self.object,
            len: b.len(),
            max: usize::from(u16::MAX),
        })?;
        self.write_u16(n)?;
        self.write_all(b)
    }

    /// A `u8` length, then whatever `f` writes (the length is filled in afterwards).
    pub fn write_nested_u8len(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<()>,
    ) -> Result<()> {
        let start = self.off;
        self.write_u8(0)?;
        let n = self.nested(f)?;
        let n = u8::try_from(n).map_err(|_| ProtoError::TooLong {
            object: self.object,
            len: n,
            max: usize::from(u8::MAX),
        })?;
        self.patch(start, &[n]);
        Ok(())
    }

    /// A `u16` length, then whatever `f` writes (the length is filled in afterwards).
    pub fn write_nested_u16len(
        &mut self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<()>,
    ) -> Result<()> {
        let start = self.off;
        self.write_u16(0)?;
        let n = self.nested(f)?;
        let n = u16::try_from(n).map_err(|_| ProtoError::TooLong {
            object: self.object,
            len: n,
            max: usize::from(u16::MAX),
        })?;
        self.patch(start, &n.to_be_bytes());
        Ok(())
    }

    fn nested(&mut self, f: impl FnOnce(&mut Writer<'_>) -> Result<()>) -> Result<usize> {
        let object = self.object;
        let rest = self.buf.get_mut(self.off..).unwrap_or_default();
        let mut w = Writer::for_object(rest, object);
        f(&mut w)?;
        let n = w.off;
        self.off += n;
        Ok(n)
    }

    fn patch(&mut self, at: usize, b: &[u8]) {
        if let Some(s) = self.buf.get_mut(at..at.saturating_add(b.len())) {
            s.copy_from_slice(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_integers_and_bounds() {
        let b = hex::decode("01020304050607080910111213141516").unwrap();
        let mut r = Reader::new(&b);
        assert_eq!(r.take_u8().unwrap(), 0x01);
        assert_eq!(r.take_u16().unwrap(), 0x0203);
        assert_eq!(r.take_u32().unwrap(), 0x04050607);
        assert_eq!(r.take_u64().unwrap(), 0x0809101112131415);
        assert_eq!(r.remaining(), 1);
        assert!(matches!(
            r.take_u16(),
            Err(ProtoError::Truncated {
                needed: 2,
                remaining: 1,
                ..
            })
        ));
        assert!(matches!(
            r.should_be_exhausted(),
            Err(ProtoError::TrailingBytes { count: 1, .. })
        ));
        assert_eq!(r.take_array::<1>().unwrap(), [0x16]);
        r.should_be_exhausted().unwrap();
    }

    #[test]
    fn nested_lengths_checked_before_use() {
        // Claims 200 bytes, has 2.
        let mut r = Reader::new(&[200, 1, 2]);
        assert!(r.take_u8len().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 1]);
        assert!(r.take_u16len().is_err());
        // Nested reader must be exhausted.
        let mut r = Reader::new(&[2, 7, 8]);
        assert!(matches!(
            r.read_nested_u8len(|r| r.take_u8()),
            Err(ProtoError::TrailingBytes { count: 1, .. })
        ));
        let mut r = Reader::new(&[0, 2, 7, 8, 9]);
        assert_eq!(r.read_nested_u16len(|r| r.take_u16()).unwrap(), 0x0708);
        assert_eq!(r.remaining(), 1);
    }

    #[test]
    fn take_until_and_padding() {
        let mut r = Reader::new(b"abc\0\0\0");
        assert_eq!(r.take_until(0).unwrap(), b"abc");
        r.expect_zero_padding().unwrap();
        let mut r = Reader::new(b"abc");
        assert!(r.take_until(0).is_err());
        let mut r = Reader::new(&[0, 0, 1]);
        assert!(r.expect_zero_padding().is_err());
    }

    #[test]
    fn writer_mirrors_reader() {
        let mut buf = [0u8; 32];
        let mut w = Writer::new(&mut buf);
        w.write_u8(1).unwrap();
        w.write_u16(0x0203).unwrap();
        w.write_u32(0x04050607).unwrap();
        w.write_u64(0x0809101112131415).unwrap();
        w.write_nested_u8len(|w| w.write_u16(0xaabb)).unwrap();
        w.write_nested_u16len(|w| w.write_all(b"xyz")).unwrap();
        w.write_u8len(b"q").unwrap();
        let n = w.position();
        assert_eq!(
            hex::encode(&buf[..n]),
            "01020304050607080910111213141502aabb000378797a0171"
        );
        let mut r = Reader::new(&buf[..n]);
        assert_eq!(r.take_u8().unwrap(), 1);
        assert_eq!(r.take_u16().unwrap(), 0x0203);
        assert_eq!(r.take_u32().unwrap(), 0x04050607);
        assert_eq!(r.take_u64().unwrap(), 0x0809101112131415);
        assert_eq!(r.read_nested_u8len(|r| r.take_u16()).unwrap(), 0xaabb);
        assert_eq!(r.take_u16len().unwrap(), b"xyz");
        assert_eq!(r.take_u8len().unwrap(), b"q");
        r.should_be_exhausted().unwrap();
    }

    #[test]
    fn writer_no_room() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        w.write_u16(1).unwrap();
        assert!(matches!(
            w.write_u16(1),
            Err(ProtoError::NoRoom {
                needed: 2,
                remaining: 1,
                ..
            })
        ));
        let long = [0u8; 300];
        let mut big = [0u8; 400];
        let mut w = Writer::new(&mut big);
        assert!(matches!(
            w.write_u8len(&long),
            Err(ProtoError::TooLong { .. })
        ));
    }
}
