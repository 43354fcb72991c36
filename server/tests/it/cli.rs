//! The `rallypoint` binary's start-up: bad flags, a port in use, an unwritable database, a
//! missing client build. Each gives one clear line and a non-zero exit status.

use std::process::{Command, Output};

fn rallypoint(args: &[&str], static_dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rallypoint"))
        .args(args)
        .env("RALLYPOINT_STATIC_DIR", static_dir)
        .env_remove("RALLYPOINT_LISTEN")
        .env_remove("RALLYPOINT_DATABASE_URL")
        .output()
        .unwrap()
}

/// A folder that looks like a built client.
fn static_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(rallypoint_server::config::CLIENT_JS), "").unwrap();
    dir
}

fn one_error_line(output: &Output) -> String {
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    errors[0].to_owned()
}

#[test]
fn a_port_in_use_is_one_clear_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = static_dir();
    let db = format!("sqlite://{}", dir.path().join("rp.db").display());
    let output = rallypoint(&["serve", "--listen", &addr, "--database-url", &db], dir.path());
    let line = one_error_line(&output);
    assert!(line.contains(&format!("cannot listen on {addr}")) && line.contains("--listen"), "{line}");
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn a_udp_port_in_use_is_one_clear_line() {
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = static_dir();
    let db = format!("sqlite://{}", dir.path().join("rp.db").display());
    let output =
        rallypoint(&["serve", "--listen", "127.0.0.1:0", "--webrtc-listen", &addr, "--database-url", &db], dir.path());
    let line = one_error_line(&output);
    assert!(line.contains(&format!("UDP {addr}")) && line.contains("--webrtc-listen"), "{line}");
}

#[test]
fn an_unwritable_database_path_is_one_clear_line() {
    let dir = static_dir();
    let output = rallypoint(
        &["serve", "--listen", "127.0.0.1:0", "--database-url", "sqlite:///proc/rallypoint/rp.db"],
        dir.path(),
    );
    let line = one_error_line(&output);
    assert!(line.contains("/proc/rallypoint"), "{line}");
}

#[test]
fn bad_flags_and_values_are_refused() {
    let dir = static_dir();
    for (args, needle) in [
        (&["serve", "--listen", "nonsense"][..], "--listen"),
        (&["serve", "--bogus"][..], "--bogus"),
        (&["serve", "--public-url", "ftp://x"][..], "--public-url"),
        (&["serve", "--database-url", "mysql://x"][..], "--database-url"),
        (&["serve", "--max-connections", "0"][..], "--max-connections"),
        (&["serve", "--log", "info,[["][..], "--log"),
        (&["serve", "--ice-servers", "http://stun.example.org"][..], "--ice-servers"),
        (&["serve", "--ice-servers", "turn:turn.example.org:3478"][..], "--ice-servers"),
        (&["serve", "--public-ip", "not-an-ip"][..], "--public-ip"),
        (&["serve", "--webrtc-listen", "nowhere"][..], "--webrtc-listen"),
        (&["serve", "--max-peers", "0"][..], "--max-peers"),
        (&["serve", "--webrtc-loops", "100000"][..], "--webrtc-loops"),
        (&["serve", "--webrtc-loops", "many"][..], "--webrtc-loops"),
        (&["serve", "--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"][..], "--tls-cert"),
        (&["bots", "--loss", "2"][..], "--loss"),
        (&["bots", "--latency-ms", "100000"][..], "--latency-ms"),
        (&["bots", "--transport", "ws", "--latency-ms", "50"][..], "--latency-ms"),
    ] {
        let output = rallypoint(args, dir.path());
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.lines().next().is_some_and(|l| l.starts_with("error:") && l.contains(needle)),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn a_tls_key_that_is_not_a_key_is_one_clear_line() {
    let dir = static_dir();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a pem file").unwrap();
    let junk = junk.display().to_string();
    let output = rallypoint(&["serve", "--listen", "127.0.0.1:0", "--tls-cert", &junk, "--tls-key", &junk], dir.path());
    let line = one_error_line(&output);
    assert!(line.contains("--tls-cert") && line.contains("junk.pem") && line.contains("no PEM certificate"), "{line}");
    let alone = rallypoint(&["serve", "--tls-cert", &junk], dir.path());
    assert!(!alone.status.success() && String::from_utf8_lossy(&alone.stderr).contains("--tls-key <FILE>"));
}

#[test]
fn a_missing_client_build_says_what_to_run() {
    let empty = tempfile::tempdir().unwrap();
    let output = rallypoint(&["serve", "--listen", "127.0.0.1:0"], empty.path());
    let line = one_error_line(&output);
    assert!(line.contains("cargo xtask run"), "{line}");
}

#[test]
fn help_explains_every_flag_and_its_variable() {
    let output = rallypoint(&["serve", "--help"], std::path::Path::new("."));
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "--static-dir",
        "--public-url",
        "--trust-forwarded-for",
        "--webrtc-listen",
        "--public-ip",
        "--ice-servers",
        "--tls-cert",
        "--tls-key",
    ] {
        assert!(help.contains(flag), "{flag}");
    }
    for var in [
        "RALLYPOINT_LISTEN",
        "RALLYPOINT_DATABASE_URL",
        "RALLYPOINT_STATIC_DIR",
        "RALLYPOINT_PUBLIC_URL",
        "RALLYPOINT_WEBRTC_LISTEN",
        "RALLYPOINT_PUBLIC_IP",
        "RALLYPOINT_ICE_SERVERS",
        "RALLYPOINT_TLS_CERT",
        "RALLYPOINT_TLS_KEY",
    ] {
        assert!(help.contains(var), "{var}");
    }
}

#[test]
fn room_server_help_explains_every_flag_and_bad_values_are_one_clear_line() {
    let output = rallypoint(&["room-server", "--help"], std::path::Path::new("."));
    let help = String::from_utf8_lossy(&output.stdout);
    for (flag, var) in [
        ("--hub", "RALLYPOINT_HUB"),
        ("--token", "RALLYPOINT_ROOM_SERVER_TOKEN"),
        ("--listen", "RALLYPOINT_LISTEN"),
        ("--public-url", "RALLYPOINT_PUBLIC_URL"),
        ("--capacity", "RALLYPOINT_CAPACITY"),
        ("--webrtc-listen", "RALLYPOINT_WEBRTC_LISTEN"),
        ("--public-ip", "RALLYPOINT_PUBLIC_IP"),
        ("--data-dir", "RALLYPOINT_DATA_DIR"),
        ("--drain-timeout", "RALLYPOINT_DRAIN_TIMEOUT"),
        ("--nats-url", "RALLYPOINT_NATS_URL"),
    ] {
        assert!(help.contains(flag) && help.contains(var), "{flag} {var}");
    }
    let dir = static_dir();
    let base = ["room-server", "--token", "rpt_x", "--data-dir", "/nonexistent/never"];
    for (args, expected) in [
        (vec!["--hub", "ftp://x", "--public-url", "http://a:1"], "--hub"),
        (vec!["--hub", "http://127.0.0.1:1", "--public-url", "nope"], "--public-url"),
        (vec!["--hub", "http://127.0.0.1:1", "--public-url", "http://a:1", "--capacity", "0"], "--capacity"),
        (vec!["--hub", "http://127.0.0.1:1", "--public-url", "http://a:1", "--nats-url", "nats://a b"], "--nats-url"),
    ] {
        let all: Vec<&str> = base.iter().copied().chain(args).collect();
        let line = one_error_line(&rallypoint(&all, dir.path()));
        assert!(line.contains(expected), "{line}");
    }
    // A NATS server nobody runs: one line that says which.
    let data = dir.path().join("rs").display().to_string();
    let unreachable = [
        "room-server",
        "--token",
        "rpt_x",
        "--data-dir",
        &data,
        "--listen",
        "127.0.0.1:0",
        "--hub",
        "http://127.0.0.1:1",
        "--public-url",
        "http://a:1",
        "--nats-url",
        "nats://127.0.0.1:1",
    ];
    let line = one_error_line(&rallypoint(&unreachable, dir.path()));
    assert!(line.contains("cannot reach NATS at nats://127.0.0.1:1"), "{line}");
    let output = rallypoint(&["serve", "--local-rooms", "maybe"], dir.path());
    assert!(String::from_utf8_lossy(&output.stderr).contains("\"maybe\" is neither on nor off"));
    let help = rallypoint(&["serve", "--help"], dir.path());
    assert!(String::from_utf8_lossy(&help.stdout).contains("--local-rooms <on|off>"));
}

#[test]
fn room_tokens_are_created_listed_and_revoked_from_the_command_line() {
    let dir = static_dir();
    let db = format!("sqlite://{}", dir.path().join("t.db").display());
    let created = rallypoint(&["room-token", "create", "--name", "eu-1", "--database-url", &db], dir.path());
    assert!(created.status.success());
    let token = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    assert!(token.starts_with("rpt_") && token.len() > 40, "{token}");
    let again = rallypoint(&["room-token", "create", "--name", "eu-1", "--database-url", &db], dir.path());
    assert!(one_error_line(&again).contains("already has a token"));
    let bad = rallypoint(&["room-token", "create", "--name", "EU 1", "--database-url", &db], dir.path());
    assert!(one_error_line(&bad).contains("name"));
    let community =
        rallypoint(&["room-token", "create", "--name", "club", "--community", "--database-url", &db], dir.path());
    assert!(community.status.success());
    let revoked = rallypoint(&["room-token", "revoke", "eu-1", "--database-url", &db], dir.path());
    assert!(revoked.status.success());
    let list = rallypoint(&["room-token", "list", "--database-url", &db], dir.path());
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("club\tcommunity\tactive") && list.contains("eu-1\tofficial\trevoked"), "{list}");
    assert!(!list.contains(&token), "a token is never shown again");
    let missing = rallypoint(&["room-token", "revoke", "nobody", "--database-url", &db], dir.path());
    assert!(one_error_line(&missing).contains("no room server"));
}

#[test]
fn bots_exit_non_zero_on_errors() {
    let dir = static_dir();
    let output = rallypoint(&["bots", "--server", "http://127.0.0.1:1", "--count", "1", "--duration", "1"], dir.path());
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("1 protocol errors"), "{stdout}");
}

/// An operator moves a SQLite deployment to PostgreSQL: `migrate`, `export`, `import`, and the
/// room servers' tokens (like everything else) are there; a second import is refused.
#[test]
fn a_deployment_moves_to_postgres_from_the_command_line() {
    let dir = static_dir();
    let sqlite = format!("sqlite://{}", dir.path().join("t.db").display());
    let created = rallypoint(&["room-token", "create", "--name", "eu-1", "--database-url", &sqlite], dir.path());
    assert!(created.status.success());
    let postgres = rallypoint_load::services::fresh_postgres_database("cli").unwrap();
    let migrated = rallypoint(&["migrate", "--database-url", &postgres], dir.path());
    assert!(String::from_utf8_lossy(&migrated.stdout).contains("schema version 4"), "{migrated:?}");
    let dump = dir.path().join("dump.jsonl");
    let dump = dump.to_str().unwrap();
    let exported = rallypoint(&["export", "--database-url", &sqlite, "--file", dump], dir.path());
    assert!(String::from_utf8_lossy(&exported.stderr).contains("1 room_servers"), "{exported:?}");
    let imported = rallypoint(&["import", "--database-url", &postgres, "--file", dump], dir.path());
    assert!(String::from_utf8_lossy(&imported.stderr).contains("1 room_servers"), "{imported:?}");
    let list = rallypoint(&["room-token", "list", "--database-url", &postgres], dir.path());
    assert!(String::from_utf8_lossy(&list.stdout).contains("eu-1\tofficial\tactive"), "{list:?}");
    let again = rallypoint(&["import", "--database-url", &postgres, "--file", dump], dir.path());
    assert!(one_error_line(&again).contains("import only into an empty one"));
    let unwritable = rallypoint(&["export", "--database-url", &sqlite, "--file", "/proc/x/dump"], dir.path());
    assert!(one_error_line(&unwritable).contains("cannot write /proc/x/dump"));
    let missing = rallypoint(&["import", "--database-url", &postgres, "--file", "/nonexistent"], dir.path());
    assert!(one_error_line(&missing).contains("cannot open /nonexistent"));
    let unsupported = rallypoint(&["migrate", "--database-url", "mysql://x"], dir.path());
    assert!(one_error_line(&unsupported).contains("use sqlite://PATH or postgres://"));
}

/// A cluster needs a shared database: NATS with SQLite is refused, as is a URL that is not NATS.
#[test]
fn a_cluster_on_sqlite_or_a_bad_nats_url_is_one_clear_line() {
    let dir = static_dir();
    let sqlite = format!("sqlite://{}", dir.path().join("rp.db").display());
    let output = rallypoint(&["serve", "--database-url", &sqlite, "--nats-url", "nats://127.0.0.1:4222"], dir.path());
    let line = one_error_line(&output);
    assert!(line.contains("SQLite database belongs to one instance") && line.contains("postgres://"), "{line}");
    let output = rallypoint(
        &["serve", "--database-url", "postgres://u@127.0.0.1:1/x", "--nats-url", "http://127.0.0.1:4222"],
        dir.path(),
    );
    assert!(one_error_line(&output).contains("is not a NATS URL"));
    let help = rallypoint(&["serve", "--help"], dir.path());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("RALLYPOINT_NATS_URL") && help.contains("RALLYPOINT_INSTANCE"), "{help}");
}
