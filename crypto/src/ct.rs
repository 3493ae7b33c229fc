//! Constant-time helpers. Tags, MACs, markers, SENDME tags and identities are compared only here.

use subtle::ConstantTimeEq as _;

/// Constant-time equality of two byte strings (the lengths are not secret).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Constant-time test that every byte is zero.
pub fn ct_is_zero(a: &[u8]) -> bool {
    let acc = a.iter().fold(0u8, |acc, b| acc | b);
    bool::from(acc.ct_eq(&0u8))
}
