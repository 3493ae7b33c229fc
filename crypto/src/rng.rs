//! The one source of randomness: the OS-seeded thread CSPRNG (`rand::rng()`).
//!
//! Never a seeded or small RNG outside tests (pitfall 9 of the design).

use rand::Rng as _;

/// Fill `buf` with cryptographically secure random bytes.
pub fn fill_random(buf: &mut [u8]) {
    rand::rng().fill_bytes(buf);
}

/// A uniformly random `u32`.
pub fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    fill_random(&mut b);
    u32::from_le_bytes(b)
}

/// A uniformly random `u64`.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    fill_random(&mut b);
    u64::from_le_bytes(b)
}
