//! `cargo xtask`: the project's build tool. It installs what a fresh machine lacks, builds the
//! wasm client with Trunk and the server with cargo, and runs, tests, packages or benchmarks.

mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command>

  run [ARGS…]      build everything and serve on http://127.0.0.1:8080 (ARGS go to `rallypoint serve`)
  test             run every test, real-browser tests included
  ci               formatting, lints (native and wasm), then `test`
  dist             write dist/: the release binary and its static files, ready to copy anywhere
  bench hub        benchmark the hub (connections, memory, chat fan-out, login storm)
  bench rooms      benchmark rooms (CPU per tick, players per core, bytes, input latency, jitter)
  bench webrtc     the same rooms over WebSocket and WebRTC (connect time, memory per peer, CPU, bytes)
  bench reconnect  bots whose room connections a relay cuts at random: how many take their seat back
  bench fleet      the same rooms all in one process, then on a room server: placement, seat time, split cost
  bench cluster    two hubs on PostgreSQL and NATS against one: chat across, placement, CPU, logins
  cluster          start a local cluster (PostgreSQL, NATS, two hubs behind Caddy, two room servers)
  soak [--minutes N] bots play, drop and return, sign out and in for N minutes (60): memory, files, results
  fuzz [SECS] [T…]  fuzz every decoder of network bytes (or targets T) for SECS seconds each (default 60)
  client           build only the wasm client into web/dist/
";

fn main() {
    if let Err(e) = run() {
        eprintln!("\nxtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let root = root();
    std::env::set_current_dir(&root).context("cannot enter the workspace folder")?;
    match command.as_str() {
        "run" => serve(&rest),
        "test" => test(),
        "ci" => ci(),
        "dist" => dist(),
        "bench" => bench(&rest),
        "fuzz" => fuzz(&rest),
        "soak" => {
            let mut args = vec!["soak".to_owned()];
            args.extend(rest);
            bench(&args)
        }
        "cluster" => cluster(),
        "client" => {
            tools::ensure(tools::Need::Build)?;
            build_client()
        }
        "" | "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n\n{USAGE}"),
    }
}

/// The workspace root: the folder above this crate.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Prints a step header, so that a long run shows where it is.
pub fn step(what: &str) {
    eprintln!("\n==> {what}");
}

/// Runs a command to completion, echoing it first; fails when it fails.
pub fn sh(cmd: &mut Command) -> Result<()> {
    eprintln!("$ {}", display(cmd));
    let status = cmd.status().with_context(|| format!("cannot start {}", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// `trunk build --release` into web/dist/, then brotli and gzip copies of every asset.
fn build_client() -> Result<()> {
    step("Building the wasm client with Trunk (web/ + client-wasm/ -> web/dist/)");
    sh(tools::command("trunk")?.args(["build", "--release"]))?;
    precompress(Path::new("web/dist"))
}

/// Writes `.br` and `.gz` next to each compressible file, which the server sends to browsers
/// that accept them.
fn precompress(dir: &Path) -> Result<()> {
    use std::io::Write as _;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let compressible =
            matches!(path.extension().and_then(|e| e.to_str()), Some("js" | "wasm" | "css" | "svg" | "html"));
        if !compressible {
            continue;
        }
        let data = std::fs::read(&path)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&data)?;
        std::fs::write(with_suffix(&path, "gz"), gz.finish()?)?;
        let mut br = Vec::new();
        let params = brotli::enc::BrotliEncoderParams { quality: 11, ..Default::default() };
        brotli::BrotliCompress(&mut data.as_slice(), &mut br, &params)?;
        std::fs::write(with_suffix(&path, "br"), br)?;
        if path.extension().is_some_and(|e| e == "wasm") {
            let gz_len = std::fs::metadata(with_suffix(&path, "gz"))?.len();
            let br_len = std::fs::metadata(with_suffix(&path, "br"))?.len();
            eprintln!(
                "    client: {} KB raw, {} KB gzip, {} KB brotli",
                data.len() / 1024,
                gz_len / 1024,
                br_len / 1024
            );
        }
    }
    Ok(())
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

fn build_server(release: bool) -> Result<PathBuf> {
    step(if release { "Building the server (release)" } else { "Building the server" });
    let mut cmd = cargo();
    cmd.args(["build", "-p", "rallypoint-server", "--bin", "rallypoint"]);
    if release {
        cmd.arg("--release");
    }
    sh(&mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }).join("rallypoint"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

fn serve(args: &[String]) -> Result<()> {
    tools::ensure(tools::Need::Build)?;
    build_client()?;
    let bin = build_server(true)?;
    step("Serving on http://127.0.0.1:8080 with the SQLite database ./data/rallypoint.db (Ctrl-C stops)");
    let mut cmd = Command::new(bin);
    cmd.args(["serve", "--static-dir", "web/dist"]).args(args);
    sh(&mut cmd)
}

fn test() -> Result<()> {
    tools::ensure(tools::Need::Browser)?;
    build_client()?;
    let bin = build_server(false)?;
    step("Running the tests (unit, integration, native clients, headless Chromium)");
    let mut cmd = cargo();
    cmd.args(["test", "--workspace", "--exclude", "rallypoint-client"])
        .env("RALLYPOINT_BIN", std::fs::canonicalize(&bin)?)
        .env("RALLYPOINT_STATIC_DIR", std::fs::canonicalize("web/dist")?)
        .env("CHROMEDRIVER", tools::CHROMEDRIVER)
        .env("CHROMIUM", tools::CHROMIUM);
    sh(&mut cmd)?;
    step("Running the server's integration tests again on PostgreSQL 15 (the unit tests ran on both)");
    let mut cmd = cargo();
    cmd.args(["test", "-p", "rallypoint-server", "--test", "it"]).env("RALLYPOINT_TEST_DATABASE", "postgres");
    sh(&mut cmd)?;
    step("The vendored crates' own tests, our patches' included (vendor/README.md)");
    sh(cargo().args(["test", "-p", "str0m-aws-lc-rs"]))?;
    for manifest in ["vendor/sctp-proto/Cargo.toml", "vendor/dimpl/Cargo.toml"] {
        sh(cargo().args(["test", "--locked", "--manifest-path", manifest, "--target-dir", "target/vendor"]))?;
    }
    step("Replaying the recorded input log in WebAssembly (Node): the hash must equal the native one");
    let mut cmd = cargo();
    cmd.args(["test", "-p", "rallypoint-shared", "--target", "wasm32-unknown-unknown", "--test", "golden"])
        .env("PATH", tools::path_with_cargo_bin()?)
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER", "wasm-bindgen-test-runner");
    sh(&mut cmd)
}

fn ci() -> Result<()> {
    step("Formatting");
    sh(cargo().args(["fmt", "--all", "--check"]))?;
    step("Lints (native)");
    sh(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "rallypoint-client",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    tools::ensure(tools::Need::Build)?;
    step("Lints (wasm client)");
    sh(cargo().args([
        "clippy",
        "-p",
        "rallypoint-client",
        "--target",
        "wasm32-unknown-unknown",
        "--",
        "-D",
        "warnings",
    ]))?;
    test()
}

fn dist() -> Result<()> {
    tools::ensure(tools::Need::Build)?;
    build_client()?;
    let bin = build_server(true)?;
    step("Writing dist/");
    let out = Path::new("dist");
    if out.exists() {
        std::fs::remove_dir_all(out).context("cannot clear dist/")?;
    }
    let static_dir = out.join("static");
    std::fs::create_dir_all(&static_dir)?;
    std::fs::copy(&bin, out.join("rallypoint")).context("cannot copy the binary")?;
    for entry in std::fs::read_dir("web/dist")? {
        let entry = entry?;
        if entry.file_type()?.is_file() && !entry.file_name().to_string_lossy().starts_with("index.html") {
            std::fs::copy(entry.path(), static_dir.join(entry.file_name()))?;
        }
    }
    eprintln!(
        "\ndist/ is ready: copy it anywhere and run `./rallypoint serve` inside it.\n\
         It serves http://127.0.0.1:8080 with the database ./data/rallypoint.db; see `./rallypoint serve --help`."
    );
    Ok(())
}

/// The fuzz targets: the files in `fuzz/fuzz_targets/` (one per decoder in
/// `rallypoint_server::fuzzing`).
fn fuzz_targets() -> Result<Vec<String>> {
    let mut targets: Vec<String> = std::fs::read_dir("fuzz/fuzz_targets")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(".rs").map(str::to_owned))
        .collect();
    targets.sort();
    Ok(targets)
}

/// Runs libFuzzer on each target for a while, growing its committed corpus in
/// `fuzz/corpus/<target>/`; a crash stops the run and leaves the input in `fuzz/artifacts/`.
fn fuzz(args: &[String]) -> Result<()> {
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(60);
    let named: Vec<String> = args.iter().skip_while(|a| a.parse::<u64>().is_ok()).cloned().collect();
    let all = fuzz_targets()?;
    for t in &named {
        if !all.contains(t) {
            bail!("no fuzz target {t:?}; the targets are {}", all.join(", "));
        }
    }
    let targets = if named.is_empty() { all } else { named };
    tools::ensure_cargo_fuzz()?;
    for target in &targets {
        let target = target.as_str();
        step(&format!("Fuzzing {target} for {seconds} s"));
        let corpus = format!("fuzz/corpus/{target}");
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = tools::command("cargo")?;
        // cargo-fuzz's sanitizer flags are nightly-only; stable takes them with RUSTC_BOOTSTRAP.
        cmd.env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "--fuzz-dir", "fuzz", target, &corpus, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args(["-max_len=8192", "-print_final_stats=1"]);
        sh(&mut cmd)?;
        // Keep the committed corpus small: only inputs that add coverage.
        let mut cmin = tools::command("cargo")?;
        cmin.env("RUSTC_BOOTSTRAP", "1").args(["fuzz", "cmin", "--fuzz-dir", "fuzz", target, &corpus]);
        sh(&mut cmin)?;
    }
    Ok(())
}

/// Builds everything, then runs a local cluster until Ctrl-C.
fn cluster() -> Result<()> {
    tools::ensure(tools::Need::Build)?;
    tools::ensure_cluster_packages(true)?;
    build_client()?;
    let bin = build_server(true)?;
    step(
        "Starting a local cluster: PostgreSQL, NATS, two hubs behind Caddy on http://127.0.0.1:8080, two room servers",
    );
    let mut cmd = Command::new(bin);
    cmd.args(["bench", "local-cluster", "--static-dir", "web/dist"]);
    sh(&mut cmd)
}

fn bench(args: &[String]) -> Result<()> {
    let Some(what) = args.first() else {
        bail!(
            "which benchmark? `cargo xtask bench hub`, `bench rooms`, `bench webrtc`, `bench reconnect` or `bench fleet`"
        )
    };
    if what == "cluster" {
        tools::ensure_cluster_packages(false)?;
    }
    let bin = build_server(true)?;
    step(&format!("Benchmark: {what} (server on core 0, load generators on core 1)"));
    // The benchmark pins the server it starts to core 0; its own clients run on core 1.
    let mut cmd = if Path::new("/usr/bin/taskset").exists() {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1"]).arg(bin);
        cmd
    } else {
        Command::new(bin)
    };
    cmd.arg("bench").args(args);
    sh(&mut cmd)
}
