//! Drawing a match on the canvas: the map, the fog of war (what the player cannot see is
//! darkened; the server never sent what is in it), players, bullets and the HUD.

use std::f64::consts::TAU;

use shared::arena::{MAP_H, MAP_W, PLAYER_HALF, TILE, is_wall, line_of_sight};
use web_sys::{CanvasRenderingContext2d, HtmlCanvasElement};

use super::Match;

/// One colour per seat.
const COLOURS: [&str; 16] = [
    "#4cc9f0", "#f72585", "#b8f35a", "#ffb703", "#9d4edd", "#06d6a0", "#ff6b35", "#e0e1dd", "#3a86ff", "#ff006e",
    "#8ac926", "#fb8500", "#c77dff", "#2ec4b6", "#ef476f", "#ffd166",
];

const FLOOR: &str = "#1a2036";
const GRID: &str = "rgba(255,255,255,0.035)";
const WALL: &str = "#3b4566";
const WALL_EDGE: &str = "#55618a";
const FOG: &str = "rgba(6,8,16,0.62)";

/// Which tiles the player can see, recomputed when they move to another tile.
#[derive(Default)]
pub struct Fog {
    tile: Option<(i32, i32)>,
    visible: Vec<bool>,
}

impl Fog {
    fn update(&mut self, x: i32, y: i32) {
        let tile = (x.div_euclid(TILE), y.div_euclid(TILE));
        if self.tile == Some(tile) {
            return;
        }
        self.tile = Some(tile);
        self.visible = (0..MAP_H)
            .flat_map(|ty| (0..MAP_W).map(move |tx| (tx, ty)))
            .map(|(tx, ty)| is_wall(tx, ty) || line_of_sight(x, y, tx * TILE + TILE / 2, ty * TILE + TILE / 2))
            .collect();
    }

    fn sees(&self, tx: i32, ty: i32) -> bool {
        self.visible.get((ty * MAP_W + tx) as usize).copied().unwrap_or(true)
    }
}

/// Canvas pixels per world unit.
fn scale(canvas: &HtmlCanvasElement) -> f64 {
    f64::from(canvas.width()) / f64::from(MAP_W * TILE)
}

/// A mouse position over the canvas (CSS pixels) in world units.
pub fn to_world(canvas: &HtmlCanvasElement, x: i32, y: i32) -> (f64, f64) {
    let css_width = f64::from(canvas.client_width().max(1));
    let units_per_css_pixel = f64::from(MAP_W * TILE) / css_width;
    (f64::from(x) * units_per_css_pixel, f64::from(y) * units_per_css_pixel)
}

/// Keeps the canvas's pixel size matched to its size on screen.
fn fit(canvas: &HtmlCanvasElement) {
    let ratio = crate::dom::window().device_pixel_ratio().max(1.0);
    let width = (f64::from(canvas.client_width()) * ratio).round().max(320.0) as u32;
    let height = width * MAP_H as u32 / MAP_W as u32;
    if canvas.width() != width || canvas.height() != height {
        canvas.set_width(width);
        canvas.set_height(height);
    }
}

pub fn draw(m: &mut Match, now: f64) {
    fit(&m.view.canvas);
    let s = scale(&m.view.canvas);
    let own = m.own_position();
    let ctx = m.view.ctx.clone();
    draw_map(&ctx, s);
    if let Some((x, y, true)) = own {
        m.fog.update(x as i32, y as i32);
        draw_fog(&ctx, s, &m.fog);
    }
    let render_tick = m.render_tick(now);
    let mut drawn = Vec::new();
    let mut dry = false;
    if let Some((a, b, t, ran_dry)) = m.interpolation_pair(render_tick) {
        dry = ran_dry;
        for seen in &b.view.others {
            let (x, y) = a
                .view
                .others
                .iter()
                .find(|o| o.seat == seen.seat)
                .map_or((f64::from(seen.x), f64::from(seen.y)), |from| {
                    (lerp(from.x, seen.x, t), lerp(from.y, seen.y, t))
                });
            let name =
                m.joined.as_ref().and_then(|st| st.players.get(usize::from(seen.seat))).map_or("", String::as_str);
            let aim = (f64::from(seen.aim_x) / 127.0, f64::from(seen.aim_y) / 127.0);
            draw_player(&ctx, s, x, y, aim, seen.seat, name, seen.hp, false);
            drawn.push((seen.seat, x, y));
        }
    }
    if !m.snapshots.is_empty() {
        m.interp.frame(dry, &drawn, f64::from(TILE));
    }
    let estimated = m.estimated_tick(now);
    if let Some(latest) = m.snapshots.back() {
        // Bullets fly straight: drawn where they are now, from the newest snapshot.
        let ahead = (estimated - f64::from(latest.tick)).clamp(0.0, 3.0);
        ctx.set_fill_style_str("#fff3b0");
        for b in &latest.view.bullets {
            let x = f64::from(b.x) + f64::from(b.vx) * ahead;
            let y = f64::from(b.y) + f64::from(b.vy) * ahead;
            ctx.begin_path();
            let _ = ctx.arc(x * s, y * s, (f64::from(TILE) * 0.09 * s).max(2.0), 0.0, TAU);
            ctx.fill();
        }
    }
    let me = m.snapshots.back().map(|l| l.view.me);
    if let (Some((x, y, alive)), Some(seat), Some(me)) = (own, m.joined.as_ref(), me)
        && alive
    {
        let aim = m.controls.mouse_world.map_or((1.0, 0.0), |(mx, my)| {
            let (dx, dy) = (mx - x, my - y);
            let len = (dx * dx + dy * dy).sqrt().max(1.0);
            (dx / len, dy / len)
        });
        draw_player(&ctx, s, x, y, aim, seat.seat, "you", me.hp, true);
    }
    draw_hud(m, &ctx, s);
    if m.net.shown {
        let text = m.net_text(now);
        m.view.net_graph.set_text_content(Some(&text));
    }
}

fn lerp(a: u16, b: u16, t: f64) -> f64 {
    f64::from(a) + (f64::from(b) - f64::from(a)) * t
}

fn draw_map(ctx: &CanvasRenderingContext2d, s: f64) {
    let (w, h) = (f64::from(MAP_W * TILE) * s, f64::from(MAP_H * TILE) * s);
    ctx.set_fill_style_str(FLOOR);
    ctx.fill_rect(0.0, 0.0, w, h);
    let t = f64::from(TILE) * s;
    ctx.set_stroke_style_str(GRID);
    ctx.set_line_width(1.0);
    ctx.begin_path();
    for tx in 0..=MAP_W {
        ctx.move_to(f64::from(tx) * t, 0.0);
        ctx.line_to(f64::from(tx) * t, h);
    }
    for ty in 0..=MAP_H {
        ctx.move_to(0.0, f64::from(ty) * t);
        ctx.line_to(w, f64::from(ty) * t);
    }
    ctx.stroke();
    for ty in 0..MAP_H {
        for tx in 0..MAP_W {
            if is_wall(tx, ty) {
                ctx.set_fill_style_str(WALL);
                ctx.fill_rect(f64::from(tx) * t, f64::from(ty) * t, t + 0.5, t + 0.5);
                ctx.set_fill_style_str(WALL_EDGE);
                ctx.fill_rect(f64::from(tx) * t, f64::from(ty) * t, t + 0.5, (t * 0.12).max(1.0));
            }
        }
    }
}

fn draw_fog(ctx: &CanvasRenderingContext2d, s: f64, fog: &Fog) {
    let t = f64::from(TILE) * s;
    ctx.set_fill_style_str(FOG);
    for ty in 0..MAP_H {
        for tx in 0..MAP_W {
            if !fog.sees(tx, ty) {
                ctx.fill_rect(f64::from(tx) * t, f64::from(ty) * t, t + 0.5, t + 0.5);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn draw_player(
    ctx: &CanvasRenderingContext2d,
    s: f64,
    x: f64,
    y: f64,
    aim: (f64, f64),
    seat: u8,
    name: &str,
    hp: u8,
    me: bool,
) {
    let (px, py, r) = (x * s, y * s, f64::from(PLAYER_HALF) * s * 1.15);
    let colour = COLOURS[usize::from(seat) % COLOURS.len()];
    // Gun
    ctx.set_stroke_style_str(colour);
    ctx.set_line_width((r * 0.35).max(2.0));
    ctx.begin_path();
    ctx.move_to(px, py);
    ctx.line_to(px + aim.0 * r * 1.7, py + aim.1 * r * 1.7);
    ctx.stroke();
    // Body
    ctx.set_fill_style_str(colour);
    ctx.begin_path();
    let _ = ctx.arc(px, py, r, 0.0, TAU);
    ctx.fill();
    if me {
        ctx.set_stroke_style_str("#ffffff");
        ctx.set_line_width(2.0);
        ctx.stroke();
    }
    // Health and name
    let bar = r * 2.2;
    ctx.set_fill_style_str("rgba(0,0,0,0.5)");
    ctx.fill_rect(px - bar / 2.0, py - r - 9.0, bar, 4.0);
    ctx.set_fill_style_str(if hp > 40 { "#3ecf8e" } else { "#ff6b6b" });
    ctx.fill_rect(px - bar / 2.0, py - r - 9.0, bar * f64::from(hp) / 100.0, 4.0);
    ctx.set_fill_style_str("#e7eaf3");
    ctx.set_font("12px system-ui, sans-serif");
    ctx.set_text_align("center");
    let _ = ctx.fill_text(name, px, py - r - 13.0);
}

fn draw_hud(m: &Match, ctx: &CanvasRenderingContext2d, s: f64) {
    let Some(latest) = m.snapshots.back() else { return };
    let Some(seat) = &m.joined else { return };
    let width = f64::from(MAP_W * TILE) * s;
    ctx.set_font("bold 15px system-ui, sans-serif");
    // Time left
    let secs = latest.view.ticks_left / u32::from(seat.tick_hz.max(1));
    ctx.set_text_align("center");
    ctx.set_fill_style_str("#e7eaf3");
    let _ = ctx.fill_text(&format!("{}:{:02}", secs / 60, secs % 60), width / 2.0, 20.0);
    // Scoreboard, best first
    let mut order: Vec<usize> = (0..latest.view.scores.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(latest.view.scores[i]));
    ctx.set_text_align("right");
    ctx.set_font("13px system-ui, sans-serif");
    for (row, i) in order.iter().take(8).enumerate() {
        let name = seat.players.get(*i).map_or("?", String::as_str);
        ctx.set_fill_style_str(COLOURS[*i % COLOURS.len()]);
        let line = format!("{name}  {}", latest.view.scores[*i]);
        let _ = ctx.fill_text(&line, width - 12.0, 22.0 + 17.0 * row as f64);
    }
    // Own health, or the respawn count-down
    let me = latest.view.me;
    ctx.set_text_align("left");
    ctx.set_font("bold 15px system-ui, sans-serif");
    if me.respawn > 0 {
        ctx.set_fill_style_str("#ff6b6b");
        let secs = f64::from(me.respawn) / f64::from(seat.tick_hz.max(1));
        let _ = ctx.fill_text(&format!("You fell: back in {secs:.1} s"), 12.0, 22.0);
    } else {
        ctx.set_fill_style_str(if me.hp > 40 { "#3ecf8e" } else { "#ff6b6b" });
        let _ = ctx.fill_text(&format!("Health {}", me.hp), 12.0, 22.0);
    }
}
