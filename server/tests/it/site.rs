//! Pages and forms: registration, login, logout, sessions, CSRF, throttling, HTTP limits.

use std::time::Duration;

use rallypoint_load::client::{ClientError, page_message};
use reqwest::StatusCode;
use reqwest::header::{RETRY_AFTER, SET_COOKIE};

use crate::support::{PASSWORD, TestServer, location};

fn refused(result: Result<(), ClientError>) -> (StatusCode, String) {
    match result {
        Err(ClientError::Refused { status, message, .. }) => (status, message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn register_signs_in_and_play_needs_a_session() {
    let server = TestServer::start().await;
    let anonymous = server.client();
    let response = anonymous.http().get(format!("{}/play", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/login");

    let csrf = anonymous.csrf("/register").await.unwrap();
    let form = [("username", "Alice"), ("password", PASSWORD), ("password_confirm", PASSWORD), ("csrf", &csrf)];
    let response = anonymous.http().post(format!("{}/register", server.base)).form(&form).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/play");
    let cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap())
        .find(|c| c.starts_with("rp_session="))
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax") && cookie.contains("Max-Age="), "{cookie}");
    assert!(!cookie.contains("Secure"), "plain http: no Secure attribute: {cookie}");
    let token = cookie.trim_start_matches("rp_session=").split(';').next().unwrap();
    assert!(token.len() >= 43, "at least 256 bits of base64: {token}");

    let play = anonymous.http().get(format!("{}/play", server.base)).send().await.unwrap();
    assert_eq!(play.status(), StatusCode::OK);
    let page = play.text().await.unwrap();
    assert!(page.contains("id=\"chat-log\"") && page.contains("/static/boot.js") && page.contains("Alice"));

    // The database keeps a hash of the token, never the token.
    let stored: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT token_hash FROM sessions").fetch_all(&server.running.app.db).await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].len(), 32);
    assert_ne!(stored[0], token.as_bytes());
    let hash: String =
        sqlx::query_scalar("SELECT password_hash FROM users").fetch_one(&server.running.app.db).await.unwrap();
    assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
}

#[tokio::test]
async fn rejected_registrations_explain_and_keep_the_username() {
    let server = TestServer::start().await;
    server.user("taken_name").await;
    let cases: &[(&str, &str, &str, StatusCode, &str)] = &[
        ("ab", PASSWORD, PASSWORD, StatusCode::UNPROCESSABLE_ENTITY, "3 to 24 characters"),
        ("a234567890123456789012345", PASSWORD, PASSWORD, StatusCode::UNPROCESSABLE_ENTITY, "3 to 24"),
        ("bad name!", PASSWORD, PASSWORD, StatusCode::UNPROCESSABLE_ENTITY, "letters, digits"),
        ("<script>", PASSWORD, PASSWORD, StatusCode::UNPROCESSABLE_ENTITY, "letters, digits"),
        ("shorty", "short", "short", StatusCode::UNPROCESSABLE_ENTITY, "8 to 128"),
        ("longpw", &"x".repeat(129), &"x".repeat(129), StatusCode::UNPROCESSABLE_ENTITY, "8 to 128"),
        ("mismatch", PASSWORD, "another password", StatusCode::UNPROCESSABLE_ENTITY, "differ"),
        ("TAKEN_name", PASSWORD, PASSWORD, StatusCode::CONFLICT, "taken"),
    ];
    for (name, pw, confirm, status, message) in cases {
        let client = server.client();
        let fields = [("username", *name), ("password", *pw), ("password_confirm", *confirm)];
        let response = client.post_form("/register", &fields).await.unwrap();
        assert_eq!(response.status(), *status, "{name}");
        let page = response.text().await.unwrap();
        assert!(page_message(&page).contains(message), "{name}: {}", page_message(&page));
        let escaped = name.replace('<', "&#60;").replace('>', "&#62;");
        assert!(page.contains(&format!("value=\"{escaped}\"")), "{name}: username kept (escaped)");
        assert!(!page.contains("<script>"), "no markup injected");
    }
    // Missing fields read as empty, with the same clear message.
    let client = server.client();
    let response = client.post_form("/register", &[]).await.unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn failed_logins_do_not_tell_whether_the_user_exists() {
    let server = TestServer::start().await;
    server.user("exists").await;
    let wrong_password = refused(server.client().login("exists", "not the password").await);
    let no_such_user = refused(server.client().login("nobody", "not the password").await);
    assert_eq!(wrong_password, no_such_user);
    assert_eq!(wrong_password.0, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong_password.1, "Wrong username or password.");
    // Case does not matter for the name, and the right password works.
    server.client().login("EXISTS", PASSWORD).await.unwrap();
}

/// Posts the login form as a browser at `address` (the server trusts `X-Forwarded-For` here).
async fn login_from(server: &TestServer, name: &str, password: &str, address: &str) -> reqwest::Response {
    let client = server.client();
    let csrf = client.csrf("/login").await.unwrap();
    client
        .http()
        .post(format!("{}/login", server.base))
        .header("x-forwarded-for", address)
        .form(&[("username", name), ("password", password), ("csrf", &csrf)])
        .send()
        .await
        .unwrap()
}

fn behind_proxy(c: &mut rallypoint_server::config::Config) {
    c.trust_forwarded_for = true;
}

#[tokio::test]
async fn failed_logins_are_throttled_per_account_and_address_and_per_address() {
    let server = TestServer::start_with(|c| {
        behind_proxy(c);
        c.limits.login_failures_per_account_address = 3;
        c.limits.login_failures_per_address = 5;
    })
    .await;
    server.user("victim").await;
    for _ in 0..3 {
        assert_eq!(
            login_from(&server, "victim", "wrong password", "10.1.0.1").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // That address is locked out of that account, even with the right password, with a Retry-After.
    let response = login_from(&server, "victim", PASSWORD, "10.1.0.1").await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = response.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=900).contains(&retry), "{retry}");
    assert!(page_message(&response.text().await.unwrap()).contains("Too many failed attempts"));

    // The address has two failures left across all accounts, then it is locked too.
    for name in ["x1", "x2"] {
        assert_eq!(login_from(&server, name, "wrong password", "10.1.0.1").await.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(login_from(&server, "x3", "wrong password", "10.1.0.1").await.status(), StatusCode::TOO_MANY_REQUESTS);
    // The real owner, elsewhere, is not locked out.
    assert_eq!(login_from(&server, "victim", PASSWORD, "10.2.0.1").await.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn parallel_guesses_cannot_outrun_the_throttle() {
    let server = TestServer::start_with(behind_proxy).await;
    server.user("target").await;
    // Sixty wrong guesses at once from one address: each counts when it starts, so only the
    // allowance (5) is checked against the password and the rest are refused unhashed.
    let guesses = (0..60).map(|_| login_from(&server, "target", "wrong password", "10.3.0.1"));
    let statuses: Vec<StatusCode> =
        futures_util::future::join_all(guesses).await.into_iter().map(|r| r.status()).collect();
    let checked = statuses.iter().filter(|&&s| s == StatusCode::UNAUTHORIZED).count();
    let refused = statuses.iter().filter(|&&s| s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((checked, refused), (5, 55), "{statuses:?}");
    // And the right password from that address no longer gets in.
    assert_eq!(login_from(&server, "target", PASSWORD, "10.3.0.1").await.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn an_attacker_with_many_addresses_slows_an_account_but_cannot_lock_its_owner_out() {
    let server = TestServer::start_with(|c| {
        behind_proxy(c);
        c.limits.login_failures_per_account = 4;
    })
    .await;
    server.user("popular").await;
    // The owner has played from home before.
    assert_eq!(login_from(&server, "popular", PASSWORD, "192.0.2.10").await.status(), StatusCode::SEE_OTHER);
    let mut statuses = Vec::new();
    for i in 0..30 {
        statuses.push(login_from(&server, "popular", "wrong password", &format!("10.4.{i}.1")).await.status());
    }
    // Four failures, then one attempt per pace (30 s): the rest are refused unhashed.
    let checked = statuses.iter().filter(|&&s| s == StatusCode::UNAUTHORIZED).count();
    assert_eq!(checked, 5, "{statuses:?}");
    let paced = login_from(&server, "popular", PASSWORD, "10.4.99.1").await;
    assert_eq!(paced.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = paced.headers()[RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "a pace, not a lock: {retry}");
    // From home, the owner gets straight in, however busy the attacker is.
    assert_eq!(login_from(&server, "popular", PASSWORD, "192.0.2.10").await.status(), StatusCode::SEE_OTHER);
}

async fn register_from(server: &TestServer, name: &str, address: &str) -> reqwest::Response {
    let client = server.client();
    let csrf = client.csrf("/register").await.unwrap();
    let form = [("username", name), ("password", PASSWORD), ("password_confirm", PASSWORD), ("csrf", &csrf)];
    let request = client.http().post(format!("{}/register", server.base)).header("x-forwarded-for", address);
    request.form(&form).send().await.unwrap()
}

#[tokio::test]
async fn registrations_are_throttled_per_address() {
    let server = TestServer::start_with(|c| {
        behind_proxy(c);
        c.limits.registrations_per_address = 2;
    })
    .await;
    for name in ["farm1", "farm2"] {
        assert_eq!(register_from(&server, name, "203.0.113.5").await.status(), StatusCode::SEE_OTHER);
    }
    let refused = register_from(&server, "farm3", "203.0.113.5").await;
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key(RETRY_AFTER));
    let message = page_message(&refused.text().await.unwrap());
    assert!(message.contains("Too many new accounts"), "{message}");
    // A form that cannot succeed costs nothing, and other addresses are not affected.
    assert_eq!(register_from(&server, "farm1", "203.0.113.6").await.status(), StatusCode::CONFLICT);
    assert_eq!(register_from(&server, "farm3", "203.0.113.6").await.status(), StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn logging_in_again_gives_a_new_session_and_ends_the_old() {
    let server = TestServer::start().await;
    let client = server.user("renew").await;
    let first = client.cookie_header().unwrap();
    client.login("renew", PASSWORD).await.unwrap();
    let second = client.cookie_header().unwrap();
    assert_ne!(first, second);
    let count: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM sessions").fetch_one(&server.running.app.db).await.unwrap();
    assert_eq!(count, 1, "the session held before login was ended");
}

#[tokio::test]
async fn logout_ends_the_session_on_the_server() {
    let server = TestServer::start().await;
    let client = server.user("leaver").await;
    let cookie = client.cookie_header().unwrap();
    client.logout().await.unwrap();
    // Replaying the old cookie gets nowhere.
    let replay = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let response = replay.get(format!("{}/play", server.base)).header("cookie", cookie).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/login");
}

#[tokio::test]
async fn every_post_form_needs_its_csrf_token_and_a_same_site_origin() {
    let server = TestServer::start().await;
    let client = server.user("csrf_user").await;
    let http = client.http();
    let token = client.csrf("/").await.unwrap();
    for path in ["/register", "/login", "/logout", "/account/end-other-sessions"] {
        let url = format!("{}{path}", server.base);
        let missing = http.post(&url).form(&[("username", "x")]).send().await.unwrap();
        assert_eq!(missing.status(), StatusCode::FORBIDDEN, "{path} without a token");
        let wrong = http.post(&url).form(&[("csrf", "A".repeat(43))]).send().await.unwrap();
        assert_eq!(wrong.status(), StatusCode::FORBIDDEN, "{path} with a wrong token");
        let cross =
            http.post(&url).header("origin", "http://evil.test").form(&[("csrf", &token)]).send().await.unwrap();
        assert_eq!(cross.status(), StatusCode::FORBIDDEN, "{path} from another site");
        let fetch_meta =
            http.post(&url).header("sec-fetch-site", "cross-site").form(&[("csrf", &token)]).send().await.unwrap();
        assert_eq!(fetch_meta.status(), StatusCode::FORBIDDEN, "{path} flagged cross-site");
    }
    // The session survived all of that.
    let play = http.get(format!("{}/play", server.base)).send().await.unwrap();
    assert_eq!(play.status(), StatusCode::OK);
    // A token from another browser does not match this browser's cookie.
    let other = server.client().csrf("/login").await.unwrap();
    let response = http.post(format!("{}/logout", server.base)).form(&[("csrf", other)]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn https_public_url_makes_cookies_secure_and_host_prefixed() {
    let server = TestServer::start_with(|c| {
        c.public_origin = Some("https://play.example.com".into());
        c.secure_cookies = true;
    })
    .await;
    let response = reqwest::get(format!("{}/login", server.base)).await.unwrap();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.starts_with("__Host-rp_csrf=") && cookie.contains("Secure") && cookie.contains("Path=/"),
        "{cookie}"
    );
}

#[tokio::test]
async fn logout_under_https_clears_the_host_prefixed_cookie_with_the_same_attributes() {
    let server = TestServer::start_with(|c| {
        c.public_origin = Some("https://play.example.com".into());
        c.secure_cookies = true;
    })
    .await;
    // The Secure CSRF cookie is not sent back over plain http by a cookie store: do it by hand.
    let login = reqwest::get(format!("{}/login", server.base)).await.unwrap();
    let csrf_cookie = login.headers()[SET_COOKIE].to_str().unwrap().split(';').next().unwrap().to_owned();
    let token = csrf_cookie.split_once('=').unwrap().1.to_owned();
    let response = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("{}/logout", server.base))
        .header("cookie", format!("{csrf_cookie}; __Host-rp_session=stale"))
        .form(&[("csrf", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cleared = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("__Host-rp_session="))
        .expect("a clearing session cookie");
    // A browser ignores a __Host- cookie without Secure and Path=/, and would keep the old one.
    for attribute in ["Secure", "Path=/", "HttpOnly", "Max-Age=0"] {
        assert!(cleared.contains(attribute), "{attribute} missing: {cleared}");
    }
}

#[tokio::test]
async fn sessions_expire() {
    let server = TestServer::start_with(|c| c.limits.session_ttl = Duration::ZERO).await;
    let client = server.user("shortlived").await;
    let response = client.http().get(format!("{}/play", server.base)).send().await.unwrap();
    assert_eq!(location(&response), "/login");
}

#[tokio::test]
async fn account_page_shows_sessions_and_ends_the_others() {
    let server = TestServer::start().await;
    let here = server.user("manysessions").await;
    let there = server.client();
    there.login("manysessions", PASSWORD).await.unwrap();
    let page = here.http().get(format!("{}/account", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("<dd>2</dd>"), "two sessions shown");
    let mut hub_there = there.hub().await.unwrap();
    let csrf = here.csrf("/account").await.unwrap();
    let response = here
        .http()
        .post(format!("{}/account/end-other-sessions", server.base))
        .form(&[("csrf", csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let closed = hub_there.recv_until(crate::support::SECOND * 5, |_| None::<()>).await;
    assert!(matches!(closed, Err(ClientError::Closed { code: 4001, .. })), "{closed:?}");
    let page = here.http().get(format!("{}/account", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("<dd>1</dd>"));
    // The ended session's cookie gets nowhere now.
    let response = there.http().get(format!("{}/play", server.base)).send().await.unwrap();
    assert_eq!(location(&response), "/login");
}

#[tokio::test]
async fn http_limits_and_errors() {
    let server = TestServer::start().await;
    let client = server.client();
    let http = client.http();
    // A body over the limit.
    let big = "username=".to_owned() + &"a".repeat(64 * 1024);
    let response = http
        .post(format!("{}/login", server.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // A body that is not a form.
    let response = http
        .post(format!("{}/login", server.base))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(page_message(&response.text().await.unwrap()).contains("could not be read"));
    // Unknown pages.
    let response = http.get(format!("{}/nope", server.base)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    // Security headers everywhere.
    let h = response.headers();
    assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    assert_eq!(h["x-content-type-options"], "nosniff");
}

#[tokio::test]
async fn a_slow_client_cannot_hold_a_connection_open_with_partial_headers() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let server = TestServer::start_with(|c| c.limits.http_header_timeout = Duration::from_millis(300)).await;
    let mut stream = tokio::net::TcpStream::connect(server.running.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closed the connection after its header timeout");
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed() {
    use tokio::io::AsyncReadExt as _;
    let server = TestServer::start_with(|c| c.max_connections = 2).await;
    let _a = tokio::net::TcpStream::connect(server.running.addr).await.unwrap();
    let _b = tokio::net::TcpStream::connect(server.running.addr).await.unwrap();
    let mut c = tokio::net::TcpStream::connect(server.running.addr).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "the third connection is closed at once");
}

#[tokio::test]
async fn a_busy_hashing_pool_answers_503_with_retry_after() {
    let server = TestServer::start_with(|c| {
        c.limits.hash_threads = 1;
        c.limits.hash_queue = 1;
    })
    .await;
    let attempts = (0..12).map(|i| {
        let client = server.client();
        async move {
            let fields = [("username", format!("storm{i}")), ("password", PASSWORD.into())];
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            client.post_form("/login", &fields).await.unwrap()
        }
    });
    let responses = futures_util::future::join_all(attempts).await;
    let busy: Vec<_> = responses.iter().filter(|r| r.status() == StatusCode::SERVICE_UNAVAILABLE).collect();
    assert!(!busy.is_empty(), "a queue of one cannot take twelve logins at once");
    assert!(busy.iter().all(|r| r.headers().contains_key(RETRY_AFTER)));
}

#[tokio::test]
async fn healthz_says_alive_and_readyz_says_whether_the_database_answers() {
    let server = TestServer::start().await;
    let status = |path: &'static str| {
        let base = server.base.clone();
        async move { reqwest::get(format!("{base}{path}")).await.unwrap().status() }
    };
    assert_eq!(status("/healthz").await, StatusCode::OK);
    assert_eq!(status("/readyz").await, StatusCode::OK);
    server.running.app.db.close().await;
    assert_eq!(status("/healthz").await, StatusCode::OK, "alive: not a reason to restart it");
    assert_eq!(status("/readyz").await, StatusCode::SERVICE_UNAVAILABLE, "but send no one to it");
    // A page that needs the database says it cannot be reached, and when to retry.
    let page = reqwest::get(format!("{}/leaderboard", server.base)).await.unwrap();
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.headers().contains_key(RETRY_AFTER));
    assert!(page_message(&page.text().await.unwrap()).contains("database cannot be reached"));
}

#[tokio::test]
async fn a_tie_for_first_is_a_draw_on_the_leaderboard_and_in_the_history() {
    use rallypoint_server::hub::results::{self, Finished, Source};
    use rallypoint_server::rooms::Seated;
    use shared::game::{EndReason, Outcome};
    let server = TestServer::start().await;
    let client = server.user("tie_a").await;
    server.user("tie_b").await;
    server.user("tie_c").await;
    let accounts = &server.running.app.accounts;
    let mut players = Vec::new();
    for name in ["tie_a", "tie_b", "tie_c"] {
        let user = accounts.user_by_name(name).await.unwrap().unwrap();
        players.push(Seated { user_id: user.id, name: user.name });
    }
    let db = &server.running.app.db;
    let room = "r0-1";
    let drawn = Outcome { ranks: vec![1, 1], scores: vec![3, 3], reason: EndReason::TimeLimit, ticks: 900 };
    let finished = Finished { room, mode: "duel", players: &players[..2], outcome: &drawn, source: Source::LOCAL };
    results::record(db, &finished).await.unwrap();
    let won = Outcome { ranks: vec![1, 2], scores: vec![5, 1], reason: EndReason::ScoreLimit, ticks: 600 };
    let pair = [players[0].clone(), players[2].clone()];
    results::record(db, &Finished { players: &pair, outcome: &won, ..finished }).await.unwrap();
    let standing = |name: &'static str| async move {
        let user = accounts.user_by_name(name).await.unwrap().unwrap();
        let rows = results::standings_of(db, user.id).await.unwrap();
        (rows[0].matches, rows[0].wins, rows[0].draws)
    };
    assert_eq!(standing("tie_a").await, (2, 1, 1));
    assert_eq!(standing("tie_b").await, (1, 0, 1), "a draw is not a win");
    assert_eq!(standing("tie_c").await, (1, 0, 0));
    let board = client.http().get(format!("{}/leaderboard?mode=duel", server.base)).send().await.unwrap();
    assert!(board.text().await.unwrap().contains("<th>Draws</th>"));
    let profile = client.http().get(format!("{}/u/tie_b", server.base)).send().await.unwrap();
    let page = profile.text().await.unwrap();
    assert!(page.contains("1st of 2 (tied with 1)"), "{page}");
    assert!(!page.contains("class=\"won\""), "a draw is not shown as won");
}

/// `/metrics` on its own listener, every series labelled with the instance's name, with what an
/// operator watches. (A process has one recorder, which every server of this test binary feeds:
/// the values here are everyone's, so only the series are checked.)
#[tokio::test]
async fn metrics_carry_the_instance_label_and_what_an_operator_watches() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = TestServer::start_with(move |c| {
        c.metrics_listen = Some(addr);
        c.instance = "hub-7".into();
    })
    .await;
    let ann = server.user("metric_ann").await;
    let _hub = ann.hub().await.unwrap();
    let _ = server.client().login("metric_ann", "wrong password").await;
    // A datagram at the WebRTC port: its loops' counters, registered when they start, count it.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.send_to(b"not WebRTC", server.running.app.hub.rtc().udp_addr()).unwrap();
    let series = [
        "rallypoint_players_online{instance=\"hub-7\"} ",
        "rallypoint_hub_connections{instance=\"hub-7\"} ",
        "rallypoint_rooms_running{instance=\"hub-7\"} ",
        "rallypoint_logins_total{instance=\"hub-7\",result=\"wrong\"} ",
        "rallypoint_webrtc_datagrams_in_total{instance=\"hub-7\"} ",
        "rallypoint_webrtc_recv_calls_total{instance=\"hub-7\"} ",
    ];
    let mut text = String::new();
    for _ in 0..50 {
        text = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
        if series.iter().all(|s| text.contains(s)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in series {
        assert!(text.contains(s), "{s} in\n{text}");
    }
    assert!(text.lines().filter(|l| l.starts_with("rallypoint_")).all(|l| l.contains("instance=\"hub-7\"")));
    // Not on the public port.
    let public = reqwest::get(format!("{}/metrics", server.base)).await.unwrap();
    assert_eq!(public.status(), StatusCode::NOT_FOUND);
}
