//! The hub WebSocket: authentication, presence, chat, and every limit on a connection.

use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};

use rallypoint_load::client::{ClientError, Hub};
use shared::hub::{ClientMsg, ErrorCode, MAX_CLIENT_MESSAGE_BYTES, ServerMsg, close};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::{TestServer, expect_close};

const WAIT: Duration = Duration::from_secs(5);

/// The next presence change, skipping other messages.
async fn next_presence(hub: &mut Hub) -> (Vec<String>, Vec<i64>) {
    hub.recv_until(WAIT, |m| match m {
        ServerMsg::Presence { joined, left } => Some((joined.into_iter().map(|u| u.name).collect(), left)),
        _ => None,
    })
    .await
    .unwrap()
}

/// The HTTP status of a refused upgrade.
fn upgrade_status(result: Result<Hub, ClientError>) -> u16 {
    match result {
        Err(ClientError::Ws(tungstenite::Error::Http(response))) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|h| h.welcome)),
    }
}

#[tokio::test]
async fn the_upgrade_needs_a_session_and_a_same_site_origin() {
    let server = TestServer::start().await;
    let anonymous = server.client();
    assert_eq!(upgrade_status(anonymous.hub().await), 401);

    let user = server.user("origin_user").await;
    let mut request = user.hub_request().unwrap();
    request.headers_mut().insert("origin", "http://evil.test".parse().unwrap());
    assert_eq!(upgrade_status(Hub::open(request, None).await), 403);

    let mut request = user.hub_request().unwrap();
    request.headers_mut().insert("origin", server.base.parse().unwrap());
    let hub = Hub::open(request, None).await.unwrap();
    assert_eq!(hub.online_names(), ["origin_user"]);

    // A forged cookie is no session.
    let mut request = server.client().hub_url().as_str().into_client_request().unwrap();
    request.headers_mut().insert("cookie", "rp_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".parse().unwrap());
    assert_eq!(upgrade_status(Hub::open(request, None).await), 401);
}

#[tokio::test]
async fn presence_counts_each_user_once_and_follows_their_last_tab() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut alice_tab = alice.hub().await.unwrap();
    let mut bob_tab1 = bob.hub().await.unwrap();
    assert_eq!(bob_tab1.online_names(), ["alice", "bob"]);
    let ServerMsg::Welcome { me, lobby, .. } = &bob_tab1.welcome else { panic!() };
    let bob_tab1_id = me.id;
    assert_eq!(*lobby, 1);
    // Alice's own arrival may share a batch with bob's.
    let (joined, left) = next_presence(&mut alice_tab).await;
    assert!(joined.contains(&"bob".to_owned()) && left.is_empty(), "{joined:?} {left:?}");

    // A second tab of bob's: nobody hears of it, and he is listed once.
    let bob_tab2 = bob.hub().await.unwrap();
    assert_eq!(bob_tab2.online_names(), ["alice", "bob"]);
    bob_tab2.close().await;
    // Closing one of two tabs says nothing; closing the last says bob went offline.
    bob_tab1.send(&ClientMsg::Ping { id: 1 }).await.unwrap();
    bob_tab1.close().await;
    let bob_id = bob_tab1_id;
    assert_eq!(next_presence(&mut alice_tab).await, (vec![], vec![bob_id]));
    let stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!((stats.connections, stats.users_online), (1, 1));
}

#[tokio::test]
async fn chat_reaches_every_tab_as_plain_text() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let mut a = alice.hub().await.unwrap();
    let mut b1 = bob.hub().await.unwrap();
    let mut b2 = bob.hub().await.unwrap();
    let html = "<img src=x onerror=alert(1)> hi";
    a.send(&ClientMsg::Chat { text: format!("  {html}  ") }).await.unwrap();
    for tab in [&mut a, &mut b1, &mut b2] {
        let line = next_chat(tab).await;
        assert_eq!(line.from.name, "alice");
        assert_eq!(line.text, html, "kept verbatim (trimmed); the client shows it as text");
    }
}

#[tokio::test]
async fn chat_loses_invisible_and_reordering_characters() {
    let server = TestServer::start().await;
    let mut a = server.user("mallory").await.hub().await.unwrap();
    a.send(&ClientMsg::Chat { text: "free\u{202E}gpj.exe\u{200B} \u{7}now".into() }).await.unwrap();
    assert_eq!(next_chat(&mut a).await.text, "freegpj.exe now");
    // Nothing visible left: refused as empty.
    a.send(&ClientMsg::Chat { text: "\u{200B}\u{202E}\u{1b}".into() }).await.unwrap();
    let refused = a
        .recv_until(Duration::from_secs(10), |m| match m {
            ServerMsg::Error { code: ErrorCode::ChatLength, .. } => Some(()),
            _ => None,
        })
        .await;
    assert!(refused.is_ok());
}

async fn next_chat(hub: &mut Hub) -> shared::hub::ChatLine {
    hub.recv_until(WAIT, |m| match m {
        ServerMsg::Chat(line) => Some(line),
        _ => None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn newcomers_get_the_last_fifty_lines_even_after_a_restart() {
    let server = TestServer::start_with(|c| {
        c.limits.chat_burst = 100.0;
        c.limits.ws_message_burst = 100.0;
    })
    .await;
    let mut talker = server.user("talker").await.hub().await.unwrap();
    for i in 0..60 {
        talker.send(&ClientMsg::Chat { text: format!("line {i}") }).await.unwrap();
    }
    for i in 0..60 {
        assert_eq!(next_chat(&mut talker).await.text, format!("line {i}"));
    }
    let expected: Vec<String> = (10..60).map(|i| format!("line {i}")).collect();
    let fresh = server.user("fresh").await.hub().await.unwrap();
    assert_eq!(fresh.history.iter().map(|l| l.text.clone()).collect::<Vec<_>>(), expected);
    drop((talker, fresh));

    let dir = server.stop().await;
    let server = TestServer::start_in(dir, |_| {}).await;
    let stored: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chat_messages").fetch_one(&server.running.app.db).await.unwrap();
    assert_eq!(stored, 60, "every acknowledged line was written before the server stopped");
    let carol = server.user("carol").await.hub().await.unwrap();
    assert_eq!(carol.history.iter().map(|l| l.text.clone()).collect::<Vec<_>>(), expected);
    assert!(carol.history.iter().all(|l| l.from.name == "talker"));
}

#[tokio::test]
async fn a_full_lobby_opens_the_next_and_each_keeps_its_own_chat() {
    let server = TestServer::start_with(|c| c.limits.lobby_capacity = 2).await;
    let mut a = server.user("aaa").await.hub().await.unwrap();
    let b_user = server.user("bbb").await;
    let mut b = b_user.hub().await.unwrap();
    let mut c = server.user("ccc").await.hub().await.unwrap();
    let lobby = |hub: &Hub| match &hub.welcome {
        ServerMsg::Welcome { lobby, .. } => *lobby,
        _ => unreachable!(),
    };
    assert_eq!((lobby(&a), lobby(&b), lobby(&c)), (1, 1, 2));
    assert_eq!(c.online_names(), ["ccc"]);
    // A second tab of b's stays in b's lobby, full as it is.
    let b2 = b_user.hub().await.unwrap();
    assert_eq!(lobby(&b2), 1);
    assert_eq!(b2.online_names(), ["aaa", "bbb"]);
    c.send(&ClientMsg::Chat { text: "lobby two".into() }).await.unwrap();
    assert_eq!(next_chat(&mut c).await.text, "lobby two");
    a.send(&ClientMsg::Chat { text: "lobby one".into() }).await.unwrap();
    assert_eq!(next_chat(&mut b).await.text, "lobby one", "b hears lobby one only");
    assert_eq!(next_chat(&mut a).await.text, "lobby one");
    let stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!((stats.users_online, stats.lobbies), (3, 2));
}

#[tokio::test]
async fn a_crowd_arriving_at_once_is_announced_in_a_few_batches() {
    let server = TestServer::start().await;
    let mut watcher = server.user("watcher").await.hub().await.unwrap();
    // Accounts made beforehand (a hundred password hashes at once would measure the hashing
    // pool, not the hub): the crowd is their arrival.
    let db = &server.running.app.db;
    let day = Duration::from_hours(24);
    let tokens = rallypoint_server::accounts::seed_for_bench(db, "crowd", 100, "unused", day).await.unwrap();
    let clients: Vec<_> =
        tokens.iter().map(|t| rallypoint_load::client::Client::with_session(&server.base, t).unwrap()).collect();
    let hubs: Vec<Hub> = futures_util::future::join_all(clients.iter().map(rallypoint_load::client::Client::hub))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    let mut messages = 0;
    while seen.len() < 100 {
        let (joined, _) = next_presence(&mut watcher).await;
        assert!(joined.len() <= shared::hub::PRESENCE_CHUNK);
        seen.extend(joined);
        messages += 1;
    }
    assert!(messages < 100, "{messages} presence messages for 100 arrivals");
    // The last to arrive was told of everyone before it, in chunks.
    let most = hubs.iter().map(|h| h.online.len()).max().unwrap();
    assert_eq!(most, 101);
}

#[tokio::test]
async fn chat_is_rate_limited_per_user_and_capped_in_length() {
    let server = TestServer::start_with(|c| {
        c.limits.chat_burst = 3.0;
        c.limits.chat_per_second = 0.001;
    })
    .await;
    let user = server.user("chatty").await;
    let mut tab1 = user.hub().await.unwrap();
    let mut tab2 = user.hub().await.unwrap();
    let too_long = "x".repeat(shared::hub::MAX_CHAT_CHARS + 1);
    tab1.send(&ClientMsg::Chat { text: too_long }).await.unwrap();
    let reply = tab1.recv_timeout(WAIT).await.unwrap();
    assert!(matches!(reply, ServerMsg::Error { code: ErrorCode::ChatLength, .. }), "{reply:?}");
    tab1.send(&ClientMsg::Chat { text: "   ".into() }).await.unwrap();
    let reply = tab1.recv_timeout(WAIT).await.unwrap();
    assert!(matches!(reply, ServerMsg::Error { code: ErrorCode::ChatLength, .. }), "{reply:?}");
    // The burst of three is shared by both tabs of the user.
    tab1.send(&ClientMsg::Chat { text: "ok 1".into() }).await.unwrap();
    tab2.send(&ClientMsg::Chat { text: "ok 2".into() }).await.unwrap();
    tab1.send(&ClientMsg::Chat { text: "ok 3".into() }).await.unwrap();
    tab2.send(&ClientMsg::Chat { text: "one too many".into() }).await.unwrap();
    let refused = tab2
        .recv_until(WAIT, |m| match m {
            ServerMsg::Error { code, .. } => Some(code),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(refused, ErrorCode::RateLimited);
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let server = TestServer::start().await;
    let mut hub = server.user("big").await.hub().await.unwrap();
    let text = format!(r#"{{"type":"chat","text":"{}"}}"#, "x".repeat(MAX_CLIENT_MESSAGE_BYTES));
    hub.send_raw(Message::text(text)).await.unwrap();
    expect_close(&mut hub, close::TOO_BIG).await;
    // The server is unaffected.
    let other = server.user("other").await.hub().await.unwrap();
    assert_eq!(other.online_names(), ["other"]);
}

#[tokio::test]
async fn malformed_messages_get_errors_then_close_with_1008() {
    let server = TestServer::start().await;
    let mut hub = server.user("garbled").await.hub().await.unwrap();
    let strikes = server.running.app.config.limits.ws_malformed_strikes;
    let bad: [Message; 4] = [
        Message::text("not json"),
        Message::text(r#"{"type":"launch_missiles"}"#),
        Message::binary(vec![1, 2, 3]),
        Message::text(r#"{"type":"chat","text":["x"]}"#),
    ];
    for frame in bad.into_iter().take(strikes as usize - 1) {
        hub.send_raw(frame).await.unwrap();
        let reply = hub.recv_timeout(WAIT).await.unwrap();
        assert!(matches!(reply, ServerMsg::Error { code: ErrorCode::Malformed, .. }), "{reply:?}");
    }
    // A valid message in between is still served.
    hub.send(&ClientMsg::Ping { id: 9 }).await.unwrap();
    assert_eq!(hub.recv_timeout(WAIT).await.unwrap(), ServerMsg::Pong { id: 9 });
    // A second hello is an error, not a strike.
    hub.send(&ClientMsg::Hello { version: shared::hub::PROTOCOL_VERSION }).await.unwrap();
    let reply = hub.recv_timeout(WAIT).await.unwrap();
    assert!(matches!(reply, ServerMsg::Error { code: ErrorCode::Unexpected, .. }), "{reply:?}");
    hub.send_raw(Message::text("{")).await.unwrap();
    expect_close(&mut hub, close::POLICY).await;
}

#[tokio::test]
async fn another_protocol_version_is_told_to_reload() {
    let server = TestServer::start().await;
    let user = server.user("old_tab").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(user.hub_request().unwrap()).await.unwrap();
    socket.send(Message::text(r#"{"type":"hello","version":999}"#)).await.unwrap();
    let reload = socket.next().await.unwrap().unwrap();
    let reload: ServerMsg = serde_json::from_str(reload.to_text().unwrap()).unwrap();
    assert_eq!(reload, ServerMsg::Reload { version: shared::hub::PROTOCOL_VERSION });
    match socket.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), close::RELOAD),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_first_message_must_be_hello_and_come_in_time() {
    let server = TestServer::start_with(|c| c.limits.ws_hello_timeout = Duration::from_millis(200)).await;
    let user = server.user("silent").await;
    let (mut socket, _) = tokio_tungstenite::connect_async(user.hub_request().unwrap()).await.unwrap();
    match socket.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), close::POLICY),
        other => panic!("{other:?}"),
    }
    let (mut socket, _) = tokio_tungstenite::connect_async(user.hub_request().unwrap()).await.unwrap();
    socket.send(Message::text(r#"{"type":"chat","text":"hi"}"#)).await.unwrap();
    match socket.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), close::POLICY),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_message_flood_closes_with_1008() {
    let server = TestServer::start_with(|c| {
        c.limits.ws_message_burst = 10.0;
        c.limits.ws_messages_per_second = 0.001;
    })
    .await;
    let mut hub = server.user("flooder").await.hub().await.unwrap();
    for id in 0..20 {
        if hub.send(&ClientMsg::Ping { id }).await.is_err() {
            break;
        }
    }
    expect_close(&mut hub, close::POLICY).await;
}

#[tokio::test]
async fn logout_closes_that_sessions_sockets_only() {
    let server = TestServer::start().await;
    let laptop = server.user("twodevices").await;
    let phone = server.client();
    phone.login("twodevices", crate::support::PASSWORD).await.unwrap();
    let watcher = server.user("watcher").await;
    let mut laptop_tab = laptop.hub().await.unwrap();
    let mut phone_tab = phone.hub().await.unwrap();
    let mut watch = watcher.hub().await.unwrap();
    laptop.logout().await.unwrap();
    expect_close(&mut laptop_tab, close::SESSION_ENDED).await;
    // The phone's session lives on, so the user is still online.
    phone_tab.send(&ClientMsg::Ping { id: 3 }).await.unwrap();
    assert_eq!(phone_tab.recv_until(WAIT, |m| matches!(m, ServerMsg::Pong { .. }).then_some(())).await.ok(), Some(()));
    phone.logout().await.unwrap();
    expect_close(&mut phone_tab, close::SESSION_ENDED).await;
    let (_, left) = next_presence(&mut watch).await;
    assert_eq!(left.len(), 1, "the user went offline with their last session");
}

#[tokio::test]
async fn a_client_that_does_not_read_is_dropped_and_nobody_else_waits() {
    let server = TestServer::start_with(|c| {
        c.limits.ws_outbox = 8;
        c.limits.ws_write_timeout = Duration::from_millis(500);
        c.limits.chat_per_second = 100_000.0;
        c.limits.chat_burst = 100_000.0;
        c.limits.ws_messages_per_second = 100_000.0;
        c.limits.ws_message_burst = 100_000.0;
    })
    .await;
    // The stalled client: a real WebSocket over a socket with a tiny receive buffer, never read.
    let stalled_user = server.user("stalled").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.running.addr).await.unwrap();
    let stalled = Hub::open(stalled_user.hub_request().unwrap(), Some(stream)).await.unwrap();

    let talker = server.user("talker").await;
    let mut speaker = talker.hub().await.unwrap();
    let mut listener = server.user("listener").await.hub().await.unwrap();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        loop {
            match listener.recv_timeout(WAIT).await {
                Ok(ServerMsg::Chat(line)) if line.text == "done" => return got,
                Ok(ServerMsg::Chat(_)) => got += 1,
                Ok(_) => {}
                Err(e) => panic!("the listener stalled after {got} lines: {e}"),
            }
        }
    });
    // Talk until the stalled client's socket buffers and then its outbox are full (the kernel
    // takes up to 4 MB first), and the hub drops it.
    let line = "y".repeat(480);
    let mut sent = 0;
    while server.running.app.hub.stats().await.unwrap().dropped_slow == 0 {
        assert!(sent < 20_000, "never dropped the stalled client");
        for _ in 0..500 {
            // The speaker reads its own echo in lockstep, so that only the stalled client lags.
            speaker.send(&ClientMsg::Chat { text: line.clone() }).await.unwrap();
            next_chat(&mut speaker).await;
        }
        sent += 500;
    }
    speaker.send(&ClientMsg::Chat { text: "done".into() }).await.unwrap();
    assert_eq!(reader.await.unwrap(), sent, "the listener got every line");
    let stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!((stats.connections, stats.users_online), (2, 2), "the stalled client is gone: {stats:?}");
    drop(stalled);
}

#[tokio::test]
async fn dead_peers_are_dropped_by_the_idle_timeout() {
    let server = TestServer::start_with(|c| {
        c.limits.ws_ping_interval = Duration::from_millis(100);
        c.limits.ws_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let user = server.user("ghost").await;
    // After its hello the peer reads raw bytes under the WebSocket layer, which never answers
    // a ping: to the server it is dead.
    let hub = user.hub().await.unwrap();
    let mut raw = hub.into_tcp().unwrap();
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut bytes)).await;
    assert!(read.is_ok(), "the server closed the connection before the read timed out");
    let code = close::IDLE.to_be_bytes();
    assert!(bytes.windows(4).any(|w| w[0] == 0x88 && w[2..] == code), "a close frame with 4002");
}

#[tokio::test]
async fn shutdown_closes_sockets_with_going_away() {
    let server = TestServer::start().await;
    let mut hub = server.user("leaving").await.hub().await.unwrap();
    let stopping = tokio::spawn(server.stop());
    expect_close(&mut hub, close::GOING_AWAY).await;
    drop(stopping.await.unwrap());
}

/// One account took 99 of 100 connections before; now a session, a user and an address each
/// hold a few sockets, and a tenth of `--max-connections` stays free for page loads.
#[tokio::test]
async fn nobody_can_take_every_socket_and_page_loads_keep_room() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 40;
        c.limits.ws_per_session = 3;
        c.limits.ws_per_user = 5;
    })
    .await;
    let hog = server.user("hog").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(hog.hub().await.unwrap());
    }
    assert_eq!(upgrade_status(hog.hub().await), 429, "per session");
    let second = server.client();
    second.login("hog", crate::support::PASSWORD).await.unwrap();
    for _ in 0..2 {
        held.push(second.hub().await.unwrap());
    }
    assert_eq!(upgrade_status(second.hub().await), 429, "per user, over all their sessions");
    // A place comes back when a socket closes.
    drop(held.pop());
    let again = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(hub) = second.hub().await {
                return hub;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    held.push(again.await.expect("a freed place is given back"));

    // Others fill the server up to 36 sockets (40 less a tenth); the 37th is refused with 503,
    // and a page still loads.
    for i in 0..31 {
        held.push(server.user_named(i).await.hub().await.unwrap());
    }
    assert_eq!(upgrade_status(server.user_named(99).await.hub().await), 503);
    let page = server.client().http().get(format!("{}/login", server.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
}
