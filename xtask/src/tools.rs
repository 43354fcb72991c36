//! Installs what a fresh machine lacks, each once, saying what and why:
//! the wasm32 target, Trunk 0.21, wasm-bindgen-cli at exactly Cargo.lock's version, and, for the
//! browser tests, Debian's Chromium and ChromeDriver, and PostgreSQL 15 and the NATS server for the
//! database and cluster tests.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{sh, step};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Debian's PostgreSQL 15 server (the tests start their own on a free port, as `load::services`).
const POSTGRES: &str = "/usr/lib/postgresql/15/bin/postgres";
/// Debian's NATS server (the cluster tests start their own, as `load::services`).
const NATS_SERVER: &str = "/usr/sbin/nats-server";
/// Debian's Caddy, the load balancer of `cargo xtask cluster`.
const CADDY: &str = "/usr/bin/caddy";
const WASM_TARGET: &str = "wasm32-unknown-unknown";
const TRUNK_SERIES: &str = "0.21";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Enough to build the client.
    Build,
    /// Also what the tests run against: a browser, Node and PostgreSQL.
    Browser,
}

pub fn ensure(need: Need) -> Result<()> {
    ensure_wasm_target()?;
    ensure_trunk()?;
    ensure_wasm_bindgen()?;
    if need == Need::Browser {
        ensure_test_packages()?;
    }
    Ok(())
}

/// Where `cargo install` puts binaries.
fn cargo_bin() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default()
        .join("bin")
}

/// A command for an installed tool, with cargo's bin folder on PATH (Trunk looks up
/// wasm-bindgen there).
pub fn command(tool: &str) -> Result<Command> {
    let program = which(tool).unwrap_or_else(|| cargo_bin().join(tool));
    let mut cmd = Command::new(program);
    cmd.env("PATH", path_with_cargo_bin()?);
    Ok(cmd)
}

/// PATH with cargo's bin folder first, where the tools above are installed.
pub fn path_with_cargo_bin() -> Result<std::ffi::OsString> {
    let mut paths = vec![cargo_bin()];
    paths.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));
    Ok(std::env::join_paths(paths)?)
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain([cargo_bin()]).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// The first line a tool prints for `--version`, if it runs.
fn version_of(tool: &str) -> Option<String> {
    let out = command(tool).ok()?.arg("--version").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_owned())
}

fn ensure_wasm_target() -> Result<()> {
    let out = Command::new("rustup").args(["target", "list", "--installed"]).output();
    let installed = out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == WASM_TARGET));
    if !installed {
        step("Installing the Rust target wasm32-unknown-unknown (the browser client compiles to WebAssembly)");
        sh(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
    }
    Ok(())
}

/// `cargo install` with a profile tuned for a quick build: these are build tools, whose own
/// speed hardly matters, and the default fat-LTO release build takes ~3x longer on 2 cores.
fn cargo_install(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.arg("install")
        .args(args)
        .env("CARGO_PROFILE_RELEASE_LTO", "off")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1");
    sh(&mut cmd)
}

/// cargo-fuzz, for `cargo xtask fuzz` only (libFuzzer on stable with `RUSTC_BOOTSTRAP=1`).
pub fn ensure_cargo_fuzz() -> Result<()> {
    if version_of("cargo-fuzz").is_none() {
        step("Installing cargo-fuzz (it drives libFuzzer over the decoders). One time only; about 2 minutes");
        cargo_install(&["--locked", "cargo-fuzz"])?;
    }
    Ok(())
}

fn ensure_trunk() -> Result<()> {
    match version_of("trunk") {
        Some(v) if v.starts_with(&format!("trunk {TRUNK_SERIES}.")) => return Ok(()),
        Some(v) => step(&format!(
            "Installing Trunk {TRUNK_SERIES} (found {v}; this project's Trunk.toml is for {TRUNK_SERIES})"
        )),
        None => step(&format!(
            "Installing Trunk {TRUNK_SERIES} (it builds and bundles the wasm client). One time only; about 4 minutes on 2 cores"
        )),
    }
    cargo_install(&["--locked", "trunk", "--version", &format!("^{TRUNK_SERIES}")])
}

/// The wasm-bindgen version in Cargo.lock: the CLI must match the crate exactly.
fn locked_wasm_bindgen() -> Result<String> {
    let lock = std::fs::read_to_string("Cargo.lock").context("cannot read Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"wasm-bindgen\""
            && let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \""))
        {
            return Ok(v.trim_end_matches('"').to_owned());
        }
    }
    bail!("Cargo.lock names no wasm-bindgen version")
}

fn ensure_wasm_bindgen() -> Result<()> {
    let want = locked_wasm_bindgen()?;
    match version_of("wasm-bindgen") {
        Some(v) if v == format!("wasm-bindgen {want}") => return Ok(()),
        Some(v) => step(&format!(
            "Installing wasm-bindgen-cli {want} (found {v}; it must equal the wasm-bindgen crate in Cargo.lock)"
        )),
        None => step(&format!(
            "Installing wasm-bindgen-cli {want} (Trunk uses it to generate the client's JS glue). One time only; about 2 minutes"
        )),
    }
    // Not --locked: the CLI's own lockfile names a webpki-roots release the registry no longer
    // serves.
    cargo_install(&["wasm-bindgen-cli", "--version", &format!("={want}")])
}

/// A Debian package the tests or the cluster need: the file that shows it is installed, and
/// why it is needed.
struct Package {
    file: &'static str,
    name: &'static str,
    why: &'static str,
}

const POSTGRES_15: Package =
    Package { file: POSTGRES, name: "postgresql-15", why: "every database test runs on SQLite and on PostgreSQL" };
const NATS: Package =
    Package { file: NATS_SERVER, name: "nats-server", why: "the cluster tests run instances on a real NATS bus" };
const CADDY_LB: Package =
    Package { file: CADDY, name: "caddy", why: "a browser test plays through a load balancer in front of two hubs" };

/// The names of those of `packages` that are missing, each announced with why it is needed.
fn missing(packages: &[&Package]) -> Vec<&'static str> {
    let missing: Vec<&Package> = packages.iter().copied().filter(|p| !PathBuf::from(p.file).is_file()).collect();
    for p in &missing {
        step(&format!("Installing Debian's {} ({})", p.name, p.why));
    }
    missing.iter().map(|p| p.name).collect()
}

/// PostgreSQL and NATS (and Caddy, the load balancer of `cargo xtask cluster`).
pub fn ensure_cluster_packages(caddy: bool) -> Result<()> {
    let wanted: &[&Package] = if caddy { &[&POSTGRES_15, &NATS, &CADDY_LB] } else { &[&POSTGRES_15, &NATS] };
    let packages = missing(wanted);
    if packages.is_empty() {
        return Ok(());
    }
    apt_install(&packages)
}

fn ensure_test_packages() -> Result<()> {
    let mut packages = Vec::new();
    if !(PathBuf::from(CHROMIUM).is_file() && PathBuf::from(CHROMEDRIVER).is_file()) {
        step("Installing Debian's chromium and chromium-driver (the end-to-end tests drive a real headless browser)");
        packages.extend(["chromium", "chromium-driver"]);
    }
    packages.extend(missing(&[&POSTGRES_15, &NATS, &CADDY_LB]));
    if which("node").is_none() {
        step("Installing Debian's nodejs (the WebAssembly build of the simulation is tested under Node)");
        packages.push("nodejs");
    }
    if packages.is_empty() {
        return Ok(());
    }
    apt_install(&packages)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0"));
    let apt = |args: &[&str]| -> Command {
        let mut cmd = if root { Command::new("apt-get") } else { Command::new("sudo") };
        if !root {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    sh(&mut apt(&["update", "-q"]))?;
    sh(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(packages))
        .with_context(|| format!("could not install {}; install these Debian packages by hand", packages.join(" ")))?;
    Ok(())
}
