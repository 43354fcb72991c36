//! The demo game: a top-down arena shooter. Move with the direction buttons, aim anywhere,
//! shoot; walls stop bullets and block sight. First to the score limit, or best score when time
//! runs out, wins.
//!
//! All state is integers. Positions are in world units, [`TILE`] units to a tile, so that the
//! simulation is bit-for-bit the same natively and in WebAssembly.

use bitcode::{Decode, Encode};

use crate::game::{EndReason, Fnv64, Game, MatchSetup, Mode, Outcome, Rng, Seat, ranks_from_scores};

/// World units per tile.
pub const TILE: i32 = 256;
/// Map width and height, in tiles.
pub const MAP_W: i32 = 40;
/// See [`MAP_W`].
pub const MAP_H: i32 = 24;
/// Half the side of a player's square body, in world units.
pub const PLAYER_HALF: i32 = 88;
/// Player speed, world units per second (5 tiles per second).
pub const PLAYER_SPEED: i32 = 5 * TILE;
/// Bullet speed, world units per second.
pub const BULLET_SPEED: i32 = 16 * TILE;
/// Bullet lifetime, in milliseconds.
pub const BULLET_LIFE_MS: u32 = 1200;
/// Damage of one hit.
pub const BULLET_DAMAGE: u8 = 20;
/// Health of a fresh player.
pub const MAX_HP: u8 = 100;
/// Time between shots, in milliseconds.
pub const FIRE_INTERVAL_MS: u32 = 250;
/// Time a fallen player waits before coming back, in milliseconds.
pub const RESPAWN_MS: u32 = 2000;
/// How far a player sees, in world units (walls permitting).
pub const VIEW_RANGE: i32 = 16 * TILE;
/// How far an aim vector may reach, per axis.
pub const MAX_AIM: i16 = 16 * 256;

/// The map: `#` wall, `.` floor, `S` spawn point.
pub const MAP: [&str; MAP_H as usize] = [
    "########################################",
    "#S........#..................#........S#",
    "#.........#..................#.........#",
    "#..###....#....##......##....#....###..#",
    "#..#...........##......##...........#..#",
    "#..#..S..........................S..#..#",
    "#.........####............####.........#",
    "####......#..................#......####",
    "#.........#....S........S....#.........#",
    "#....##...#..................#...##....#",
    "#....##..........................##....#",
    "#S..........S....######....S..........S#",
    "#S..........S....######....S..........S#",
    "#....##..........................##....#",
    "#....##...#..................#...##....#",
    "#.........#....S........S....#.........#",
    "####......#..................#......####",
    "#.........####............####.........#",
    "#..#..S..........................S..#..#",
    "#..#...........##......##...........#..#",
    "#..###....#....##......##....#....###..#",
    "#.........#..................#.........#",
    "#S........#..................#........S#",
    "########################################",
];

/// Whether the tile at (`tx`, `ty`) is a wall; outside the map counts as wall.
pub fn is_wall(tx: i32, ty: i32) -> bool {
    if !(0..MAP_W).contains(&tx) || !(0..MAP_H).contains(&ty) {
        return true;
    }
    MAP[ty as usize].as_bytes()[tx as usize] == b'#'
}

fn wall_at(x: i32, y: i32) -> bool {
    is_wall(x.div_euclid(TILE), y.div_euclid(TILE))
}

/// Centres of the spawn tiles, in map order.
pub fn spawn_points() -> Vec<(i32, i32)> {
    let mut points = Vec::new();
    for (ty, row) in MAP.iter().enumerate() {
        for (tx, c) in row.bytes().enumerate() {
            if c == b'S' {
                points.push((tx as i32 * TILE + TILE / 2, ty as i32 * TILE + TILE / 2));
            }
        }
    }
    points
}

const MODES: [Mode; 3] = [
    Mode { name: "duel", title: "Duel (1 v 1)", min_players: 2, max_players: 2 },
    Mode { name: "ffa", title: "Free for all (up to 8)", min_players: 2, max_players: 8 },
    Mode { name: "brawl", title: "Brawl (up to 16)", min_players: 2, max_players: 16 },
];

/// Score limit and time limit of a mode.
fn limits(mode: &str) -> (i32, u32) {
    match mode {
        "duel" => (10, 180),
        "ffa" => (15, 240),
        _ => (20, 240),
    }
}

/// One player's input for one step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Encode, Decode)]
pub struct ArenaInput {
    /// A set of [`ArenaInput::UP`], [`ArenaInput::DOWN`], [`ArenaInput::LEFT`],
    /// [`ArenaInput::RIGHT`] and [`ArenaInput::FIRE`].
    pub buttons: u8,
    /// Where the player aims, relative to their position, in world units (x to the right).
    pub aim_x: i16,
    /// See [`ArenaInput::aim_x`] (y downwards).
    pub aim_y: i16,
}

impl ArenaInput {
    /// Move up.
    pub const UP: u8 = 1;
    /// Move down.
    pub const DOWN: u8 = 2;
    /// Move left.
    pub const LEFT: u8 = 4;
    /// Move right.
    pub const RIGHT: u8 = 8;
    /// Shoot.
    pub const FIRE: u8 = 16;

    fn has(self, button: u8) -> bool {
        self.buttons & button != 0
    }
}

/// What a client needs to predict: the tick rate (speeds are per tick).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct ArenaRules {
    /// Ticks per second.
    pub tick_hz: u16,
}

impl ArenaRules {
    fn per_tick(self, per_second: i32) -> i32 {
        per_second / i32::from(self.tick_hz.max(1))
    }

    fn ticks(self, ms: u32) -> u16 {
        (ms * u32::from(self.tick_hz) / 1000).clamp(1, u32::from(u16::MAX)) as u16
    }
}

/// Moves a player's body one step for `input`, sliding along walls. This is the movement that
/// both the server and the predicting client run.
pub fn move_body(rules: ArenaRules, x: &mut i32, y: &mut i32, input: &ArenaInput) {
    let dx = i32::from(input.has(ArenaInput::RIGHT)) - i32::from(input.has(ArenaInput::LEFT));
    let dy = i32::from(input.has(ArenaInput::DOWN)) - i32::from(input.has(ArenaInput::UP));
    let mut speed = rules.per_tick(PLAYER_SPEED);
    if dx != 0 && dy != 0 {
        speed = speed * 181 / 256; // 1/√2
    }
    if dx != 0 {
        *x = slide_x(*x, *y, dx * speed);
    }
    if dy != 0 {
        *y = slide_y(*x, *y, dy * speed);
    }
}

/// Rows (or columns) of tiles that a body at `c` overlaps.
fn span(c: i32) -> std::ops::RangeInclusive<i32> {
    (c - PLAYER_HALF).div_euclid(TILE)..=(c + PLAYER_HALF).div_euclid(TILE)
}

/// Moves horizontally by `d` (less than a tile), stopping at the first wall.
fn slide_x(x: i32, y: i32, d: i32) -> i32 {
    let nx = x + d;
    let edge = if d > 0 { nx + PLAYER_HALF } else { nx - PLAYER_HALF };
    let column = edge.div_euclid(TILE);
    if span(y).any(|row| is_wall(column, row)) {
        if d > 0 { column * TILE - PLAYER_HALF - 1 } else { (column + 1) * TILE + PLAYER_HALF }
    } else {
        nx
    }
}

/// Moves vertically by `d` (less than a tile), stopping at the first wall.
fn slide_y(x: i32, y: i32, d: i32) -> i32 {
    let ny = y + d;
    let edge = if d > 0 { ny + PLAYER_HALF } else { ny - PLAYER_HALF };
    let row = edge.div_euclid(TILE);
    if span(x).any(|column| is_wall(column, row)) {
        if d > 0 { row * TILE - PLAYER_HALF - 1 } else { (row + 1) * TILE + PLAYER_HALF }
    } else {
        ny
    }
}

/// Whether nothing but floor lies between two points (tile by tile, exact).
pub fn line_of_sight(x0: i32, y0: i32, x1: i32, y1: i32) -> bool {
    let (mut tx, mut ty) = (x0.div_euclid(TILE), y0.div_euclid(TILE));
    let (ex, ey) = (x1.div_euclid(TILE), y1.div_euclid(TILE));
    let (dx, dy) = (i64::from(x1 - x0), i64::from(y1 - y0));
    let (sx, sy) = (dx.signum() as i32, dy.signum() as i32);
    // Each step crosses the nearer of the next vertical and horizontal tile boundaries; the
    // distances are compared as fractions of the segment, in integers.
    for _ in 0..(MAP_W + MAP_H) * 2 {
        if is_wall(tx, ty) {
            return false;
        }
        if (tx, ty) == (ex, ey) {
            return true;
        }
        let bx = i64::from(if sx > 0 { (tx + 1) * TILE } else { tx * TILE });
        let by = i64::from(if sy > 0 { (ty + 1) * TILE } else { ty * TILE });
        let ax = (bx - i64::from(x0)).abs() * dy.abs();
        let ay = (by - i64::from(y0)).abs() * dx.abs();
        if sy == 0 || (sx != 0 && ax < ay) {
            tx += sx;
        } else if sx == 0 || ay < ax {
            ty += sy;
        } else {
            // Through a corner: seen only if both neighbours are open.
            if is_wall(tx + sx, ty) || is_wall(tx, ty + sy) {
                return false;
            }
            tx += sx;
            ty += sy;
        }
    }
    false
}

/// A player in the match.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
struct Player {
    x: i32,
    y: i32,
    aim_x: i16,
    aim_y: i16,
    hp: u8,
    /// Ticks until the next shot is allowed.
    cooldown: u16,
    /// Ticks until this fallen player comes back; 0 while alive.
    respawn: u16,
    /// Connected at least once and not released.
    present: bool,
    /// Has a body in the world.
    spawned: bool,
    kills: i32,
    deaths: i32,
}

impl Player {
    fn alive(&self) -> bool {
        self.present && self.spawned && self.respawn == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
struct Bullet {
    x: i32,
    y: i32,
    vx: i32,
    vy: i32,
    owner: Seat,
    ttl: u16,
}

/// A match of the arena game.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Arena {
    mode: String,
    rules: ArenaRules,
    score_limit: i32,
    time_limit: u32,
    tick: u32,
    rng: Rng,
    players: Vec<Player>,
    bullets: Vec<Bullet>,
    ended: Option<Outcome>,
}

/// The viewer's own state, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Me {
    /// Position, world units.
    pub x: u16,
    /// See [`Me::x`].
    pub y: u16,
    /// Health.
    pub hp: u8,
    /// Ticks until the viewer comes back (0 while alive).
    pub respawn: u16,
}

/// Another player the viewer can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Seen {
    /// Their seat.
    pub seat: Seat,
    /// Position, world units.
    pub x: u16,
    /// See [`Seen::x`].
    pub y: u16,
    /// Aim direction, scaled to length 127.
    pub aim_x: i8,
    /// See [`Seen::aim_x`].
    pub aim_y: i8,
    /// Health.
    pub hp: u8,
}

/// A bullet the viewer can see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct SeenBullet {
    /// Position, world units.
    pub x: u16,
    /// See [`SeenBullet::x`].
    pub y: u16,
    /// Velocity, world units per tick.
    pub vx: i16,
    /// See [`SeenBullet::vx`].
    pub vy: i16,
}

/// What one player sees at one tick: themselves, the players and bullets in their line of
/// sight, and the public scoreboard. Nothing else is ever sent to them.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ArenaView {
    /// The viewer.
    pub me: Me,
    /// Others in sight.
    pub others: Vec<Seen>,
    /// Bullets in sight.
    pub bullets: Vec<SeenBullet>,
    /// Kills of each seat.
    pub scores: Vec<i16>,
    /// Ticks left before the time limit.
    pub ticks_left: u32,
}

/// How one seat's view changed over some ticks ([`Game::diff`]): positions as differences,
/// everything else only when it changed, bullets that flew on as predicted by their index.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ArenaDelta {
    /// The viewer.
    pub me: MeDelta,
    /// Others in sight now, in the view's order.
    pub others: Vec<SeenDelta>,
    /// Bullets in sight now, in the view's order.
    pub bullets: Vec<BulletDelta>,
    /// The scoreboard, when it changed.
    pub scores: Option<Vec<i16>>,
    /// Ticks left, when the clock did not simply run on.
    pub ticks_left: Option<u32>,
}

/// How the viewer changed. Coordinates fit in `i16` (the map is 10,240 units wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct MeDelta {
    /// Movement.
    pub dx: i16,
    /// See [`MeDelta::dx`].
    pub dy: i16,
    /// Health, when it changed.
    pub hp: Option<u8>,
    /// Respawn countdown, when it changed.
    pub respawn: Option<u16>,
}

/// Another player in sight: movement from where the base saw them (from 0, 0 when it did
/// not), aim and health when they changed (always, for a player the base did not see).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct SeenDelta {
    /// Their seat.
    pub seat: Seat,
    /// Movement.
    pub dx: i16,
    /// See [`SeenDelta::dx`].
    pub dy: i16,
    /// Aim, when it changed.
    pub aim: Option<(i8, i8)>,
    /// Health, when it changed.
    pub hp: Option<u8>,
}

/// A bullet in sight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum BulletDelta {
    /// The base's bullet at this index, flown on at its velocity.
    Flew(u8),
    /// A bullet the base did not see there.
    New(SeenBullet),
}

fn moved(from: u16, to: u16) -> i16 {
    (i32::from(to) - i32::from(from)) as i16
}

fn move_by(from: u16, by: i16) -> Option<u16> {
    u16::try_from(i32::from(from) + i32::from(by)).ok()
}

/// Where `b` is after `ticks` more ticks of flight, if still on the map.
fn flown(b: SeenBullet, ticks: u32) -> Option<SeenBullet> {
    let ticks = i64::from(ticks);
    let at = |p: u16, v: i16| u16::try_from(i64::from(p) + i64::from(v) * ticks).ok();
    Some(SeenBullet { x: at(b.x, b.vx)?, y: at(b.y, b.vy)?, ..b })
}

fn diff_views(base: &ArenaView, now: &ArenaView, ticks: u32) -> ArenaDelta {
    let me = MeDelta {
        dx: moved(base.me.x, now.me.x),
        dy: moved(base.me.y, now.me.y),
        hp: (now.me.hp != base.me.hp).then_some(now.me.hp),
        respawn: (now.me.respawn != base.me.respawn).then_some(now.me.respawn),
    };
    let others = now
        .others
        .iter()
        .map(|o| {
            let was = base.others.iter().find(|b| b.seat == o.seat);
            let (x, y) = was.map_or((0, 0), |b| (b.x, b.y));
            SeenDelta {
                seat: o.seat,
                dx: moved(x, o.x),
                dy: moved(y, o.y),
                aim: (was.map(|b| (b.aim_x, b.aim_y)) != Some((o.aim_x, o.aim_y))).then_some((o.aim_x, o.aim_y)),
                hp: (was.map(|b| b.hp) != Some(o.hp)).then_some(o.hp),
            }
        })
        .collect();
    // Bullets keep their order in the game, so the search goes on from the last one found.
    let mut from = 0;
    let bullets = now
        .bullets
        .iter()
        .map(|n| {
            let found = (from..base.bullets.len().min(256)).find(|&i| flown(base.bullets[i], ticks) == Some(*n));
            match found {
                Some(i) => {
                    from = i + 1;
                    BulletDelta::Flew(i as u8)
                }
                None => BulletDelta::New(*n),
            }
        })
        .collect();
    ArenaDelta {
        me,
        others,
        bullets,
        scores: (now.scores != base.scores).then(|| now.scores.clone()),
        ticks_left: (now.ticks_left != base.ticks_left.saturating_sub(ticks)).then_some(now.ticks_left),
    }
}

fn patch_view(base: &ArenaView, delta: &ArenaDelta, ticks: u32) -> Option<ArenaView> {
    let d = &delta.me;
    let me = Me {
        x: move_by(base.me.x, d.dx)?,
        y: move_by(base.me.y, d.dy)?,
        hp: d.hp.unwrap_or(base.me.hp),
        respawn: d.respawn.unwrap_or(base.me.respawn),
    };
    let others = delta
        .others
        .iter()
        .map(|d| {
            let was = base.others.iter().find(|b| b.seat == d.seat);
            let (aim_x, aim_y) = d.aim.or(was.map(|b| (b.aim_x, b.aim_y)))?;
            Some(Seen {
                seat: d.seat,
                x: move_by(was.map_or(0, |b| b.x), d.dx)?,
                y: move_by(was.map_or(0, |b| b.y), d.dy)?,
                aim_x,
                aim_y,
                hp: d.hp.or(was.map(|b| b.hp))?,
            })
        })
        .collect::<Option<_>>()?;
    let bullets = delta
        .bullets
        .iter()
        .map(|b| match b {
            BulletDelta::Flew(i) => flown(*base.bullets.get(usize::from(*i))?, ticks),
            BulletDelta::New(b) => Some(*b),
        })
        .collect::<Option<_>>()?;
    Some(ArenaView {
        me,
        others,
        bullets,
        scores: delta.scores.clone().unwrap_or_else(|| base.scores.clone()),
        ticks_left: delta.ticks_left.unwrap_or(base.ticks_left.saturating_sub(ticks)),
    })
}

/// The predicted part of a player: where their body is, and whether it can move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body {
    /// Position, world units.
    pub x: i32,
    /// See [`Body::x`].
    pub y: i32,
    /// Whether the body moves (alive).
    pub alive: bool,
}

/// An aim vector scaled to `len`, or `None` for a zero vector.
fn scaled(x: i16, y: i16, len: i64) -> Option<(i64, i64)> {
    let (x, y) = (i64::from(x), i64::from(y));
    let norm = (x * x + y * y).cast_unsigned().isqrt().cast_signed();
    (norm > 0).then(|| (x * len / norm, y * len / norm))
}

impl Arena {
    fn spawn(&mut self, seat: usize) {
        let points = spawn_points();
        // Prefer a spawn point out of every living enemy's sight; try a few at random.
        let mut choice = points[self.rng.below(points.len() as u32) as usize];
        for _ in 0..8 {
            let candidate = points[self.rng.below(points.len() as u32) as usize];
            let seen = self
                .players
                .iter()
                .enumerate()
                .any(|(i, p)| i != seat && p.alive() && line_of_sight(p.x, p.y, candidate.0, candidate.1));
            choice = candidate;
            if !seen {
                break;
            }
        }
        let p = &mut self.players[seat];
        (p.x, p.y) = choice;
        p.hp = MAX_HP;
        p.respawn = 0;
        p.cooldown = 0;
        p.spawned = true;
    }

    fn apply(&mut self, seat: usize, input: ArenaInput) {
        let rules = self.rules;
        let p = &mut self.players[seat];
        if !p.alive() {
            return;
        }
        p.aim_x = input.aim_x.clamp(-MAX_AIM, MAX_AIM);
        p.aim_y = input.aim_y.clamp(-MAX_AIM, MAX_AIM);
        move_body(rules, &mut p.x, &mut p.y, &input);
        if input.has(ArenaInput::FIRE)
            && p.cooldown == 0
            && let Some((vx, vy)) = scaled(p.aim_x, p.aim_y, i64::from(rules.per_tick(BULLET_SPEED)))
        {
            p.cooldown = rules.ticks(FIRE_INTERVAL_MS);
            let (vx, vy) = (vx as i32, vy as i32);
            self.bullets.push(Bullet { x: p.x, y: p.y, vx, vy, owner: seat as Seat, ttl: rules.ticks(BULLET_LIFE_MS) });
        }
    }

    /// Moves every bullet one tick in steps of at most a quarter tile, so that none passes
    /// through a wall or a body.
    fn fly(&mut self) {
        let mut bullets = std::mem::take(&mut self.bullets);
        bullets.retain_mut(|b| {
            b.ttl = b.ttl.saturating_sub(1);
            if b.ttl == 0 {
                return false;
            }
            let steps = (b.vx.abs().max(b.vy.abs()) / (TILE / 4)).max(1) + 1;
            let (x0, y0) = (b.x, b.y);
            for k in 1..=steps {
                b.x = x0 + b.vx * k / steps;
                b.y = y0 + b.vy * k / steps;
                if wall_at(b.x, b.y) {
                    return false;
                }
                if let Some(victim) = self
                    .players
                    .iter()
                    .position(|p| p.alive() && (p.x - b.x).abs() <= PLAYER_HALF && (p.y - b.y).abs() <= PLAYER_HALF)
                    && victim != usize::from(b.owner)
                {
                    self.hit(victim, usize::from(b.owner));
                    return false;
                }
            }
            true
        });
        self.bullets = bullets;
    }

    fn hit(&mut self, victim: usize, shooter: usize) {
        let respawn = self.rules.ticks(RESPAWN_MS);
        let v = &mut self.players[victim];
        v.hp = v.hp.saturating_sub(BULLET_DAMAGE);
        if v.hp == 0 {
            v.respawn = respawn;
            v.deaths += 1;
            self.players[shooter].kills += 1;
        }
    }

    fn finish(&mut self) {
        let present = self.players.iter().filter(|p| p.present).count();
        let reason = if self.players.iter().any(|p| p.kills >= self.score_limit) {
            EndReason::ScoreLimit
        } else if self.tick >= self.time_limit {
            EndReason::TimeLimit
        } else if present < 2 {
            EndReason::Forfeit
        } else {
            return;
        };
        // Players who left rank below those who stayed.
        let keys: Vec<i32> = self.players.iter().map(|p| p.kills + if p.present { 1 << 20 } else { 0 }).collect();
        self.ended = Some(Outcome {
            ranks: ranks_from_scores(&keys),
            scores: self.players.iter().map(|p| p.kills).collect(),
            reason,
            ticks: self.tick,
        });
    }
}

impl Game for Arena {
    type Input = ArenaInput;
    type View = ArenaView;
    type Delta = ArenaDelta;
    type Own = Body;
    type Rules = ArenaRules;

    fn modes() -> &'static [Mode] {
        &MODES
    }

    fn new(mode: &Mode, setup: &MatchSetup) -> Self {
        let (score_limit, time_secs) = limits(mode.name);
        let time_secs = setup.time_limit_secs.map_or(time_secs, u32::from);
        let player = Player {
            x: 0,
            y: 0,
            aim_x: 1,
            aim_y: 0,
            hp: MAX_HP,
            cooldown: 0,
            respawn: 0,
            present: false,
            spawned: false,
            kills: 0,
            deaths: 0,
        };
        Self {
            mode: mode.name.to_owned(),
            rules: ArenaRules { tick_hz: setup.tick_hz.max(1) },
            score_limit,
            time_limit: time_secs * u32::from(setup.tick_hz.max(1)),
            tick: 0,
            rng: Rng::new(setup.seed),
            players: vec![player; usize::from(setup.players)],
            bullets: Vec::new(),
            ended: None,
        }
    }

    fn step(&mut self, inputs: &[&[ArenaInput]]) {
        if self.ended.is_some() {
            return;
        }
        self.tick += 1;
        for seat in 0..self.players.len() {
            let p = &mut self.players[seat];
            if !p.present {
                continue;
            }
            if !p.spawned || p.respawn == 1 {
                self.spawn(seat);
            } else if p.respawn > 1 {
                p.respawn -= 1;
            }
            for input in inputs.get(seat).copied().unwrap_or_default() {
                self.apply(seat, *input);
            }
            let p = &mut self.players[seat];
            p.cooldown = p.cooldown.saturating_sub(1);
        }
        self.fly();
        self.finish();
    }

    fn set_present(&mut self, seat: Seat, present: bool) {
        if let Some(p) = self.players.get_mut(usize::from(seat)) {
            p.present = present;
            if !present {
                p.spawned = false;
            }
        }
        if !present {
            self.finish();
        }
    }

    fn view(&self, seat: Seat) -> ArenaView {
        let me = &self.players[usize::from(seat)];
        let sees = |x: i32, y: i32| {
            me.alive()
                && (x - me.x).abs() <= VIEW_RANGE
                && (y - me.y).abs() <= VIEW_RANGE
                && line_of_sight(me.x, me.y, x, y)
        };
        let others = self
            .players
            .iter()
            .enumerate()
            .filter(|&(i, p)| i != usize::from(seat) && p.alive() && sees(p.x, p.y))
            .map(|(i, p)| {
                let (ax, ay) = scaled(p.aim_x, p.aim_y, 127).unwrap_or((127, 0));
                Seen { seat: i as Seat, x: p.x as u16, y: p.y as u16, aim_x: ax as i8, aim_y: ay as i8, hp: p.hp }
            })
            .collect();
        let bullets = self
            .bullets
            .iter()
            .filter(|b| sees(b.x, b.y))
            .map(|b| SeenBullet { x: b.x as u16, y: b.y as u16, vx: b.vx as i16, vy: b.vy as i16 })
            .collect();
        ArenaView {
            me: Me { x: me.x.max(0) as u16, y: me.y.max(0) as u16, hp: me.hp, respawn: me.respawn },
            others,
            bullets,
            scores: self.players.iter().map(|p| p.kills as i16).collect(),
            ticks_left: self.time_limit.saturating_sub(self.tick),
        }
    }

    fn diff(base: &ArenaView, now: &ArenaView, ticks: u32) -> ArenaDelta {
        diff_views(base, now, ticks)
    }

    fn patch(base: &ArenaView, delta: &ArenaDelta, ticks: u32) -> Option<ArenaView> {
        patch_view(base, delta, ticks)
    }

    fn outcome(&self) -> Option<Outcome> {
        self.ended.clone()
    }

    fn tick(&self) -> u32 {
        self.tick
    }

    fn state_hash(&self) -> u64 {
        let mut hash = Fnv64::default();
        hash.write(&bitcode::encode(self));
        hash.finish()
    }

    fn rules(&self) -> ArenaRules {
        self.rules
    }

    fn own(view: &ArenaView) -> Body {
        Body { x: i32::from(view.me.x), y: i32::from(view.me.y), alive: view.me.respawn == 0 && view.me.hp > 0 }
    }

    fn predict(rules: &ArenaRules, own: &mut Body, input: &ArenaInput) {
        if own.alive {
            move_body(*rules, &mut own.x, &mut own.y, input);
        }
    }

    fn divergence(a: &Body, b: &Body) -> u32 {
        (a.x - b.x).unsigned_abs().max((a.y - b.y).unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(players: u8) -> MatchSetup {
        MatchSetup { players, tick_hz: 30, seed: 42, time_limit_secs: None }
    }

    fn duel() -> Arena {
        let mut arena = Arena::new(&MODES[0], &setup(2));
        arena.set_present(0, true);
        arena.set_present(1, true);
        arena.step(&[&[], &[]]);
        arena
    }

    #[test]
    fn the_map_is_closed_and_symmetric_with_enough_spawns() {
        for row in MAP {
            assert_eq!(row.len(), MAP_W as usize);
            assert_eq!(row.bytes().rev().collect::<Vec<u8>>(), row.as_bytes(), "mirror-symmetric");
        }
        assert!(MAP[0].bytes().chain(MAP[MAP_H as usize - 1].bytes()).all(|c| c == b'#'));
        assert!(spawn_points().len() >= 16);
        for (x, y) in spawn_points() {
            assert!(!wall_at(x - PLAYER_HALF, y - PLAYER_HALF) && !wall_at(x + PLAYER_HALF, y + PLAYER_HALF));
        }
    }

    #[test]
    fn walls_stop_bodies() {
        let rules = ArenaRules { tick_hz: 30 };
        let (mut x, mut y) = (TILE + TILE / 2, TILE + TILE / 2); // next to the top-left corner
        let left = ArenaInput { buttons: ArenaInput::LEFT | ArenaInput::UP, ..Default::default() };
        for _ in 0..30 {
            move_body(rules, &mut x, &mut y, &left);
        }
        assert_eq!((x, y), (TILE + PLAYER_HALF, TILE + PLAYER_HALF), "pressed into the corner, not through it");
        let right = ArenaInput { buttons: ArenaInput::RIGHT, ..Default::default() };
        for _ in 0..200 {
            move_body(rules, &mut x, &mut y, &right);
        }
        // Row 1 has a wall at column 10.
        assert_eq!(x, 10 * TILE - PLAYER_HALF - 1);
    }

    #[test]
    fn diagonal_speed_is_normalised() {
        let rules = ArenaRules { tick_hz: 30 };
        let (mut x, mut y) = (20 * TILE, 5 * TILE);
        let diagonal = ArenaInput { buttons: ArenaInput::RIGHT | ArenaInput::DOWN, ..Default::default() };
        move_body(rules, &mut x, &mut y, &diagonal);
        let step = PLAYER_SPEED / 30 * 181 / 256;
        assert_eq!((x, y), (20 * TILE + step, 5 * TILE + step));
    }

    #[test]
    fn line_of_sight_is_blocked_by_walls_and_symmetric() {
        let c = |tx: i32, ty: i32| (tx * TILE + TILE / 2, ty * TILE + TILE / 2);
        let (a, b) = (c(1, 1), c(9, 1));
        assert!(line_of_sight(a.0, a.1, b.0, b.1));
        let beyond = c(11, 1); // column 10 is a wall
        assert!(!line_of_sight(a.0, a.1, beyond.0, beyond.1));
        assert!(!line_of_sight(beyond.0, beyond.1, a.0, a.1));
        let centre_left = c(16, 11);
        let centre_right = c(23, 11); // the central block lies between
        assert!(!line_of_sight(centre_left.0, centre_left.1, centre_right.0, centre_right.1));
        assert!(line_of_sight(c(2, 5).0, c(2, 5).1, c(2, 5).0, c(2, 5).1), "a point sees itself");
    }

    #[test]
    fn a_shot_hits_and_enough_shots_kill() {
        let mut arena = duel();
        // Put the two players in the open, face to face.
        (arena.players[0].x, arena.players[0].y) = (14 * TILE, 5 * TILE);
        (arena.players[1].x, arena.players[1].y) = (20 * TILE, 5 * TILE);
        let fire = ArenaInput { buttons: ArenaInput::FIRE, aim_x: 1000, aim_y: 0 };
        let mut ticks = 0;
        while arena.players[1].respawn == 0 {
            arena.step(&[&[fire], &[]]);
            ticks += 1;
            assert!(ticks < 300, "never killed");
        }
        assert_eq!(arena.players[0].kills, 1);
        assert_eq!(arena.players[1].deaths, 1);
        assert_eq!(arena.players[1].hp, 0);
        // The fallen player comes back after the respawn time, at full health.
        for _ in 0..arena.rules.ticks(RESPAWN_MS) {
            arena.step(&[&[], &[]]);
        }
        assert!(arena.players[1].alive());
        assert_eq!(arena.players[1].hp, MAX_HP);
    }

    #[test]
    fn views_hold_only_what_the_viewer_can_see() {
        let mut arena = duel();
        // Either side of the central block: hidden from each other.
        (arena.players[0].x, arena.players[0].y) = (16 * TILE, 11 * TILE + TILE / 2);
        (arena.players[1].x, arena.players[1].y) = (24 * TILE, 11 * TILE + TILE / 2);
        assert!(arena.view(0).others.is_empty());
        assert!(arena.view(1).others.is_empty());
        // In the open: visible, with scores public either way.
        arena.players[1].y = 9 * TILE + TILE / 2;
        arena.players[0].y = 9 * TILE + TILE / 2;
        let view = arena.view(0);
        assert_eq!(view.others.len(), 1);
        assert_eq!(view.others[0].seat, 1);
        assert_eq!(view.scores.len(), 2);
    }

    #[test]
    fn the_match_ends_at_the_score_or_time_limit_or_when_a_side_leaves() {
        let quick = MatchSetup { time_limit_secs: Some(1), ..setup(2) };
        let mut arena = Arena::new(&MODES[0], &quick);
        arena.set_present(0, true);
        arena.set_present(1, true);
        for _ in 0..30 {
            assert!(arena.outcome().is_none());
            arena.step(&[&[], &[]]);
        }
        let outcome = arena.outcome().unwrap();
        assert_eq!(outcome.reason, EndReason::TimeLimit);
        assert_eq!(outcome.ranks, vec![1, 1]);

        let mut arena = duel();
        arena.players[1].kills = 3;
        arena.set_present(1, false);
        let outcome = arena.outcome().unwrap();
        assert_eq!(outcome.reason, EndReason::Forfeit);
        assert_eq!(outcome.ranks, vec![1, 2], "who stays wins, whatever the score");
    }
}
