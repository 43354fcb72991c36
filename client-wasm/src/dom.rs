//! Small, typed helpers over `web-sys` for the few DOM operations the client needs.

use wasm_bindgen::{JsCast, JsValue};
use web_sys::{Document, Element, HtmlElement};

pub fn window() -> web_sys::Window {
    web_sys::window().expect("the client runs in a browser window")
}

pub fn document() -> Document {
    window().document().expect("a window has a document")
}

/// The element with this id, cast to `T`, if present.
pub fn by_id<T: JsCast>(id: &str) -> Option<T> {
    document().get_element_by_id(id).and_then(|e| e.dyn_into::<T>().ok())
}

/// A new element with a class and text content. Text is always set as text, never as HTML.
pub fn element(tag: &str, class: &str, text: &str) -> Result<HtmlElement, JsValue> {
    let el: HtmlElement = document().create_element(tag)?.unchecked_into();
    if !class.is_empty() {
        el.set_class_name(class);
    }
    el.set_text_content(Some(text));
    Ok(el)
}

/// Removes every child of `el`.
pub fn clear(el: &Element) {
    el.set_text_content(None);
}

/// The WebSocket URL for `path` on this page's host (`wss:` under https).
pub fn socket_url(path: &str) -> Result<String, JsValue> {
    let location = window().location();
    let scheme = if location.protocol()? == "https:" { "wss" } else { "ws" };
    Ok(format!("{scheme}://{}{path}", location.host()?))
}

/// Milliseconds on the page's monotonic clock.
pub fn now_ms() -> f64 {
    window().performance().map_or_else(js_sys::Date::now, |p| p.now())
}

/// Runs `f` after `ms` milliseconds.
pub fn later(ms: i32, f: impl FnOnce() + 'static) {
    let callback = wasm_bindgen::closure::Closure::once_into_js(f);
    let _ = window().set_timeout_with_callback_and_timeout_and_arguments_0(callback.unchecked_ref(), ms);
}
