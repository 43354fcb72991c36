//! Property tests of the simulation: same inputs give the same state; a client that predicts
//! its own player and reconciles with delayed snapshots ends up exactly where the server says,
//! with no corrections, whatever the latency, jitter and packet loss.
// Test code may panic on anything unexpected: that is how a test fails.
#![allow(clippy::unwrap_used)]
#![cfg(not(target_arch = "wasm32"))]

use proptest::prelude::*;
use rallypoint_shared::arena::{Arena, ArenaInput, Body};
use rallypoint_shared::game::{Game, MatchSetup};
use rallypoint_shared::inputs::InputQueue;
use rallypoint_shared::predict::Predictor;
use rallypoint_shared::room::MAX_INPUTS_PER_MESSAGE;

fn input() -> impl Strategy<Value = ArenaInput> {
    (0u8..16, -2000i16..2000, -2000i16..2000).prop_map(|(buttons, aim_x, aim_y)| ArenaInput { buttons, aim_x, aim_y })
}

fn arena(players: u8, seed: u64) -> Arena {
    let mode = Arena::modes().iter().find(|m| m.name == "brawl").unwrap();
    let mut arena = Arena::new(mode, &MatchSetup { players, tick_hz: 30, seed, time_limit_secs: None });
    for seat in 0..players {
        arena.set_present(seat, true);
    }
    arena
}

proptest! {
    // 256 cases each by default; PROPTEST_CASES=N for more.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    fn the_same_inputs_give_the_same_state(
        seed in any::<u64>(),
        players in 2u8..=8,
        log in prop::collection::vec(prop::collection::vec(input(), 8), 1..200),
    ) {
        let run = || {
            let mut arena = arena(players, seed);
            let mut hashes = Vec::new();
            for tick in &log {
                let per_seat: Vec<&[ArenaInput]> = tick.iter().take(players.into()).map(std::slice::from_ref).collect();
                arena.step(&per_seat);
                hashes.push(arena.state_hash());
            }
            (hashes, arena.outcome())
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn prediction_replay_equals_the_server_state(
        seed in any::<u64>(),
        moves in prop::collection::vec(0u8..16, 20..300),
        latency in 0usize..8,
        jitter in prop::collection::vec(0usize..4, 300),
        lost in prop::collection::vec(prop::bool::weighted(0.15), 300),
    ) {
        // Seat 0 moves (no shooting: being shot is not predicted); seat 1 stands still.
        let mut server = arena(2, seed);
        server.step(&[&[], &[]]);
        let mut queue: InputQueue<ArenaInput> = InputQueue::new(1000);
        let mut client: Predictor<Arena> = Predictor::new(server.rules());
        let mut to_server: Vec<(usize, u32, Vec<ArenaInput>)> = Vec::new();
        let mut to_client: Vec<(usize, u32, <Arena as Game>::View)> = Vec::new();
        let mut applied = Vec::new();
        let total = moves.len() + latency * 2 + 20;
        for now in 0..total {
            // The client samples one input per tick and, every tick, sends its unacknowledged
            // inputs. Some messages are lost, never two in a row.
            if let Some(&buttons) = moves.get(now) {
                client.input(ArenaInput { buttons, aim_x: 1, aim_y: 0 });
            }
            let (first, inputs) = client.to_send(MAX_INPUTS_PER_MESSAGE);
            let dropped = lost[now % lost.len()] && !lost[(now + lost.len() - 1) % lost.len()];
            if !inputs.is_empty() && !dropped {
                to_server.push((now + latency + jitter[now % jitter.len()], first, inputs));
            }
            for (_, first, inputs) in to_server.iter().filter(|(at, ..)| *at == now) {
                queue.offer(*first, server.tick(), server.tick(), inputs);
            }
            queue.take(&mut applied);
            server.step(&[&applied, &[]]);
            to_client.push((now + latency, queue.ack(), server.view(0)));
            for (_, ack, view) in to_client.iter().filter(|(at, ..)| *at == now) {
                client.snapshot(*ack, view);
            }
        }
        let truth = Arena::own(&server.view(0));
        prop_assert_eq!(client.own().copied(), Some(truth));
        prop_assert_eq!(client.corrections, 0, "the client never had to correct itself: {:?}", queue.stats);
        prop_assert!(queue.stats.dropped_far == 0);
        let _: Body = truth;
    }
}
