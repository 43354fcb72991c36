//! Where, on the server's timeline, to draw other players: the clock of a stream of snapshots,
//! shared by the browser and the native bots.
//!
//! Snapshots leave the server once per tick but arrive unevenly (jitter) and some never arrive
//! (loss). Drawing others at "the newest snapshot's tick, plus the time since it arrived" jumps
//! with every early or late arrival. Instead, the clock keeps a smoothed estimate of the offset
//! between the server's timeline and the local one, and of how much arrivals scatter around it
//! (the estimator TCP uses for round-trip times, gain 1/16 after a plain mean over the first
//! few), and draws others that many
//! ticks in the past that a snapshot is almost always there on either side: one tick between
//! snapshots, three times the measured jitter, and one tick more while snapshots are being lost.
//! The delay glides towards that target with each snapshot, so that others never jump.
//! Times are milliseconds from any local origin, given by the caller: the crate reads no clock.

/// The shortest and longest interpolation delays, in ticks.
pub const MIN_DELAY_TICKS: f64 = 1.5;
pub const MAX_DELAY_TICKS: f64 = 10.0;
/// Weight of each new sample in the smoothed estimates.
const GAIN: f64 = 1.0 / 16.0;

#[derive(Debug, Clone)]
pub struct SnapshotClock {
    tick_ms: f64,
    /// Smoothed (server time of a snapshot's tick − its local arrival time), in ms.
    offset: Option<f64>,
    /// Smoothed absolute deviation of arrivals from that offset, in ms.
    jitter_ms: f64,
    /// Smoothed share of ticks whose snapshot never came.
    loss: f64,
    newest: Option<u32>,
    samples: u32,
    delay_ticks: f64,
}

impl SnapshotClock {
    /// A clock for a server running at `tick_hz`.
    pub fn new(tick_hz: u16) -> Self {
        Self {
            tick_ms: 1000.0 / f64::from(tick_hz.max(1)),
            offset: None,
            jitter_ms: 0.0,
            loss: 0.0,
            newest: None,
            samples: 0,
            delay_ticks: 2.0,
        }
    }

    /// Takes in a snapshot of `tick` that arrived at `arrival_ms`.
    pub fn on_snapshot(&mut self, tick: u32, arrival_ms: f64) {
        let newest = match self.newest {
            // Older than what we have (reordered or duplicated): nothing to draw from it.
            Some(newest) if tick <= newest => return,
            Some(newest) => newest,
            None => tick.saturating_sub(1),
        };
        self.newest = Some(tick);
        self.samples = self.samples.saturating_add(1);
        // A plain mean over the first samples, so that an early first arrival does not run the
        // clock ahead for long; then the smoothed estimates.
        let gain = GAIN.max(1.0 / f64::from(self.samples));
        let sample = f64::from(tick) * self.tick_ms - arrival_ms;
        let offset = *self.offset.get_or_insert(sample);
        let deviation = sample - offset;
        self.jitter_ms += gain * (deviation.abs() - self.jitter_ms);
        self.offset = Some(offset + gain * deviation);
        // Each tick skipped is a sample of 1 for the loss share, this one a sample of 0.
        for _ in 0..(tick - newest - 1).min(8) {
            self.loss += GAIN * (1.0 - self.loss);
        }
        self.loss -= GAIN * self.loss;
        // The delay moves towards its target a little with each snapshot, never in a jump.
        let late = 3.0 * self.jitter_ms / self.tick_ms;
        let lost = if self.loss > 0.002 { 1.0 } else { 0.0 };
        let target = (1.0 + late + lost).clamp(MIN_DELAY_TICKS, MAX_DELAY_TICKS);
        self.delay_ticks += gain * (target - self.delay_ticks);
    }

    /// The server's tick now: advances at exactly the tick rate, whatever the arrivals do.
    pub fn server_tick(&self, now_ms: f64) -> f64 {
        match self.offset {
            Some(offset) => (now_ms + offset) / self.tick_ms,
            None => f64::from(self.newest.unwrap_or(0)),
        }
    }

    /// How many ticks in the past others are drawn.
    pub fn delay_ticks(&self) -> f64 {
        self.delay_ticks
    }

    /// The tick at which others are drawn now.
    pub fn render_tick(&self, now_ms: f64) -> f64 {
        self.server_tick(now_ms) - self.delay_ticks()
    }

    /// The measured jitter of arrivals, in ms.
    pub fn jitter_ms(&self) -> f64 {
        self.jitter_ms
    }
}

/// The two snapshots to draw between at `render_tick`, among `ticks` (oldest first), and how
/// far from the first to the second (0 to 1). `dry` is set when `render_tick` is beyond the
/// newest snapshot: the buffer ran dry and the newest is drawn as it is.
pub fn pair(ticks: &[u32], render_tick: f64) -> Option<Pair> {
    let newest = ticks.len().checked_sub(1)?;
    match ticks.iter().rposition(|&t| f64::from(t) <= render_tick) {
        Some(i) if i < newest => {
            let (a, b) = (f64::from(ticks[i]), f64::from(ticks[i + 1]));
            Some(Pair { from: i, to: i + 1, t: ((render_tick - a) / (b - a).max(1.0)).clamp(0.0, 1.0), dry: false })
        }
        Some(_) => Some(Pair { from: newest, to: newest, t: 1.0, dry: render_tick > f64::from(ticks[newest]) }),
        // Older than everything kept: draw the oldest.
        None => Some(Pair { from: 0, to: 0, t: 1.0, dry: false }),
    }
}

/// See [`pair`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    pub from: usize,
    pub to: usize,
    pub t: f64,
    pub dry: bool,
}

/// How drawing others between snapshots went: frames drawn, frames drawn past the newest
/// snapshot (the buffer ran dry), and the largest distance another player moved between two
/// frames.
#[derive(Debug, Default, Clone)]
pub struct InterpStats {
    pub frames: u64,
    pub dry: u64,
    /// In tiles; a step of 2 tiles or more is a respawn (a teleport), not counted.
    pub largest_step: f64,
    /// Where each seat was drawn in the last frame.
    last: Vec<(u8, f64, f64)>,
}

impl InterpStats {
    /// Counts one frame in which the seats in `drawn` were drawn at these positions (in world
    /// units, `tile` of them to a tile).
    pub fn frame(&mut self, dry: bool, drawn: &[(u8, f64, f64)], tile: f64) {
        self.frames += 1;
        self.dry += u64::from(dry);
        for &(seat, x, y) in drawn {
            if let Some(&(_, px, py)) = self.last.iter().find(|(s, ..)| *s == seat) {
                let step = (x - px).hypot(y - py) / tile;
                if step < 2.0 {
                    self.largest_step = self.largest_step.max(step);
                }
            }
        }
        self.last.clear();
        self.last.extend_from_slice(drawn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_a_steady_stream_the_clock_advances_smoothly_and_the_delay_is_short() {
        let mut c = SnapshotClock::new(30);
        for tick in 1..=90 {
            c.on_snapshot(tick, f64::from(tick) * 1000.0 / 30.0 + 40.0);
        }
        assert!((c.delay_ticks() - MIN_DELAY_TICKS).abs() < 1e-9, "{}", c.delay_ticks());
        // Between arrivals, the server tick moves at the tick rate.
        let now = 90.0 * 1000.0 / 30.0 + 40.0;
        assert!((c.server_tick(now) - 90.0).abs() < 1e-6);
        assert!((c.server_tick(now + 50.0) - 91.5).abs() < 1e-6);
    }

    /// What drawing others went like over `seconds` of snapshots at 30 Hz, `latency` ms late
    /// plus up to `jitter` ms more, `loss` of them lost, drawn at 60 frames a second: with the
    /// clock, and with what the browser did before it (two ticks behind the newest snapshot's
    /// tick plus the time since it arrived). Returns, for each, the share of frames past the
    /// newest snapshot and the largest error of a frame's step (ideally half a tick), in ticks.
    fn simulate(latency: f64, jitter: f64, loss: f64, seconds: u32) -> [(f64, f64); 2] {
        let mut seed = 3u64;
        let mut random = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) as f64 / f64::from(1u32 << 31)
        };
        let mut arrivals = Vec::new();
        for tick in 1..=seconds * 30 {
            if random() >= loss {
                arrivals.push((f64::from(tick) * 1000.0 / 30.0 + latency + jitter * random(), tick));
            }
        }
        arrivals.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut clock = SnapshotClock::new(30);
        let (mut kept, mut newest_at) = (Vec::new(), 0.0);
        let (mut next, mut now, mut frames) = (0, 0.0, 0u32);
        let mut dry = [0u32; 2];
        let mut step_error = [0.0f64; 2];
        let mut last: [Option<f64>; 2] = [None; 2];
        while now < f64::from(seconds) * 1000.0 {
            while let Some(&(at, tick)) = arrivals.get(next).filter(|(at, _)| *at <= now) {
                clock.on_snapshot(tick, at);
                if kept.last().is_none_or(|&t| t < tick) {
                    kept.push(tick);
                    newest_at = at;
                }
                next += 1;
            }
            if now > 2_000.0 {
                frames += 1;
                let newest = f64::from(*kept.last().unwrap());
                let render = [clock.render_tick(now), newest + (now - newest_at) * 30.0 / 1000.0 - 2.0];
                for i in 0..2 {
                    dry[i] += u32::from(pair(&kept, render[i]).unwrap().dry);
                    if let Some(before) = last[i] {
                        step_error[i] = step_error[i].max((render[i] - before - 0.5).abs());
                    }
                    last[i] = Some(render[i]);
                }
            }
            now += 1000.0 / 60.0;
        }
        [0, 1].map(|i| (f64::from(dry[i]) / f64::from(frames), step_error[i]))
    }

    #[test]
    fn at_150_ms_20_ms_jitter_and_5_percent_loss_others_are_drawn_smoothly_and_rarely_run_dry() {
        let [(dry, step), (dry_before, step_before)] = simulate(75.0, 20.0, 0.05, 120);
        assert!(dry < 0.006 && dry < dry_before / 2.0, "dry {dry} (before {dry_before})");
        assert!(step < 0.1 && step < step_before / 4.0, "step error {step} ticks (before {step_before})");
        // A clean network keeps the delay at its shortest.
        let [(dry, step), _] = simulate(0.0, 0.0, 0.0, 20);
        assert!(dry == 0.0 && step < 1e-9);
    }

    #[test]
    fn pair_finds_the_snapshots_either_side() {
        let ticks = [10, 11, 13];
        assert_eq!(pair(&ticks, 12.0), Some(Pair { from: 1, to: 2, t: 0.5, dry: false }));
        assert_eq!(pair(&ticks, 14.0), Some(Pair { from: 2, to: 2, t: 1.0, dry: true }));
        assert_eq!(pair(&ticks, 9.0).map(|p| p.from), Some(0));
        assert_eq!(pair(&[], 1.0), None);
    }
}
