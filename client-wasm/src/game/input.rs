//! What the player is pressing, sampled once per tick into an [`ArenaInput`].

use shared::arena::ArenaInput;

/// Keys and mouse state.
#[derive(Debug, Default)]
pub struct Controls {
    buttons: u8,
    firing: bool,
    /// Mouse position in world units, once it has moved over the canvas.
    pub mouse_world: Option<(f64, f64)>,
}

impl Controls {
    /// The button a key code drives, if any (WASD and arrows).
    pub fn button_for(code: &str) -> Option<u8> {
        match code {
            "KeyW" | "ArrowUp" => Some(ArenaInput::UP),
            "KeyS" | "ArrowDown" => Some(ArenaInput::DOWN),
            "KeyA" | "ArrowLeft" => Some(ArenaInput::LEFT),
            "KeyD" | "ArrowRight" => Some(ArenaInput::RIGHT),
            "Space" => Some(ArenaInput::FIRE),
            _ => None,
        }
    }

    pub fn key(&mut self, button: u8, down: bool) {
        if down {
            self.buttons |= button;
        } else {
            self.buttons &= !button;
        }
    }

    pub fn fire(&mut self, down: bool) {
        self.firing = down;
    }

    /// Lets go of everything (the window lost focus).
    pub fn release_all(&mut self) {
        self.buttons = 0;
        self.firing = false;
    }

    /// This tick's input, aiming from the player at `(x, y)` towards the mouse.
    pub fn sample(&self, x: i32, y: i32) -> ArenaInput {
        let limit = f64::from(shared::arena::MAX_AIM);
        let (aim_x, aim_y) = self.mouse_world.map_or((1.0, 0.0), |(mx, my)| {
            ((mx - f64::from(x)).clamp(-limit, limit), (my - f64::from(y)).clamp(-limit, limit))
        });
        let fire = if self.firing { ArenaInput::FIRE } else { 0 };
        ArenaInput { buttons: self.buttons | fire, aim_x: aim_x as i16, aim_y: aim_y as i16 }
    }
}
