//! Client-side prediction and reconciliation, shared by the browser and the native bots.
//!
//! The client applies each of its inputs to its own player at once, with the game's own
//! [`Game::predict`]. When a snapshot arrives it rewinds to the server's state of that player,
//! replays the inputs the server has not applied yet, and counts a correction when the result
//! differs from what it had predicted.

use std::collections::VecDeque;

use crate::game::Game;

/// Unacknowledged inputs kept at most; older ones are forgotten (the server has them or never
/// will).
pub const MAX_PENDING: usize = 256;

/// The prediction state of one player.
#[derive(Debug)]
pub struct Predictor<G: Game> {
    rules: G::Rules,
    pending: VecDeque<(u32, G::Input)>,
    next_seq: u32,
    predicted: Option<G::Own>,
    /// Snapshots after which the replayed state differed from the prediction.
    pub corrections: u32,
    /// Size of the last correction, in the game's units.
    pub last_correction: u32,
}

impl<G: Game> Predictor<G> {
    /// A predictor with no state yet (it needs a first snapshot).
    pub fn new(rules: G::Rules) -> Self {
        Self { rules, pending: VecDeque::new(), next_seq: 1, predicted: None, corrections: 0, last_correction: 0 }
    }

    /// Records a new input, predicts its effect, and returns its sequence number.
    pub fn input(&mut self, input: G::Input) -> u32 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.pending.len() == MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back((seq, input));
        if let Some(own) = &mut self.predicted {
            G::predict(&self.rules, own, &input);
        }
        seq
    }

    /// The newest `n` unacknowledged inputs, oldest first, and the first one's sequence number.
    pub fn to_send(&self, n: usize) -> (u32, Vec<G::Input>) {
        let skip = self.pending.len().saturating_sub(n);
        let first = self.pending.get(skip).map_or(self.next_seq, |(seq, _)| *seq);
        (first, self.pending.iter().skip(skip).map(|(_, input)| *input).collect())
    }

    /// Takes an authoritative snapshot: `ack` is the last input the server applied.
    /// Returns the size of the correction when the prediction was wrong.
    pub fn snapshot(&mut self, ack: u32, view: &G::View) -> Option<u32> {
        while self.pending.front().is_some_and(|(seq, _)| *seq <= ack) {
            self.pending.pop_front();
        }
        let mut own = G::own(view);
        for (_, input) in &self.pending {
            G::predict(&self.rules, &mut own, input);
        }
        let correction = match &self.predicted {
            Some(before) if *before != own => Some(G::divergence(before, &own)),
            _ => None,
        };
        if let Some(size) = correction {
            self.corrections += 1;
            self.last_correction = size;
        }
        self.predicted = Some(own);
        correction
    }

    /// The predicted own state, once a snapshot has arrived.
    pub fn own(&self) -> Option<&G::Own> {
        self.predicted.as_ref()
    }

    /// Inputs sent but not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The sequence number the next input will get.
    pub fn next_seq(&self) -> u32 {
        self.next_seq
    }
}
