//! Consensus diffs: a copy/insert delta from one consensus envelope to another, cut at relay
//! entry boundaries (docs/protocol/80-directory.md, "Consensus diffs").
//!
//! The consensus is postcard, so a text diff does not apply. The cache knows the structure:
//! it finds each relay entry's bytes in both envelopes, copies unchanged entries from the base
//! (runs of them in one op), copies the common prefix and suffix of an entry whose relay
//! changed (identity and keys come first, so a flag or weight change costs a few bytes), and
//! inserts new entries, the new header and the new signatures. The client needs no structure:
//! applying is byte copies and inserts, bounded, then the SHA-256 of the whole result is
//! checked against the digest in the diff.
//!
//! Bytes (all integers big-endian):
//! `"ADF1" | base_digest[32] | target_digest[32] | target_len u32 | op*` with
//! `op = 0x01 offset u32 len u32` (copy `base[offset..offset+len]`) or
//! `0x02 len u32 bytes[len]` (insert); `len > 0`; the ops end with the input.

use std::collections::HashMap;

use super::consensus_digest;
use crate::doc::consensus::MAX_CONSENSUS_LEN;
use crate::doc::{Consensus, Signed};
use crate::err::{DirError, Result};

/// The magic at the start of every diff.
pub const MAGIC: &[u8; 4] = b"ADF1";
/// Length of the fixed part: magic, two digests, target length.
pub const HEADER_LEN: usize = 4 + 32 + 32 + 4;
/// Largest uncompressed diff a client accepts (every op adds at most 9 bytes beyond the
/// bytes it inserts; a cache never sends a diff larger than the full document).
pub const MAX_DIFF_LEN: usize = MAX_CONSENSUS_LEN + MAX_CONSENSUS_LEN / 2;

const OP_COPY: u8 = 0x01;
const OP_INSERT: u8 = 0x02;

fn bad(why: &'static str) -> DirError {
    DirError::Malformed {
        object: "consensus diff",
        why,
    }
}

/// Where the relay entries are in a consensus envelope.
#[derive(Clone, Debug, Default)]
pub(crate) struct Layout {
    /// End of the part before the first entry (envelope and consensus header, relay count).
    head_end: usize,
    /// Start of the part after the last entry (position weights, signatures).
    tail_start: usize,
    /// Each entry: offset in the envelope, length, relay identity.
    entries: Vec<(usize, usize, [u8; 32])>,
}

/// Length of postcard's varint encoding of `n`.
fn varint_len(mut n: usize) -> usize {
    let mut l = 1;
    while n >= 0x80 {
        n >>= 7;
        l += 1;
    }
    l
}

impl Layout {
    /// The entry boundaries of `raw`, or a layout of one opaque region when `raw` is not a
    /// consensus envelope (a diff between such inputs is still correct, only larger).
    pub(crate) fn of(raw: &[u8]) -> Self {
        Self::parse(raw).unwrap_or(Self {
            head_end: raw.len(),
            tail_start: raw.len(),
            entries: Vec::new(),
        })
    }

    fn parse(raw: &[u8]) -> Option<Self> {
        let signed = Signed::<Consensus>::from_bytes(raw).ok()?;
        let c: Consensus = postcard::from_bytes(signed.body()).ok()?;
        let body = signed.body();
        // The envelope is varint(body length) | body | signatures (canonical, checked above).
        let body_start = varint_len(body.len());
        if raw.get(body_start..body_start.checked_add(body.len())?)? != body {
            return None;
        }
        let tail = postcard::to_allocvec(&c.bandwidth_weights).ok()?;
        let mut encoded = Vec::with_capacity(c.relays.len());
        let mut total = 0usize;
        for r in &c.relays {
            let e = postcard::to_allocvec(r).ok()?;
            total = total.checked_add(e.len())?;
            encoded.push((e, *r.identity.as_bytes()));
        }
        let tail_start = body_start
            .checked_add(body.len())?
            .checked_sub(tail.len())?;
        let head_end = tail_start.checked_sub(total)?;
        let mut entries = Vec::with_capacity(encoded.len());
        let mut off = head_end;
        for (e, id) in encoded {
            if raw.get(off..off + e.len())? != e.as_slice() {
                return None;
            }
            entries.push((off, e.len(), id));
            off += e.len();
        }
        Some(Self {
            head_end,
            tail_start,
            entries,
        })
    }
}

/// Builds the op list, merging adjacent copies and adjacent inserts.
struct Emitter {
    out: Vec<u8>,
    copy: Option<(usize, usize)>,
    insert: Vec<u8>,
}

impl Emitter {
    fn flush_copy(&mut self) {
        if let Some((off, len)) = self.copy.take() {
            self.out.push(OP_COPY);
            self.out.extend_from_slice(&u32_of(off).to_be_bytes());
            self.out.extend_from_slice(&u32_of(len).to_be_bytes());
        }
    }
    fn flush_insert(&mut self) {
        if !self.insert.is_empty() {
            self.out.push(OP_INSERT);
            self.out
                .extend_from_slice(&u32_of(self.insert.len()).to_be_bytes());
            self.out.append(&mut self.insert);
        }
    }
    fn copy(&mut self, off: usize, len: usize) {
        if len == 0 {
            return;
        }
        self.flush_insert();
        match &mut self.copy {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => {
                self.flush_copy();
                self.copy = Some((off, len));
            }
        }
    }
    fn insert(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.flush_copy();
        self.insert.extend_from_slice(bytes);
    }
    /// `new` in terms of `base[start..start+len]`: copy the common prefix and suffix, insert
    /// the middle.
    fn similar(&mut self, base: &[u8], start: usize, len: usize, new: &[u8]) {
        let old = base.get(start..start + len).unwrap_or_default();
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let room = old.len().min(new.len()) - prefix;
        let suffix = old
            .iter()
            .rev()
            .zip(new.iter().rev())
            .take(room)
            .take_while(|(a, b)| a == b)
            .count();
        self.copy(start, prefix);
        self.insert(new.get(prefix..new.len() - suffix).unwrap_or_default());
        self.copy(start + old.len() - suffix, suffix);
    }
    fn finish(mut self) -> Vec<u8> {
        self.flush_copy();
        self.flush_insert();
        self.out
    }
}

/// Offsets and lengths fit u32: both documents are at most [`MAX_CONSENSUS_LEN`] (checked by
/// the callers); saturate rather than wrap otherwise (the digest check then fails).
fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The diff that turns `base` into `target` (both consensus envelopes as served). Inputs that
/// are not consensus envelopes still give a correct (larger) diff. Refused only when a
/// document is larger than [`MAX_CONSENSUS_LEN`].
pub fn compute(base: &[u8], target: &[u8]) -> Result<Vec<u8>> {
    compute_with(base, &Layout::of(base), target, &Layout::of(target))
}

pub(crate) fn compute_with(
    base: &[u8],
    bl: &Layout,
    target: &[u8],
    tl: &Layout,
) -> Result<Vec<u8>> {
    for d in [base, target] {
        if d.len() > MAX_CONSENSUS_LEN {
            return Err(DirError::TooLarge {
                object: "consensus",
                len: d.len(),
                max: MAX_CONSENSUS_LEN,
            });
        }
    }
    let mut e = Emitter {
        out: Vec::with_capacity(HEADER_LEN + target.len() / 16),
        copy: None,
        insert: Vec::new(),
    };
    e.out.extend_from_slice(MAGIC);
    e.out.extend_from_slice(&consensus_digest(base));
    e.out.extend_from_slice(&consensus_digest(target));
    e.out.extend_from_slice(&u32_of(target.len()).to_be_bytes());

    let by_bytes: HashMap<&[u8], usize> = bl
        .entries
        .iter()
        .filter_map(|&(o, l, _)| Some((base.get(o..o + l)?, o)))
        .collect();
    let by_id: HashMap<[u8; 32], (usize, usize)> =
        bl.entries.iter().map(|&(o, l, id)| (id, (o, l))).collect();

    let head = target.get(..tl.head_end).unwrap_or_default();
    e.similar(base, 0, bl.head_end, head);
    for &(o, l, id) in &tl.entries {
        let new = target.get(o..o + l).unwrap_or_default();
        if let Some(&bo) = by_bytes.get(new) {
            e.copy(bo, l);
        } else if let Some(&(bo, blen)) = by_id.get(&id) {
            e.similar(base, bo, blen, new);
        } else {
            e.insert(new);
        }
    }
    let tail = target.get(tl.tail_start..).unwrap_or_default();
    e.similar(
        base,
        bl.tail_start,
        base.len().saturating_sub(bl.tail_start),
        tail,
    );
    Ok(e.finish())
}

fn take<'a>(d: &'a [u8], pos: &mut usize, n: usize) -> Result<&'a [u8]> {
    let end = pos.checked_add(n).ok_or(bad("truncated"))?;
    let s = d.get(*pos..end).ok_or(bad("truncated"))?;
    *pos = end;
    Ok(s)
}

fn take_u32(d: &[u8], pos: &mut usize) -> Result<usize> {
    let s = take(d, pos, 4)?;
    let mut b = [0u8; 4];
    b.copy_from_slice(s);
    Ok(u32::from_be_bytes(b) as usize)
}

/// The base and target digests named by a diff (without applying it).
pub fn digests(diff: &[u8]) -> Result<([u8; 32], [u8; 32])> {
    let mut pos = 0;
    if take(diff, &mut pos, 4)? != MAGIC {
        return Err(bad("not a consensus diff (bad magic)"));
    }
    let mut b = [0u8; 32];
    b.copy_from_slice(take(diff, &mut pos, 32)?);
    let mut t = [0u8; 32];
    t.copy_from_slice(take(diff, &mut pos, 32)?);
    Ok((b, t))
}

/// Apply `diff` to `base`: the exact bytes of the target, whose SHA-256 is checked against the
/// diff's target digest. Every offset and length is checked before use; the output never
/// exceeds the declared length, which never exceeds [`MAX_CONSENSUS_LEN`].
pub fn apply(base: &[u8], diff: &[u8]) -> Result<Vec<u8>> {
    if diff.len() > MAX_DIFF_LEN {
        return Err(DirError::TooLarge {
            object: "consensus diff",
            len: diff.len(),
            max: MAX_DIFF_LEN,
        });
    }
    let (base_digest, target_digest) = digests(diff)?;
    if consensus_digest(base) != base_digest {
        return Err(bad("the diff is from another consensus than the one held"));
    }
    let mut pos = HEADER_LEN - 4;
    let target_len = take_u32(diff, &mut pos)?;
    if target_len > MAX_CONSENSUS_LEN {
        return Err(DirError::TooLarge {
            object: "consensus",
            len: target_len,
            max: MAX_CONSENSUS_LEN,
        });
    }
    // Every output byte comes from a copy of the base or an insert of the diff, so the
    // output can be no longer than the copies allow; grow as needed instead of trusting
    // target_len for the allocation.
    let mut out: Vec<u8> = Vec::with_capacity(target_len.min(base.len() + diff.len()));
    while pos < diff.len() {
        let op = take(diff, &mut pos, 1)?;
        let piece = match op {
            [OP_COPY] => {
                let off = take_u32(diff, &mut pos)?;
                let len = take_u32(diff, &mut pos)?;
                let end = off.checked_add(len).ok_or(bad("copy out of range"))?;
                base.get(off..end).ok_or(bad("copy beyond the base"))?
            }
            [OP_INSERT] => {
                let len = take_u32(diff, &mut pos)?;
                take(diff, &mut pos, len)?
            }
            _ => return Err(bad("unknown op")),
        };
        if piece.is_empty() {
            return Err(bad("empty op"));
        }
        if out.len() + piece.len() > target_len {
            return Err(bad("output longer than declared"));
        }
        out.extend_from_slice(piece);
    }
    if out.len() != target_len {
        return Err(bad("output shorter than declared"));
    }
    if consensus_digest(&out) != target_digest {
        return Err(bad(
            "the result's digest does not match (fetch the full consensus)",
        ));
    }
    Ok(out)
}
