//! Exit policies (port ranges) and relay flags.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::err::{DirError, Result};

/// At most this many port ranges in a policy.
pub const MAX_PORT_RANGES: usize = 64;

/// An inclusive port range `lo..=hi` with `1 <= lo <= hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port (inclusive).
    pub hi: u16,
}

impl PortRange {
    /// One port.
    pub fn single(p: u16) -> Self {
        Self { lo: p, hi: p }
    }
    /// Whether `port` is inside.
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

/// An exit policy: the destination ports a relay will connect to for clients. An empty `accept`
/// list means "reject everything" (not an exit). Ranges are sorted, disjoint and non-adjacent,
/// so every policy has one form.
///
/// `allow_private` lets the exit connect to private, loopback and link-local addresses; only a
/// test network sets it (clients and exits ignore it otherwise; see 80-directory.md).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExitPolicy {
    /// Accepted port ranges.
    pub accept: Vec<PortRange>,
    /// Whether private destinations are allowed (test networks only).
    pub allow_private: bool,
}

impl ExitPolicy {
    /// The policy of a non-exit.
    pub fn reject_all() -> Self {
        Self::default()
    }
    /// Accept every port.
    pub fn accept_all() -> Self {
        Self {
            accept: vec![PortRange { lo: 1, hi: 65535 }],
            allow_private: false,
        }
    }
    /// Build a normalised policy from arbitrary ranges (sorted, merged; invalid ranges dropped).
    pub fn from_ranges(ranges: impl IntoIterator<Item = PortRange>, allow_private: bool) -> Self {
        let mut v: Vec<PortRange> = ranges
            .into_iter()
            .filter(|r| r.lo >= 1 && r.lo <= r.hi)
            .collect();
        v.sort();
        let mut out: Vec<PortRange> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if u32::from(r.lo) <= u32::from(last.hi) + 1 => {
                    last.hi = last.hi.max(r.hi);
                }
                _ => out.push(r),
            }
        }
        Self {
            accept: out,
            allow_private,
        }
    }
    /// Whether the relay exits to `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.accept.iter().any(|r| r.contains(port))
    }
    /// Whether it accepts no port at all.
    pub fn is_reject_all(&self) -> bool {
        self.accept.is_empty()
    }
    /// Check the normal form.
    pub(crate) fn check(&self, object: &'static str) -> Result<()> {
        if self.accept.len() > MAX_PORT_RANGES {
            return Err(DirError::invalid(object, "too many exit port ranges"));
        }
        let normal = Self::from_ranges(self.accept.iter().copied(), self.allow_private);
        if normal != *self {
            return Err(DirError::invalid(
                object,
                "exit policy ranges must be sorted, merged, with 1 <= lo <= hi",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for ExitPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.accept.is_empty() {
            return f.write_str("reject *");
        }
        f.write_str("accept ")?;
        for (i, r) in self.accept.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.lo == r.hi {
                write!(f, "{}", r.lo)?;
            } else {
                write!(f, "{}-{}", r.lo, r.hi)?;
            }
        }
        if self.allow_private {
            f.write_str(" (private allowed)")?;
        }
        Ok(())
    }
}

/// Relay flags as a bit set (`u16`). Unknown bits are kept, so newer authorities can add flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flags(pub u16);

impl Flags {
    /// Reachable by the authority's link handshake.
    pub const RUNNING: Self = Self(1 << 0);
    /// A well-formed, acceptable descriptor.
    pub const VALID: Self = Self(1 << 1);
    /// Enough bandwidth for general use.
    pub const FAST: Self = Self(1 << 2);
    /// Long enough uptime for long-lived streams.
    pub const STABLE: Self = Self(1 << 3);
    /// Suitable as an entry guard.
    pub const GUARD: Self = Self(1 << 4);
    /// Exits to common ports.
    pub const EXIT: Self = Self(1 << 5);
    /// Known to misbehave as an exit: never use it as one.
    pub const BAD_EXIT: Self = Self(1 << 6);
    /// Suitable as an onion-service directory (Fast, Stable and up long enough).
    pub const HSDIR: Self = Self(1 << 7);

    /// Every flag with its name, in bit order.
    pub const ALL: [(Self, &'static str); 8] = [
        (Self::RUNNING, "Running"),
        (Self::VALID, "Valid"),
        (Self::FAST, "Fast"),
        (Self::STABLE, "Stable"),
        (Self::GUARD, "Guard"),
        (Self::EXIT, "Exit"),
        (Self::BAD_EXIT, "BadExit"),
        (Self::HSDIR, "HSDir"),
    ];

    /// No flags.
    pub const fn empty() -> Self {
        Self(0)
    }
    /// Whether all flags in `other` are set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    /// Set or clear `other`.
    pub fn set(&mut self, other: Self, on: bool) {
        if on {
            self.0 |= other.0;
        } else {
            self.0 &= !other.0;
        }
    }
    /// Union.
    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
    /// Names of the set flags.
    pub fn names(self) -> Vec<&'static str> {
        Self::ALL
            .iter()
            .filter(|(fl, _)| self.contains(*fl))
            .map(|(_, n)| *n)
            .collect()
    }
}

impl std::ops::BitOr for Flags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Flags({})", self.names().join(" "))
    }
}
impl fmt::Display for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(" "))
    }
}
