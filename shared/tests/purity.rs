//! The shared crate stays pure: nothing it depends on, directly or not, does I/O or talks to a
//! runtime or a browser.
#![cfg(not(target_arch = "wasm32"))]

#[test]
fn shared_depends_on_no_runtime_and_no_browser_api() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args(["tree", "--offline", "-p", "rallypoint-shared", "-e", "normal", "--prefix", "none", "--format", "{p}"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(names.contains(&"bitcode"), "the tree was read: {names:?}");
    for forbidden in ["tokio", "mio", "web-sys", "js-sys", "wasm-bindgen", "getrandom", "rand"] {
        assert!(!names.contains(&forbidden), "shared depends on {forbidden}");
    }
}
