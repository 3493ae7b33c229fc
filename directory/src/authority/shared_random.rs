//! Shared randomness among the authorities: commit and reveal (Tor's srv-spec, proposal 250, with
//! Allium's hashes and run lengths). Sans-IO: time comes in as `valid_after`, votes as values.
//!
//! A *protocol run* is split into a commit phase and a reveal phase of equal length, counted in
//! voting rounds. Its length follows the network's onion-service time period (the consensus
//! parameter `hsdir_interval`, [`TimePeriodParams`]): runs start at the multiples of the period
//! length since the epoch, half a period before each period starts (Tor's 00:00 SRV switch
//! against its 12:00 period switch), so every period gets a new value. A test network may
//! shorten the phases to a few rounds (`shared_random_phase_rounds`).
//!
//! ```text
//! reveal                = 32 random bytes, drawn at the run's first vote
//! commit.hashed_reveal  = SHA-256("allium-sr-commit" | 0x00 | ID | u64be(timestamp) | reveal)
//! SRV                   = SHA-256("allium-shared-random" | 0x00 | u8(n) | u32be(1)
//!                                 | SHA-256("allium-sr-reveals" | 0x00 | ID_1 | reveal_1 | ...)
//!                                 | previous SRV value, or 32 zero bytes)
//! ```
//! with the `n` valid reveals sorted by authority identity. Rules:
//! - In the commit phase a vote carries its author's commit; the first commit of each author whose
//!   timestamp lies inside the run is kept (an author's own identity is inside the hash, so a
//!   commit copied from another authority can never be opened).
//! - In the reveal phase a vote carries the commit again and the reveal; a reveal is kept only if
//!   it opens the author's kept commit.
//! - At the first vote of the next run each authority computes the new value from the reveals it
//!   kept and its current value; that becomes current, the old current becomes previous. No
//!   reveal: no value.
//! - Every vote carries the values the authority believes in; the consensus carries a value only
//!   when more than half of all configured authorities voted it (`compute_consensus`), and every
//!   authority then adopts the consensus' values ([`SrState::adopt`]), so one that missed a reveal
//!   is back in step for the next run. No majority: no value, and clients use the disaster value.
//!
//! The state is kept in the data directory (`shared-random`), so a restarted authority keeps its
//! reveal; one that lost it sits the run out (it commits again at the next run).

use std::collections::BTreeMap;

use allium_crypto::RelayId;
use allium_crypto::hs::TimePeriodParams;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::doc::{Consensus, SharedRand, SrCommit, SrVote, SrvValue, Vote};

/// Domain string of a commitment.
pub const DOMAIN_COMMIT: &[u8] = b"allium-sr-commit";
/// Domain string of the hash over the sorted reveals.
pub const DOMAIN_REVEALS: &[u8] = b"allium-sr-reveals";
/// Domain string of a shared random value.
pub const DOMAIN_SRV: &[u8] = b"allium-shared-random";
/// Version number hashed into every value.
pub const SRV_VERSION: u32 = 1;

/// The commitment to `reveal` by `authority` made at `timestamp`.
pub fn commit_hash(authority: &RelayId, timestamp: u64, reveal: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN_COMMIT);
    h.update([0u8]);
    h.update(authority.0);
    h.update(timestamp.to_be_bytes());
    h.update(reveal);
    h.finalize().into()
}

/// The shared random value of the reveals `reveals` (by authority) after `previous`; `None` when
/// there is no reveal. At most [`crate::doc::consensus::MAX_SRV_REVEALS`] reveals are counted (the
/// first by identity; more authorities cannot be configured).
pub fn compute_srv(
    reveals: &BTreeMap<RelayId, [u8; 32]>,
    previous: Option<&SrvValue>,
) -> Option<SrvValue> {
    let max = usize::from(crate::doc::consensus::MAX_SRV_REVEALS);
    if reveals.is_empty() {
        return None;
    }
    let mut all = Sha256::new();
    all.update(DOMAIN_REVEALS);
    all.update([0u8]);
    let mut n: u8 = 0;
    for (id, r) in reveals.iter().take(max) {
        all.update(id.0);
        all.update(r);
        n = n.saturating_add(1);
    }
    let all: [u8; 32] = all.finalize().into();
    let mut h = Sha256::new();
    h.update(DOMAIN_SRV);
    h.update([0u8]);
    h.update([n]);
    h.update(SRV_VERSION.to_be_bytes());
    h.update(all);
    h.update(previous.map_or([0u8; 32], |p| p.value));
    Some(SrvValue {
        num_reveals: n,
        value: h.finalize().into(),
    })
}

/// The two phases of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Authorities publish commitments.
    Commit,
    /// Authorities open them.
    Reveal,
}

/// The length and alignment of protocol runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SrSchedule {
    /// Length of one phase, in seconds (a run is two).
    pub phase_secs: u64,
}

impl SrSchedule {
    /// Runs as long as the time period of `params` (phases of half a period), or, when
    /// `phase_rounds` is non-zero, phases of `phase_rounds` voting rounds of
    /// `voting_interval_secs` (test networks).
    pub fn new(params: &TimePeriodParams, voting_interval_secs: u64, phase_rounds: u32) -> Self {
        let phase_secs = if phase_rounds > 0 {
            u64::from(phase_rounds).saturating_mul(voting_interval_secs.max(1))
        } else {
            params.length_minutes.saturating_mul(30)
        };
        Self {
            phase_secs: phase_secs.max(1),
        }
    }

    /// The run's length in seconds.
    pub fn run_secs(&self) -> u64 {
        self.phase_secs.saturating_mul(2)
    }

    /// Start of the run containing `t` (a multiple of the run length).
    pub fn run_start(&self, t: u64) -> u64 {
        t / self.run_secs() * self.run_secs()
    }

    /// The phase at `t`.
    pub fn phase(&self, t: u64) -> Phase {
        if t - self.run_start(t) < self.phase_secs {
            Phase::Commit
        } else {
            Phase::Reveal
        }
    }
}

/// One authority's protocol state (kept in the data directory).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SrState {
    /// Start of the run this state is about (0: none yet).
    pub run_start: u64,
    /// Our reveal for this run and the timestamp of its commitment (secret until the reveal
    /// phase).
    pub mine: Option<(u64, [u8; 32])>,
    /// Commits kept this run, by authority.
    pub commits: BTreeMap<RelayId, SrCommit>,
    /// Reveals kept this run (each opens the author's commit).
    pub reveals: BTreeMap<RelayId, [u8; 32]>,
    /// The current value.
    pub current: Option<SrvValue>,
    /// The previous value.
    pub previous: Option<SrvValue>,
}

impl SrState {
    /// Move to the run containing `va` (a vote is being made for it): at a run boundary compute
    /// the new value from the reveals kept and start over; in a commit phase without a reveal of
    /// our own, draw one with `fill_random` and commit to it. Returns false if `va` is before the
    /// state's run (a clock that went back: nothing is voted).
    pub fn advance(
        &mut self,
        sched: &SrSchedule,
        va: u64,
        me: &RelayId,
        fill_random: impl FnOnce(&mut [u8]),
    ) -> bool {
        let rs = sched.run_start(va);
        if rs < self.run_start {
            return false;
        }
        if rs > self.run_start {
            let consecutive = self.run_start != 0 && self.run_start + sched.run_secs() == rs;
            if consecutive {
                let new = compute_srv(&self.reveals, self.current.as_ref());
                self.previous = self.current.take();
                self.current = new;
            } else {
                // Runs were missed (or this is the first): nothing to chain from.
                self.previous = None;
                self.current = None;
            }
            self.run_start = rs;
            self.mine = None;
            self.commits.clear();
            self.reveals.clear();
        }
        if self.mine.is_none() && sched.phase(va) == Phase::Commit {
            let mut r = [0u8; 32];
            fill_random(&mut r);
            self.mine = Some((va, r));
            self.commits.insert(
                *me,
                SrCommit {
                    timestamp: va,
                    hashed_reveal: commit_hash(me, va, &r),
                },
            );
        }
        true
    }

    /// The shared-random part of our vote for `va` (after [`Self::advance`]); `None` when there
    /// is nothing to say.
    pub fn vote_part(&self, sched: &SrSchedule, va: u64, me: &RelayId) -> Option<SrVote> {
        if sched.run_start(va) != self.run_start {
            return None;
        }
        let commit = self
            .commits
            .get(me)
            .copied()
            .filter(|_| self.mine.is_some());
        let reveal = match (sched.phase(va), self.mine) {
            (Phase::Reveal, Some((_, r))) if commit.is_some() => Some(r),
            _ => None,
        };
        let v = SrVote {
            commit,
            reveal,
            current: self.current,
            previous: self.previous,
        };
        (v.commit.is_some() || v.current.is_some() || v.previous.is_some()).then_some(v)
    }

    /// Take in the commits and reveals of `votes` (checked votes of configured authorities).
    /// Returns the authorities whose reveal did not open their commit.
    pub fn absorb(&mut self, sched: &SrSchedule, votes: &[&Vote]) -> Vec<RelayId> {
        let mut refused = Vec::new();
        let run_end = self.run_start.saturating_add(sched.run_secs());
        for v in votes {
            let Some(sr) = &v.shared_rand else { continue };
            if sched.run_start(v.valid_after) != self.run_start || self.run_start == 0 {
                continue;
            }
            let author = v.authority;
            match sched.phase(v.valid_after) {
                Phase::Commit => {
                    if let Some(c) = sr.commit
                        && (self.run_start..run_end).contains(&c.timestamp)
                        && c.timestamp <= v.valid_after
                    {
                        self.commits.entry(author).or_insert(c);
                    }
                }
                Phase::Reveal => {
                    let (Some(reveal), Some(commit)) = (sr.reveal, self.commits.get(&author))
                    else {
                        continue;
                    };
                    if commit_hash(&author, commit.timestamp, &reveal) == commit.hashed_reveal {
                        self.reveals.insert(author, reveal);
                    } else if !self.reveals.contains_key(&author) {
                        refused.push(author);
                    }
                }
            }
        }
        refused
    }

    /// Adopt the values of a consensus computed for a period of this run (so an authority that
    /// computed another value chains from the agreed one next run).
    pub fn adopt(&mut self, sched: &SrSchedule, c: &Consensus) {
        if sched.run_start(c.valid_after) != self.run_start {
            return;
        }
        // Only values the consensus carries: a round with too few votes for a majority must
        // not wipe what the authorities agree on.
        if let Some(v) = c.shared_rand.and_then(|s| s.current) {
            self.current = Some(v);
        }
        if let Some(v) = c.shared_rand.and_then(|s| s.previous) {
            self.previous = Some(v);
        }
    }
}

/// The values for the consensus: each one voted identically by more than half of
/// `n_authorities` (votes are one per authority).
pub fn agreed_values(votes: &[&Vote], n_authorities: usize) -> Option<SharedRand> {
    let pick = |f: &dyn Fn(&SrVote) -> Option<SrvValue>| {
        let mut counts: BTreeMap<SrvValue, usize> = BTreeMap::new();
        for v in votes {
            if let Some(x) = v.shared_rand.as_ref().and_then(f) {
                *counts.entry(x).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .find(|(_, n)| n.saturating_mul(2) > n_authorities)
            .map(|(x, _)| x)
    };
    let current = pick(&|s| s.current);
    let previous = pick(&|s| s.previous);
    (current.is_some() || previous.is_some()).then_some(SharedRand { current, previous })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::compute::compute_consensus;
    use crate::doc::consensus::VOTE_VERSION;

    const I: u64 = 10;
    /// A run boundary (a multiple of the 60-second test run).
    const BASE: u64 = 1_800_000_000;
    const SCHED: SrSchedule = SrSchedule { phase_secs: 3 * I };

    fn id(i: u8) -> RelayId {
        RelayId([i; 32])
    }

    /// Deterministic "random" bytes: a hash of the authority, the period and a salt.
    fn fake_random(who: &RelayId, va: u64, salt: u8) -> impl FnOnce(&mut [u8]) {
        let h: [u8; 32] = Sha256::new()
            .chain_update(who.0)
            .chain_update(va.to_be_bytes())
            .chain_update([salt])
            .finalize()
            .into();
        move |b: &mut [u8]| {
            for (d, s) in b.iter_mut().zip(h.iter().cycle()) {
                *d = *s;
            }
        }
    }

    fn vote(authority: RelayId, va: u64, shared_rand: Option<SrVote>) -> Vote {
        Vote {
            version: VOTE_VERSION,
            authority,
            valid_after: va,
            fresh_until: va + I,
            valid_until: va + 3 * I,
            published: va,
            params: BTreeMap::new(),
            relays: Vec::new(),
            shared_rand,
        }
    }

    /// Authorities in memory. Each round: every authority advances and votes, the consensus is
    /// computed from all votes, and every authority takes in the votes and adopts the consensus.
    struct Sim {
        auths: Vec<(RelayId, SrState)>,
        refused: Vec<RelayId>,
    }

    impl Sim {
        fn new(n: u8) -> Self {
            Self {
                auths: (1..=n).map(|i| (id(i), SrState::default())).collect(),
                refused: Vec::new(),
            }
        }

        /// One round for `va`; `tamper` may change each authority's vote part.
        fn round(&mut self, va: u64, tamper: &dyn Fn(&RelayId, &mut Option<SrVote>)) -> Consensus {
            let mut votes = Vec::new();
            for (who, st) in &mut self.auths {
                let mut part = if st.advance(&SCHED, va, who, fake_random(who, va, 0)) {
                    st.vote_part(&SCHED, va, who)
                } else {
                    None
                };
                tamper(who, &mut part);
                votes.push(vote(*who, va, part));
            }
            let refs: Vec<&Vote> = votes.iter().collect();
            let c = compute_consensus(&refs, self.auths.len(), va);
            for (_, st) in &mut self.auths {
                for bad in st.absorb(&SCHED, &refs) {
                    if !self.refused.contains(&bad) {
                        self.refused.push(bad);
                    }
                }
                st.adopt(&SCHED, &c);
            }
            c
        }

        /// `runs` whole runs from `BASE`; returns the consensus of each run's first round.
        fn runs(
            &mut self,
            runs: u64,
            tamper: &dyn Fn(&RelayId, &mut Option<SrVote>),
        ) -> Vec<Consensus> {
            let mut firsts = Vec::new();
            for r in 0..runs {
                for k in 0..6 {
                    let c = self.round(BASE + r * 60 + k * I, tamper);
                    if k == 0 {
                        firsts.push(c);
                    }
                }
            }
            firsts
        }
    }

    fn current(c: &Consensus) -> Option<SrvValue> {
        c.shared_rand.and_then(|s| s.current)
    }

    fn previous(c: &Consensus) -> Option<SrvValue> {
        c.shared_rand.and_then(|s| s.previous)
    }

    fn no_tamper(_: &RelayId, _: &mut Option<SrVote>) {}

    #[test]
    fn schedule_phases_follow_the_period() {
        let s = SrSchedule::new(&TimePeriodParams::DEFAULT, 3600, 0);
        assert_eq!(s.run_secs(), 86_400);
        assert_eq!(
            s.phase(1_800_000_000 - 1_800_000_000 % 86_400),
            Phase::Commit
        );
        assert_eq!(
            s.phase(1_800_000_000 - 1_800_000_000 % 86_400 + 43_200),
            Phase::Reveal
        );
        // The test network's 20-minute period: a run of 20 minutes, a new value each period.
        let t = SrSchedule::new(&TimePeriodParams::TESTNET, 2, 0);
        assert_eq!(t.run_secs(), 1200);
        // Runs switch half a period before the periods do.
        let tp = TimePeriodParams::TESTNET;
        let p = tp.period_at(BASE);
        assert_eq!(tp.start_unix(p.number) % 1200, 600);
        // A test knob: 2 rounds per phase.
        assert_eq!(
            SrSchedule::new(&TimePeriodParams::TESTNET, 2, 2).run_secs(),
            8
        );
    }

    #[test]
    fn three_authorities_agree_and_the_value_changes_every_run() {
        let mut sim = Sim::new(3);
        let firsts = sim.runs(4, &no_tamper);
        // The first run starts from nothing: no value yet.
        assert_eq!(firsts[0].shared_rand, None);
        let values: Vec<SrvValue> = firsts[1..]
            .iter()
            .map(|c| current(c).expect("a value after each full run"))
            .collect();
        for v in &values {
            assert_eq!(v.num_reveals, 3);
        }
        assert_ne!(values[0], values[1]);
        assert_ne!(values[1], values[2]);
        // Chained: the previous value of a run is the current one of the run before.
        assert_eq!(previous(&firsts[2]), Some(values[0]));
        assert_eq!(previous(&firsts[3]), Some(values[1]));
        // Every authority holds the same values.
        for (_, st) in &sim.auths {
            assert_eq!(st.current, Some(values[2]));
        }
        // The value is the documented function of the reveals and the previous value.
        assert!(sim.refused.is_empty());
    }

    #[test]
    fn the_value_is_the_hash_of_the_sorted_reveals_and_the_previous_value() {
        let mut sim = Sim::new(3);
        sim.runs(1, &no_tamper);
        let reveals = sim.auths[0].1.reveals.clone();
        assert_eq!(reveals.len(), 3);
        for (who, st) in &sim.auths {
            let (ts, r) = st.mine.expect("own reveal");
            assert_eq!(reveals.get(who), Some(&r));
            assert_eq!(
                st.commits.get(who).map(|c| c.hashed_reveal),
                Some(commit_hash(who, ts, &r))
            );
        }
        let c = sim.round(BASE + 60, &no_tamper);
        assert_eq!(current(&c), compute_srv(&reveals, None));
        let one: BTreeMap<RelayId, [u8; 32]> =
            reveals.iter().take(1).map(|(k, v)| (*k, *v)).collect();
        assert_ne!(compute_srv(&one, None), compute_srv(&reveals, None));
        assert_eq!(compute_srv(&one, None).map(|v| v.num_reveals), Some(1));
        assert_eq!(compute_srv(&BTreeMap::new(), None), None);
    }

    #[test]
    fn a_reveal_that_does_not_open_its_commit_is_left_out() {
        let mut sim = Sim::new(3);
        let liar = id(3);
        let tamper = move |who: &RelayId, part: &mut Option<SrVote>| {
            if *who == liar
                && let Some(p) = part
                && let Some(r) = p.reveal.as_mut()
            {
                r[0] ^= 1;
            }
        };
        let firsts = sim.runs(3, &tamper);
        assert_eq!(sim.refused, vec![liar]);
        let v = current(&firsts[1]).expect("the two honest reveals make a value");
        assert_eq!(v.num_reveals, 2);
        let honest = &sim.auths[0].1;
        assert!(!honest.reveals.contains_key(&liar));
        assert_eq!(current(&firsts[2]).map(|v| v.num_reveals), Some(2));
    }

    #[test]
    fn a_commit_copied_from_another_authority_cannot_be_opened() {
        let mut sim = Sim::new(3);
        let (a, b) = (id(1), id(2));
        // Authority 2 votes authority 1's commit and, in the reveal phase, its reveal.
        let state_of_a = std::cell::RefCell::new(None::<SrVote>);
        let tamper = |who: &RelayId, part: &mut Option<SrVote>| {
            if *who == a {
                *state_of_a.borrow_mut() = *part;
            } else if *who == b
                && let (Some(p), Some(theirs)) = (part.as_mut(), *state_of_a.borrow())
            {
                p.commit = theirs.commit;
                p.reveal = theirs.reveal;
            }
        };
        let firsts = sim.runs(2, &tamper);
        assert_eq!(sim.refused, vec![b]);
        assert_eq!(current(&firsts[1]).map(|v| v.num_reveals), Some(2));
    }

    #[test]
    fn a_minority_cannot_force_a_value() {
        // Authority 3 votes a value of its choosing all along: the consensus carries the
        // honest majority's.
        let mut sim = Sim::new(3);
        let forged = SrvValue {
            num_reveals: 3,
            value: [0xAB; 32],
        };
        let bad = id(3);
        let tamper = move |who: &RelayId, part: &mut Option<SrVote>| {
            if *who == bad
                && let Some(p) = part
            {
                p.current = Some(forged);
                p.previous = Some(forged);
            }
        };
        let firsts = sim.runs(3, &tamper);
        for c in &firsts[1..] {
            let v = current(c).expect("honest value");
            assert_ne!(v, forged);
            assert_ne!(previous(c), Some(forged));
        }
        // Alone, an authority's value never reaches the consensus: only authority 3 takes
        // part (the others' votes carry nothing).
        let mut sim = Sim::new(3);
        let only = id(3);
        let silence = move |who: &RelayId, part: &mut Option<SrVote>| {
            if *who != only {
                *part = None;
            }
        };
        let firsts = sim.runs(3, &silence);
        assert!(sim.auths[2].1.current.is_some(), "it computed a value");
        for c in &firsts {
            assert_eq!(c.shared_rand, None);
        }
    }

    #[test]
    fn an_authority_joining_in_the_reveal_phase_sits_the_run_out() {
        let mut sim = Sim::new(3);
        // Authority 3 first votes in the reveal phase of the first run.
        let late = id(3);
        for k in 0..6 {
            let va = BASE + k * I;
            let tamper = |who: &RelayId, part: &mut Option<SrVote>| {
                if *who == late && k < 3 {
                    *part = None;
                }
            };
            sim.round(va, &tamper);
            if k < 3 {
                // It was not running: no vote out, no state.
                sim.auths[2].1 = SrState::default();
            }
        }
        assert!(
            sim.auths[2].1.mine.is_none(),
            "no commitment in a reveal phase"
        );
        assert!(
            sim.auths[2].1.reveals.is_empty(),
            "no commitments to open reveals with"
        );
        let c = sim.round(BASE + 60, &no_tamper);
        assert_eq!(current(&c).map(|v| v.num_reveals), Some(2));
    }

    #[test]
    fn the_state_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::authority::store::Store::open(dir.path()).expect("store");
        let mut sim = Sim::new(3);
        for k in 0..3 {
            sim.round(BASE + k * I, &no_tamper);
        }
        // Authority 1 restarts before the reveal phase: its state comes back from disk.
        store.save_shared_random(&sim.auths[0].1).expect("save");
        sim.auths[0].1 = store.load_shared_random();
        for k in 3..6 {
            sim.round(BASE + k * I, &no_tamper);
        }
        let c = sim.round(BASE + 60, &no_tamper);
        assert_eq!(current(&c).map(|v| v.num_reveals), Some(3));
        // A lost state sits the run out (its reveal is gone).
        let mut sim = Sim::new(3);
        for k in 0..3 {
            sim.round(BASE + k * I, &no_tamper);
        }
        sim.auths[0].1 = SrState::default();
        for k in 3..6 {
            sim.round(BASE + k * I, &no_tamper);
        }
        let c = sim.round(BASE + 60, &no_tamper);
        assert_eq!(current(&c).map(|v| v.num_reveals), Some(2));
    }
}
