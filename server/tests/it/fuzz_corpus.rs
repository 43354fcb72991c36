//! The fuzz targets' short run in `cargo xtask test`: every seed, every input of the committed
//! corpora (`fuzz/corpus/<target>/`, grown by `cargo xtask fuzz`), and 3,000 seeded mutations of
//! them per target, through the same decoders the fuzzer drives. None may panic.

use rallypoint_server::fuzzing::{TARGETS, seeds};
use shared::game::Rng;

/// Mutated inputs tried per target, spread over its inputs (an SDP answer takes milliseconds in
/// a debug build: the long runs are `cargo xtask fuzz`'s).
const MUTATIONS: usize = 3000;

fn corpus_dir(target: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.filter_map(|e| std::fs::read(e.ok()?.path()).ok()).collect()
}

/// One random edit: flip a bit, drop or repeat a slice, insert a byte, or cut the end.
fn mutate(input: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    let at = |rng: &mut Rng, len: usize| rng.below(len.max(1) as u32) as usize;
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !out.is_empty() => {
                let i = at(rng, out.len());
                out[i] ^= 1 << rng.below(8);
            }
            1 if !out.is_empty() => {
                let i = at(rng, out.len());
                let n = at(rng, out.len() - i) + 1;
                out.drain(i..i + n);
            }
            2 if !out.is_empty() => {
                let i = at(rng, out.len());
                let n = (at(rng, out.len() - i) + 1).min(64);
                let slice = out[i..i + n].to_vec();
                out.splice(i..i, slice);
            }
            3 => {
                let i = at(rng, out.len() + 1);
                out.insert(i, [0, 0xff, b'"', b'{', b'=', b'&', b'%', b'\r'][rng.below(8) as usize]);
            }
            _ => out.truncate(at(rng, out.len() + 1)),
        }
    }
    out
}

#[test]
fn every_decoder_survives_its_corpus_and_mutations_of_it() {
    let seeds = seeds();
    let mut rng = Rng::new(0x00f0_2200);
    for (name, target) in TARGETS {
        let mut inputs: Vec<Vec<u8>> = seeds.iter().filter(|(t, _)| *t == name).map(|(_, s)| s.clone()).collect();
        assert!(!inputs.is_empty(), "{name} has seeds");
        inputs.extend(corpus(name));
        for input in &inputs {
            target(input);
        }
        for i in 0..MUTATIONS {
            target(&mutate(&inputs[i % inputs.len()], &mut rng));
        }
    }
}

#[test]
fn the_seeds_are_what_the_server_accepts() {
    // Seeds that decode make the fuzzer start from the interesting paths.
    for (name, seed) in seeds() {
        let ok = match name {
            "hub_message" => shared::hub::ClientMsg::from_json(std::str::from_utf8(&seed).unwrap()).is_ok(),
            "room_frame" => {
                shared::room::JoinRequest::decode(&seed).is_ok()
                    || shared::room::ToRoom::<shared::arena::ArenaInput>::decode(&seed).is_ok()
            }
            _ => true,
        };
        assert!(ok, "{name}: {:?}", String::from_utf8_lossy(&seed));
    }
}
