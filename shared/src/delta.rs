//! Delta snapshots. A client tells its room the newest tick whose view it holds (`seen` in
//! [`crate::room::ToRoom::Inputs`]); the room then sends that seat's next views as the change
//! from the view it sent at that tick ([`crate::room::FromRoom::Delta`]) whenever that is
//! smaller than the view itself. Both sides keep their last [`KEPT_VIEWS`] views by tick in a
//! [`Views`]: on an unreliable channel a delta whose base the client no longer holds is
//! dropped like a lost datagram, and the next full view or delta against a newer base repairs it.

use crate::game::Game;

/// Views kept on each side: a delta's base is at most this many ticks older than the delta.
pub const KEPT_VIEWS: usize = 32;

/// One seat's last views, by tick: on a room the views it sent, on a client those it received.
#[derive(Debug)]
pub struct Views<V> {
    slots: Vec<Option<(u32, V)>>,
    newest: u32,
}

impl<V> Default for Views<V> {
    fn default() -> Self {
        Self { slots: std::iter::repeat_with(|| None).take(KEPT_VIEWS).collect(), newest: 0 }
    }
}

impl<V: Clone> Views<V> {
    /// Keeps the view of `tick`, in place of the one [`KEPT_VIEWS`] ticks older.
    pub fn insert(&mut self, tick: u32, view: V) {
        self.slots[tick as usize % KEPT_VIEWS] = Some((tick, view));
        self.newest = self.newest.max(tick);
    }

    /// The view of `tick`, if it is still kept.
    pub fn get(&self, tick: u32) -> Option<&V> {
        match &self.slots[tick as usize % KEPT_VIEWS] {
            Some((t, view)) if *t == tick => Some(view),
            _ => None,
        }
    }

    /// The newest tick held (0 for none): what a client acknowledges.
    pub fn newest(&self) -> u32 {
        if self.get(self.newest).is_some() { self.newest } else { 0 }
    }

    /// For a room sending the view of `tick` to a client that holds `seen`: how many ticks back
    /// the base is, and the base, when the room still has it.
    pub fn base(&self, seen: u32, tick: u32) -> Option<(u8, &V)> {
        let back = tick.checked_sub(seen).filter(|&b| b > 0 && (b as usize) < KEPT_VIEWS)?;
        Some((back as u8, self.get(seen)?))
    }

    /// For a client: the view that a delta of `tick`, `back` ticks after its base, stands for
    /// (then kept as a base in turn). `None` when the base is gone or the delta does not fit.
    pub fn patch<G: Game<View = V>>(&mut self, tick: u32, back: u8, delta: &G::Delta) -> Option<V> {
        let base = self.get(tick.checked_sub(u32::from(back))?)?;
        let view = G::patch(base, delta, u32::from(back))?;
        self.insert(tick, view.clone());
        Some(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::{Arena, ArenaInput};
    use crate::game::{MatchSetup, Rng};

    #[test]
    fn views_are_kept_for_kept_views_ticks() {
        let mut views = Views::<u32>::default();
        assert_eq!(views.newest(), 0);
        for tick in 1..=40 {
            views.insert(tick, tick * 10);
        }
        assert_eq!(views.newest(), 40);
        assert_eq!(views.get(40), Some(&400));
        assert_eq!(views.get(9), Some(&90));
        assert_eq!(views.get(8), None, "overwritten by tick 40");
        assert_eq!(views.base(39, 40), Some((1, &390)));
        assert_eq!(views.base(9, 40), Some((31, &90)));
        assert_eq!(views.base(8, 40), None);
        assert_eq!(views.base(40, 40), None, "a view is never its own base");
        assert_eq!(views.base(41, 40), None, "a client cannot hold a tick not sent yet");
    }

    /// Plays a four-player match with random inputs; every view must come back exactly from
    /// every older base a room could use, and the deltas must be smaller on the whole.
    #[test]
    fn every_view_comes_back_from_its_delta_and_deltas_are_smaller() {
        let mode = Arena::modes().iter().find(|m| m.name == "ffa").unwrap();
        let mut arena = Arena::new(mode, &MatchSetup { players: 4, tick_hz: 30, seed: 7, time_limit_secs: None });
        for seat in 0..4 {
            arena.set_present(seat, true);
        }
        let mut rng = Rng::new(99);
        let mut history: Vec<Vec<<Arena as Game>::View>> = vec![Vec::new(); 4];
        let (mut full, mut delta) = (0usize, 0usize);
        for _ in 0..900 {
            let inputs: Vec<ArenaInput> = (0..4)
                .map(|_| ArenaInput {
                    buttons: rng.below(32) as u8,
                    aim_x: rng.below(8192) as i16 - 4096,
                    aim_y: rng.below(8192) as i16 - 4096,
                })
                .collect();
            let slices: Vec<&[ArenaInput]> = inputs.iter().map(std::slice::from_ref).collect();
            arena.step(&slices);
            for (seat, seen) in history.iter_mut().enumerate() {
                let now = arena.view(seat as u8);
                for back in [1usize, 2, 5, 31] {
                    if let Some(base) = seen.len().checked_sub(back).map(|i| &seen[i]) {
                        let d = Arena::diff(base, &now, back as u32);
                        assert_eq!(Arena::patch(base, &d, back as u32).as_ref(), Some(&now), "{back} back");
                        if back == 2 {
                            full += bitcode::encode(&now).len();
                            delta += bitcode::encode(&d).len();
                        }
                    }
                }
                seen.push(now);
            }
        }
        assert!(delta < full, "deltas {delta} bytes against {full} for whole views");
    }

    #[test]
    fn a_client_rebuilds_views_from_deltas_and_drops_those_it_cannot() {
        let mode = &Arena::modes()[0];
        let mut arena = Arena::new(mode, &MatchSetup { players: 2, tick_hz: 30, seed: 3, time_limit_secs: None });
        arena.set_present(0, true);
        arena.set_present(1, true);
        let right = ArenaInput { buttons: ArenaInput::RIGHT | ArenaInput::FIRE, aim_x: 100, aim_y: 0 };
        let step = |arena: &mut Arena| {
            arena.step(&[&[right], &[]]);
            arena.view(0)
        };
        let mut client = Views::default();
        let first = step(&mut arena);
        client.insert(arena.tick(), first.clone());
        let second = step(&mut arena);
        let d = Arena::diff(&first, &second, 1);
        assert_eq!(client.patch::<Arena>(arena.tick(), 1, &d), Some(second.clone()));
        assert_eq!(client.newest(), arena.tick());
        // A base the client never had: dropped, nothing kept.
        let third = step(&mut arena);
        let d = Arena::diff(&first, &third, 5);
        assert_eq!(client.patch::<Arena>(arena.tick(), 5, &d), None);
        assert_eq!(client.newest(), arena.tick() - 1);
        // A hostile delta (a bullet index the base does not have) is refused.
        let mut bad = Arena::diff(&second, &third, 1);
        bad.bullets.push(crate::arena::BulletDelta::Flew(200));
        assert_eq!(client.patch::<Arena>(arena.tick(), 1, &bad), None);
    }
}
