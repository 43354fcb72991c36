//! A recorded input log replayed natively and in WebAssembly must give the same state hash:
//! the simulation is bit-for-bit deterministic across platforms. `cargo xtask test` runs this
//! file both ways (in wasm under Node with wasm-bindgen-test-runner).

// Test code may panic on anything unexpected: that is how a test fails.
#![allow(clippy::unwrap_used)]

use rallypoint_shared::arena::{Arena, ArenaInput};
use rallypoint_shared::game::{EndReason, Game, MatchSetup, Rng};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

/// The hash both platforms must reach. If a change to the simulation moves it on purpose,
/// update it from the native run, and the wasm run checks the new value.
const GOLDEN: u64 = 0xd257_c6c9_8b57_560a;

/// Eight players for 60 seconds of play at 30 Hz: wandering, turning, shooting.
fn recorded_log() -> Vec<Vec<ArenaInput>> {
    let mut rng = Rng::new(2026);
    let mut current = [ArenaInput::default(); 8];
    (0..1800)
        .map(|_| {
            for input in &mut current {
                if rng.below(15) == 0 {
                    let directions = [0, 1, 2, 4, 8, 5, 6, 9, 10];
                    input.buttons = directions[rng.below(9) as usize];
                    input.aim_x = rng.below(4000) as i16 - 2000;
                    input.aim_y = rng.below(4000) as i16 - 2000;
                }
                input.buttons =
                    (input.buttons & !ArenaInput::FIRE) | if rng.below(3) == 0 { ArenaInput::FIRE } else { 0 };
            }
            current.to_vec()
        })
        .collect()
}

fn replay() -> (u64, Arena) {
    let mode = Arena::modes().iter().find(|m| m.name == "ffa").unwrap();
    let mut arena = Arena::new(mode, &MatchSetup { players: 8, tick_hz: 30, seed: 7, time_limit_secs: Some(120) });
    for seat in 0..8 {
        arena.set_present(seat, true);
    }
    for tick in recorded_log() {
        let per_seat: Vec<&[ArenaInput]> = tick.iter().map(std::slice::from_ref).collect();
        arena.step(&per_seat);
    }
    (arena.state_hash(), arena)
}

#[test]
fn the_recorded_log_gives_the_golden_hash() {
    let (hash, arena) = replay();
    let view = arena.view(0);
    assert!(view.scores.iter().map(|&s| i32::from(s)).sum::<i32>() > 0, "the log has fights in it");
    assert!(arena.outcome().is_none_or(|o| o.reason == EndReason::ScoreLimit));
    assert_eq!(hash, GOLDEN, "state hash {hash:#018x}");
}
