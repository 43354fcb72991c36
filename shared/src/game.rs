//! The contract between a game and Rallypoint: the server runs a [`Game`] at a fixed tick, one
//! instance per room, and clients predict their own player with the same code.
//!
//! A game is a deterministic state machine. Given the same mode, player count, tick rate, seed
//! and inputs, [`Game::step`] produces the same state on every platform, which
//! [`Game::state_hash`] makes checkable. It reads no clock (time is the tick number), draws
//! randomness only from a generator seeded in its state, and iterates only ordered collections.

use bitcode::{Decode, DecodeOwned, Encode};
use serde::{Deserialize, Serialize};

/// A player's place in a match, `0..players`, in the order the match lists its players.
pub type Seat = u8;

/// A way to play a game, offered in the lobby.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Stable identifier, used in the protocol, the database and URLs (`duel`, `ffa`).
    pub name: &'static str,
    /// What players read in the lobby.
    pub title: &'static str,
    /// Fewest players a match of this mode starts with.
    pub min_players: u8,
    /// Most players in one match.
    pub max_players: u8,
}

/// Settings a room starts a match with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct MatchSetup {
    /// Number of seats.
    pub players: u8,
    /// Simulation steps per second.
    pub tick_hz: u16,
    /// Seed of the match's random number generator.
    pub seed: u64,
    /// When set, overrides the mode's time limit (in seconds).
    pub time_limit_secs: Option<u16>,
}

/// Why a match ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum EndReason {
    /// Someone reached the score limit.
    ScoreLimit,
    /// The time limit passed.
    TimeLimit,
    /// Fewer than two players were left.
    Forfeit,
}

impl EndReason {
    /// A short word for pages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScoreLimit => "score",
            Self::TimeLimit => "time",
            Self::Forfeit => "forfeit",
        }
    }
}

/// How a match ended, seat by seat.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct Outcome {
    /// Place of each seat: 1 is first; equal scores share a place.
    pub ranks: Vec<u8>,
    /// Score of each seat.
    pub scores: Vec<i32>,
    /// Why it ended.
    pub reason: EndReason,
    /// Ticks played.
    pub ticks: u32,
}

/// A deterministic game that Rallypoint can host.
///
/// The server owns one instance per room and calls [`Game::step`] once per tick with the
/// inputs that arrived; each player receives [`Game::view`], which holds only what that player
/// may see. A client predicts its own player with [`Game::predict`], the same movement code the
/// server runs, and corrects itself from the views.
pub trait Game: Sized + Send + 'static {
    /// One player's input for one step of their own movement.
    type Input: Copy + Default + PartialEq + std::fmt::Debug + Encode + DecodeOwned + Send + 'static;
    /// What one player may see at one tick.
    type View: Clone + std::fmt::Debug + Encode + DecodeOwned + Send + 'static;
    /// What changed in one seat's view between two ticks: sent instead of the whole view when
    /// the client holds the older one and the change is smaller (see [`crate::delta`]).
    type Delta: std::fmt::Debug + Encode + DecodeOwned + Send + 'static;
    /// The part of a player's state that their client predicts.
    type Own: Clone + PartialEq + std::fmt::Debug;
    /// Fixed facts a client needs in order to predict (sent once, when it joins).
    type Rules: Clone + std::fmt::Debug + Encode + DecodeOwned + Send + 'static;

    /// The modes this game offers.
    fn modes() -> &'static [Mode];

    /// A new match. `mode` is one of [`Game::modes`].
    fn new(mode: &Mode, setup: &MatchSetup) -> Self;

    /// Advances one tick. `inputs[seat]` holds that seat's inputs for this tick, in order: none
    /// when nothing arrived, two when a late input is applied with the current one.
    fn step(&mut self, inputs: &[&[Self::Input]]);

    /// Marks a seat as present (its player is connected) or gone.
    fn set_present(&mut self, seat: Seat, present: bool);

    /// What `seat` may see now.
    fn view(&self, seat: Seat) -> Self::View;

    /// The change from `base` to `now`, a view of the same seat `ticks` ticks later.
    fn diff(base: &Self::View, now: &Self::View, ticks: u32) -> Self::Delta;

    /// `base` changed by `delta`, which [`Game::diff`] made with the same `ticks`; `None` when
    /// the delta does not fit this base (a client must never trust a delta blindly).
    fn patch(base: &Self::View, delta: &Self::Delta, ticks: u32) -> Option<Self::View>;

    /// The result, once the match is over.
    fn outcome(&self) -> Option<Outcome>;

    /// Ticks played so far.
    fn tick(&self) -> u32;

    /// A hash of the whole state: equal on every platform for equal histories.
    fn state_hash(&self) -> u64;

    /// The rules a client predicts with.
    fn rules(&self) -> Self::Rules;

    /// The predicted part of the viewer's own state, from a view.
    fn own(view: &Self::View) -> Self::Own;

    /// Applies one of the viewer's own inputs to their predicted state: the very code that
    /// [`Game::step`] runs for that input's movement.
    fn predict(rules: &Self::Rules, own: &mut Self::Own, input: &Self::Input);

    /// How far apart two predicted states are, in the game's own units (0 = equal).
    fn divergence(a: &Self::Own, b: &Self::Own) -> u32;
}

/// FNV-1a, 64 bits: a small, fixed hash for state digests (std's hashers may differ between
/// builds and platforms).
#[derive(Debug, Clone, Copy)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Mixes bytes in.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The digest so far.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// A small, fast, seeded random number generator (SplitMix64), kept inside game states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Rng(u64);

impl Rng {
    /// A generator with this seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// Ranks from scores: 1 for the highest, equal scores share a rank.
pub fn ranks_from_scores(scores: &[i32]) -> Vec<u8> {
    scores.iter().map(|s| 1 + scores.iter().filter(|other| *other > s).count() as u8).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors() {
        let hash = |s: &str| {
            let mut h = Fnv64::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(hash("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(hash("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn rng_is_seeded_and_bounded() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<u32> = (0..100).map(|_| a.below(10)).collect();
        let ys: Vec<u32> = (0..100).map(|_| b.below(10)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x < 10));
        assert!((0..10).all(|v| xs.contains(&v)), "every value shows up in 100 draws");
    }

    #[test]
    fn ranks_share_places_on_ties() {
        assert_eq!(ranks_from_scores(&[3, 5, 3, 1]), vec![2, 1, 2, 4]);
        assert_eq!(ranks_from_scores(&[0, 0]), vec![1, 1]);
    }
}
