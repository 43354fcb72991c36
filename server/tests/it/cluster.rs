//! Several instances of `rallypoint serve` as one cluster: one PostgreSQL database and one
//! NATS server (real ones, from Debian, started for the test on free ports), two hub instances
//! in this process. A player must not be able to tell which instance they landed on.

use std::time::Duration;

use rallypoint_load::client::{Client, Hub};
use rallypoint_load::services::{Nats, fresh_postgres_database};
use shared::hub::{ClientMsg, ServerMsg, close};

use crate::support::{TestServer, expect_close, location};

/// A NATS server and a PostgreSQL database for one cluster.
async fn backing() -> (Nats, String) {
    tokio::task::spawn_blocking(|| (Nats::start().unwrap(), fresh_postgres_database("cluster").unwrap())).await.unwrap()
}

async fn instance(nats: &Nats, database: &str) -> TestServer {
    let (nats, database) = (nats.url(), database.to_owned());
    TestServer::start_with(move |c| {
        c.database_url = database;
        c.nats_url = Some(nats);
    })
    .await
}

/// Waits until `hub` shows `name` online (or not), reading presence as it comes.
async fn until_online(hub: &mut Hub, name: &str, online: bool) {
    let mut users: std::collections::HashMap<i64, String> = hub.online.iter().map(|u| (u.id, u.name.clone())).collect();
    if users.values().any(|n| n == name) == online {
        return;
    }
    hub.recv_until(Duration::from_secs(10), |msg| {
        if let ServerMsg::Presence { joined, left } = msg {
            users.extend(joined.iter().map(|u| (u.id, u.name.clone())));
            for id in left {
                users.remove(&id);
            }
            if users.values().any(|n| n == name) == online {
                return Some(());
            }
        }
        None
    })
    .await
    .unwrap_or_else(|e| panic!("{name} online={online}: {e}"));
}

async fn chat_line(hub: &mut Hub) -> (String, String) {
    hub.recv_until(Duration::from_secs(10), |msg| match msg {
        ServerMsg::Chat(line) => Some((line.from.name.clone(), line.text.clone())),
        _ => None,
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_chat_reach_players_on_the_other_instance_in_order() {
    let (nats, database) = backing().await;
    let a = instance(&nats, &database).await;
    let b = instance(&nats, &database).await;
    let ann = a.user("ann").await;
    // Registered through A, signed in through B: one database.
    let bob = b.client();
    bob.login("bob_missing", crate::support::PASSWORD).await.unwrap_err();
    a.user("bob").await;
    bob.login("bob", crate::support::PASSWORD).await.unwrap();
    let mut ann_hub = ann.hub().await.unwrap();
    let mut bob_hub = bob.hub().await.unwrap();
    until_online(&mut ann_hub, "bob", true).await;
    // Bob's welcome may have come before the instances heard of each other: then presence.
    until_online(&mut bob_hub, "ann", true).await;
    // Five: the chat burst a player may send at once.
    for i in 0..5 {
        bob_hub.send(&ClientMsg::Chat { text: format!("line {i}") }).await.unwrap();
    }
    for i in 0..5 {
        assert_eq!(chat_line(&mut ann_hub).await, ("bob".to_owned(), format!("line {i}")), "in order per sender");
    }
    ann_hub.send(&ClientMsg::Chat { text: "hi from A".into() }).await.unwrap();
    // Bob reads his own lines back first (they were broadcast to his lobby), then Ann's.
    let mut got = Vec::new();
    while got.last().map(|(_, t): &(String, String)| t.as_str()) != Some("hi from A") {
        got.push(chat_line(&mut bob_hub).await);
    }
    // A newcomer on B sees the chat said on A in the lobby's history.
    let cat = b.user("cat").await;
    let cat_hub = cat.hub().await.unwrap();
    assert!(cat_hub.history.iter().any(|l| l.text == "hi from A"), "{:?}", cat_hub.history);
    assert!(cat_hub.online_names().contains(&"ann".to_owned()), "{:?}", cat_hub.online_names());
    // Bob leaves B: Ann on A sees him go.
    bob_hub.close().await;
    until_online(&mut ann_hub, "bob", false).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_on_one_instance_closes_that_session_on_every_instance() {
    let (nats, database) = backing().await;
    let a = instance(&nats, &database).await;
    let b = instance(&nats, &database).await;
    let dee = a.user("dee").await;
    let dee_on_b = dee.at(&b.base).unwrap();
    let mut hub_b = dee_on_b.hub().await.unwrap();
    // Another session of the same user stays.
    let other = Client::new(&b.base).unwrap();
    other.login("dee", crate::support::PASSWORD).await.unwrap();
    let mut other_hub = other.hub().await.unwrap();
    // The instances know each other before the logout is said (a heartbeat at most).
    let mut hub_a = dee.hub().await.unwrap();
    tokio::time::sleep(rallypoint_server::bus::HEARTBEAT * 2).await;
    let cookie = dee.cookie_header().unwrap();
    let started = std::time::Instant::now();
    dee.logout().await.unwrap();
    expect_close(&mut hub_a, close::SESSION_ENDED).await;
    expect_close(&mut hub_b, close::SESSION_ENDED).await;
    assert!(started.elapsed() < Duration::from_secs(1), "within a second: {:?}", started.elapsed());
    other_hub.send(&ClientMsg::Ping { id: 1 }).await.unwrap();
    let pong = other_hub.recv_until(Duration::from_secs(5), |m| matches!(m, ServerMsg::Pong { .. }).then_some(()));
    assert!(pong.await.is_ok(), "the other session is still open");
    // And the session is gone for pages on either instance: its cookie, replayed, gets the login
    // page.
    let replay = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    for base in [&a.base, &b.base] {
        let response = replay.get(format!("{base}/play")).header("cookie", &cookie).send().await.unwrap();
        assert_eq!(location(&response), "/login", "{base}: {}", response.status());
    }
    b.stop().await;
    a.stop().await;
}

/// Twelve players arrive at once, half on each instance, with lobbies of three: one instance
/// alone gives the places (the lease holder), so no lobby takes more than three, and the four
/// lobbies fill in order. Each instance choosing by what it had heard would put six in the
/// first: the other's arrivals reach it only with the next presence batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lobbies_keep_their_bound_when_players_arrive_at_once_on_every_instance() {
    let (nats, database) = backing().await;
    let sized = |nats: &Nats| {
        let (nats, database) = (nats.url(), database.clone());
        TestServer::start_with(move |c| {
            c.database_url = database;
            c.nats_url = Some(nats);
            c.limits.lobby_capacity = 3;
        })
    };
    let a = sized(&nats).await;
    let b = sized(&nats).await;
    let day = Duration::from_hours(24);
    let tokens =
        rallypoint_server::accounts::seed_for_bench(&a.running.app.db, "crowd", 12, "unused", day).await.unwrap();
    let clients: Vec<Client> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| Client::with_session(if i % 2 == 0 { &a.base } else { &b.base }, t).unwrap())
        .collect();
    let hubs: Vec<Hub> =
        futures_util::future::join_all(clients.iter().map(Client::hub)).await.into_iter().map(Result::unwrap).collect();
    let lobby = |hub: &Hub| match hub.welcome {
        ServerMsg::Welcome { lobby, .. } => lobby,
        _ => unreachable!(),
    };
    let mut sizes = std::collections::BTreeMap::new();
    for hub in &hubs {
        *sizes.entry(lobby(hub)).or_insert(0) += 1;
    }
    assert_eq!(sizes, (1..=4).map(|l| (l, 3)).collect(), "lobby → players");
    // A second tab of a player in a full lobby, on the other instance, joins them there.
    let again = Client::with_session(&b.base, &tokens[0]).unwrap().hub().await.unwrap();
    assert_eq!(lobby(&again), lobby(&hubs[0]), "same lobby");
    b.stop().await;
    a.stop().await;
}

/// With nobody holding the lease (here, the test holds its lock), nobody gives lobby places:
/// a player arriving is told to come back later (1013) after [`JOIN_WAIT`], instead of
/// waiting forever or overfilling a lobby; once the lock is free, an instance takes the lease
/// and the player gets in.
///
/// [`JOIN_WAIT`]: rallypoint_server::hub::JOIN_WAIT
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_lease_holder_arrivals_are_told_to_come_back_then_get_in() {
    use sqlx::Connection as _;
    let (nats, database) = backing().await;
    sqlx::any::install_default_drivers();
    let mut holder = sqlx::AnyConnection::connect(&database).await.unwrap();
    // `hub::lease`'s key ("rp-match").
    let won: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(0x7270_2d6d_6174_6368_i64)
        .fetch_one(&mut holder)
        .await
        .unwrap();
    assert!(won);
    let a = instance(&nats, &database).await;
    let gus = a.user("gus").await;
    let started = std::time::Instant::now();
    match gus.hub().await {
        Err(rallypoint_load::client::ClientError::Closed { code, .. }) => assert_eq!(code, close::TRY_AGAIN),
        other => panic!("expected close 1013, got {:?}", other.map(|h| h.welcome)),
    }
    assert!(started.elapsed() >= rallypoint_server::hub::JOIN_WAIT, "{:?}", started.elapsed());
    holder.close().await.unwrap();
    let hub = gus.hub().await.unwrap();
    assert!(matches!(hub.welcome, ServerMsg::Welcome { lobby: 1, .. }));
    a.stop().await;
}

/// An instance that dies without a word (its NATS connection cut, then silent) takes its players
/// out of the others' lobbies within the peer timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_stops_takes_its_players_out_of_every_lobby() {
    let (nats, database) = backing().await;
    let a = instance(&nats, &database).await;
    let b = instance(&nats, &database).await;
    let eve = b.user("eve").await;
    let _eve_hub = eve.hub().await.unwrap();
    let fay = a.user("fay").await;
    let mut fay_hub = fay.hub().await.unwrap();
    until_online(&mut fay_hub, "eve", true).await;
    b.stop().await;
    until_online(&mut fay_hub, "eve", false).await;
    a.stop().await;
}

/// `/readyz` says whether the instance can reach NATS: a load balancer stops sending players to
/// an instance that lost it, and it comes back by itself when NATS does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_nats_and_the_instance_reconnects_by_itself() {
    let (nats, database) = backing().await;
    let a = instance(&nats, &database).await;
    let b = instance(&nats, &database).await;
    let ready = |base: String| async move { reqwest::get(format!("{base}/readyz")).await.unwrap().status().as_u16() };
    assert_eq!(ready(a.base.clone()).await, 200);
    let (port, data) = (nats.port(), nats.data().to_path_buf());
    tokio::task::spawn_blocking(move || nats.kill()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ready(a.base.clone()).await == 200 {
        assert!(std::time::Instant::now() < deadline, "still ready without NATS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reqwest::get(format!("{}/healthz", a.base)).await.unwrap().status().as_u16(), 200, "alive");
    let _nats = tokio::task::spawn_blocking(move || Nats::start_on(port, Some(data)).unwrap()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ready(a.base.clone()).await != 200 || ready(b.base.clone()).await != 200 {
        assert!(std::time::Instant::now() < deadline, "not ready again after NATS came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // And the bus carries presence again.
    let gus = a.user("gus").await;
    let _gus_hub = gus.hub().await.unwrap();
    let hal = b.user("hal").await;
    let mut hal_hub = hal.hub().await.unwrap();
    until_online(&mut hal_hub, "gus", true).await;
    b.stop().await;
    a.stop().await;
}

/// Guesses spread over two instances use up one allowance: the throttle counts across the
/// cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_count_across_instances() {
    let (nats, database) = backing().await;
    let (nats_url, db) = (nats.url(), database.clone());
    let strict = move |c: &mut rallypoint_server::config::Config| {
        c.database_url = db.clone();
        c.nats_url = Some(nats_url.clone());
        c.limits.login_failures_per_account_address = 4;
    };
    let a = TestServer::start_with(strict.clone()).await;
    let b = TestServer::start_with(strict).await;
    a.user("ivy").await;
    // The instances know each other (a heartbeat at most).
    tokio::time::sleep(rallypoint_server::bus::HEARTBEAT * 2).await;
    for (i, server) in [&a, &b, &a, &b].into_iter().enumerate() {
        let err = server.client().login("ivy", "wrong password").await.unwrap_err();
        assert!(!err.to_string().contains("Too many"), "guess {i} should be checked: {err}");
    }
    for server in [&a, &b] {
        let err = server.client().login("ivy", crate::support::PASSWORD).await.unwrap_err();
        assert!(err.to_string().contains("Too many"), "locked on every instance: {err}");
    }
    b.stop().await;
    a.stop().await;
}

async fn hub_instance(nats: &Nats, database: &str) -> TestServer {
    let (nats, database) = (nats.url(), database.to_owned());
    TestServer::start_with(move |c| {
        crate::rooms::quick(c);
        c.database_url = database;
        c.nats_url = Some(nats);
        c.local_rooms = false;
    })
    .await
}

/// Two players who landed on two instances queue; the one matcher of the cluster puts them in
/// one room on a room server that registered with the other instance, where they play over
/// WebRTC (signaled through their own instances) and the result is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_on_two_instances_meet_in_one_room_on_a_room_server_any_instance_holds() {
    use crate::room_servers::{RoomServer, matched_in, seat};
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    let b = hub_instance(&nats, &database).await;
    let token = rallypoint_server::fleet::tokens::create(&a.running.app.db, "eu-1", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let _rs = RoomServer::start(&b.base, &token, data.path());
    holds(&b, 1, Duration::from_secs(20)).await;
    let mut ann = crate::rooms::player(&a, "cl_ann").await;
    let mut bob = crate::rooms::player(&b, "cl_bob").await;
    let ((room_a, ta), (room_b, tb)) = matched_in(&mut ann, &mut bob).await;
    assert_eq!(room_a, room_b, "one room");
    assert!(room_a.starts_with("eu-1/"), "{room_a}");
    let mut ra = seat(&ann, &ta).await.unwrap();
    let mut rb = seat(&bob, &tb).await.unwrap();
    // Bob's tab reloads and lands on the other instance: it knows his seat and sends him back.
    let bob_on_a = bob.client.at(&a.base).unwrap();
    let mut bob_hub_a = bob_on_a.hub().await.unwrap();
    let (again, _) = bob_hub_a.match_found(Duration::from_secs(5)).await.unwrap();
    assert_eq!(again, room_a, "back to his seat through the other instance");
    drop(bob_hub_a);
    // Ann signals through instance A; the room server's control connection is on B.
    ra.open_data_channel(&mut ann.hub, &room_a, Duration::from_secs(10)).await.unwrap();
    let ((oa, ratings, _), (ob, _, _)) = tokio::join!(crate::rooms::play_out(&mut ra), crate::rooms::play_out(&mut rb));
    assert_eq!(oa, ob);
    assert_eq!(ratings.len(), 2, "recorded, with the rating changes");
    assert_eq!(crate::rooms::count(&a, "SELECT COUNT(*) FROM matches WHERE server = 'eu-1'").await, 1);
    // Both are free again, on both instances.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for server in [&a, &b] {
        while server.running.app.hub.stats().await.unwrap().playing != 0 {
            assert!(std::time::Instant::now() < deadline, "a player stayed in the finished match");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    b.stop().await;
    a.stop().await;
}

/// Waits until `server` holds `n` room servers' control sessions.
async fn holds(server: &TestServer, n: usize, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    while server.running.app.hub.stats().await.unwrap().room_servers != n {
        assert!(std::time::Instant::now() < deadline, "{} never held {n} room servers", server.base);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two players meet on the room server and play a match out there.
async fn play_a_match(one: &mut crate::rooms::Player, two: &mut crate::rooms::Player) {
    use crate::room_servers::{matched_in, seat};
    let ((room, t1), (_, t2)) = matched_in(one, two).await;
    assert!(room.starts_with("eu-1/"), "{room}");
    let (mut r1, mut r2) = (seat(one, &t1).await.unwrap(), seat(two, &t2).await.unwrap());
    let ((o1, ratings, _), (o2, _, _)) = tokio::join!(crate::rooms::play_out(&mut r1), crate::rooms::play_out(&mut r2));
    assert_eq!(o1, o2);
    assert_eq!(ratings.len(), 2, "recorded, with the rating changes");
}

/// A room server that registers through NATS (no hub reached through the load balancer): the
/// instance that answered holds it, players of both instances play on it, and when that
/// instance stops, the room server registers again through NATS with the other, where the next
/// match is placed. Each result is recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_server_registered_through_nats_moves_to_another_instance_when_its_own_goes() {
    use crate::room_servers::RoomServer;
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    let token = rallypoint_server::fleet::tokens::create(&a.running.app.db, "eu-1", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let _rs = RoomServer::start_through_nats(&a.base, &nats.url(), &token, data.path());
    // A alone listens: it answers the registration.
    holds(&a, 1, Duration::from_secs(10)).await;
    let b = hub_instance(&nats, &database).await;
    let mut ann = crate::rooms::player(&a, "nr_ann").await;
    let mut bob = crate::rooms::player(&b, "nr_bob").await;
    play_a_match(&mut ann, &mut bob).await;
    a.stop().await;
    let moved = std::time::Instant::now();
    holds(&b, 1, Duration::from_secs(10)).await;
    let moved = moved.elapsed();
    let mut cat = crate::rooms::player(&b, "nr_cat").await;
    play_a_match(&mut cat, &mut bob).await;
    assert_eq!(crate::rooms::count(&b, "SELECT COUNT(*) FROM matches WHERE server = 'eu-1'").await, 2);
    assert!(moved < Duration::from_secs(5), "held by the other instance after {moved:?}");
    b.stop().await;
}

/// The instance holding a room server stops, and the room server cannot register again (it knows
/// only that instance's address): after the grace, the players of the other instance seated
/// there are told and are back in the lobby, instead of keeping a seat forever. (Nobody says
/// `ServerLost`: the holder is gone before its own grace ends.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seats_on_a_room_server_gone_with_its_instance_are_called_off() {
    use crate::room_servers::{RoomServer, matched_in, seat};
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    let b = hub_instance(&nats, &database).await;
    let token = rallypoint_server::fleet::tokens::create(&a.running.app.db, "eu-1", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let rs = RoomServer::start(&a.base, &token, data.path());
    holds(&a, 1, Duration::from_secs(10)).await;
    let mut ann = crate::rooms::player(&b, "or_ann").await;
    let mut bob = crate::rooms::player(&b, "or_bob").await;
    let ((_, ta), (_, tb)) = matched_in(&mut ann, &mut bob).await;
    let _seats = (seat(&ann, &ta).await.unwrap(), seat(&bob, &tb).await.unwrap());
    let stopped = std::time::Instant::now();
    a.stop().await;
    let message = ann
        .hub
        .recv_until(Duration::from_secs(30), |m| match m {
            ServerMsg::MatchAborted { message } => Some(message),
            _ => None,
        })
        .await
        .unwrap();
    assert!(message.contains("went away"), "{message}");
    assert!(stopped.elapsed() >= rallypoint_server::hub::ORPHAN_GRACE, "{:?}", stopped.elapsed());
    assert_eq!(b.running.app.hub.stats().await.unwrap().playing, 0, "both free again");
    drop(rs);
    b.stop().await;
}

/// A room server held by A restarts and registers with B while A still holds its old session
/// (A learns it is gone only from the silence): the later registration wins everywhere. A lets
/// go instead of calling its matches off, and the matcher (A) keeps placing matches on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_server_that_moves_while_its_old_instance_still_holds_it_stays_in_the_cluster() {
    use crate::room_servers::RoomServer;
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    let token = rallypoint_server::fleet::tokens::create(&a.running.app.db, "eu-1", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let first = RoomServer::start_through_nats(&a.base, &nats.url(), &token, data.path());
    holds(&a, 1, Duration::from_secs(10)).await;
    let b = hub_instance(&nats, &database).await;
    drop(first); // killed: A's session goes quiet
    let _again = RoomServer::start(&b.base, &token, data.path());
    holds(&b, 1, Duration::from_secs(10)).await;
    holds(&a, 0, Duration::from_secs(5)).await;
    // Past A's silence timeout and its grace: nothing it says of the old session counts.
    tokio::time::sleep(rallypoint_server::fleet::control::SILENCE + rallypoint_server::hub::SERVER_GRACE * 2).await;
    let mut ann = crate::rooms::player(&a, "mv_ann").await;
    let mut bob = crate::rooms::player(&b, "mv_bob").await;
    play_a_match(&mut ann, &mut bob).await;
    b.stop().await;
    a.stop().await;
}

/// What reaches the registration subject is checked like any client's message: garbage, an
/// oversized request and an unknown token are refused with a reason, and nothing else changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_registrations_over_nats_are_refused_with_a_reason() {
    use rallypoint_server::fleet::control::nats::{Down, REGISTER};
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    let client = async_nats::connect(nats.url()).await.unwrap();
    let register = serde_json::json!({
        "type": "register", "control_version": rallypoint_server::fleet::control::CONTROL_VERSION,
        "room_protocol": shared::room::ROOM_PROTOCOL_VERSION, "public_url": "http://127.0.0.1:9", "free": 1,
        "running": []
    });
    let unknown = serde_json::json!({ "token": "rpt_nope", "session": 1, "register": register });
    let malformed = serde_json::json!({ "token": "rpt_nope", "session": 1, "register": { "type": "load" } });
    for (request, code) in [
        (b"{".to_vec(), 1008),
        (vec![b' '; 300 * 1024], 1008),
        (malformed.to_string().into_bytes(), 1008),
        (unknown.to_string().into_bytes(), 4101),
    ] {
        let answer = client.request(REGISTER, request.into()).await.unwrap();
        match serde_json::from_slice::<Down>(&answer.payload).unwrap() {
            Down::Close { code: got, reason } => assert_eq!(got, code, "{reason}"),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    // A real token with a registration that breaks the protocol is refused after the token.
    let token = rallypoint_server::fleet::tokens::create(&a.running.app.db, "eu-9", false).await.unwrap();
    let load_first = serde_json::json!({ "token": token, "session": 2, "register": { "type": "load", "free": 1, "draining": false } });
    let answer = client.request(REGISTER, load_first.to_string().into()).await.unwrap();
    assert!(matches!(serde_json::from_slice(&answer.payload).unwrap(), Down::Close { code: 1008, .. }));
    assert_eq!(a.running.app.hub.stats().await.unwrap().room_servers, 0);
    a.stop().await;
}

/// The instance holding the matcher lease goes: another takes it over within 5 s, and the
/// queue, which every instance keeps, is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_matcher_goes_another_instance_takes_over_with_the_queue() {
    use crate::room_servers::RoomServer;
    let (nats, database) = backing().await;
    let a = hub_instance(&nats, &database).await;
    // A holds the lease (it started first, alone).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = hub_instance(&nats, &database).await;
    let c = hub_instance(&nats, &database).await;
    let token = rallypoint_server::fleet::tokens::create(&b.running.app.db, "eu-2", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let _rs = RoomServer::start(&c.base, &token, data.path());
    let mut kim = crate::rooms::player(&b, "cl_kim").await;
    let mut lou = crate::rooms::player(&c, "cl_lou").await;
    // Kim queues first, alone; then the matcher dies.
    kim.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = std::time::Instant::now();
    a.stop().await;
    // Lou queues on another instance: B or C takes the lease and matches them.
    lou.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    let (found_kim, found_lou) =
        tokio::join!(kim.hub.match_found(Duration::from_secs(10)), lou.hub.match_found(Duration::from_secs(10)));
    let ((room_kim, _), (room_lou, _)) = (found_kim.unwrap(), found_lou.unwrap());
    assert_eq!(room_kim, room_lou);
    assert!(stopped.elapsed() < Duration::from_secs(5), "taken over in {:?}", stopped.elapsed());
    c.stop().await;
    b.stop().await;
}

/// A hub instance as a real process of the built binary, on the cluster's PostgreSQL and NATS.
struct HubProcess {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl HubProcess {
    async fn start(nats: &Nats, database: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(rallypoint_server::config::CLIENT_JS), "").unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_rallypoint"))
            .args(["serve", "--listen", &addr.to_string(), "--database-url", database, "--nats-url", &nats.url()])
            .args(["--local-rooms", "off", "--log", "warn", "--match-seconds", "8", "--static-dir"])
            .arg(dir.path())
            .env_clear()
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let base = format!("http://{addr}");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while reqwest::get(format!("{base}/readyz")).await.map_or(0, |r| r.status().as_u16()) != 200 {
            assert!(std::time::Instant::now() < deadline, "the hub did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { child, base, _dir: dir }
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kill -9` of the instance a player is on, mid-match, which is also the matcher: the player
/// comes back through the other instance, which sends them back to their seat; the match
/// finishes and its result is recorded once; the other instance takes the lease and forms the
/// next match. (Real processes: nothing says goodbye.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_killed_mid_match_its_player_takes_the_seat_back_through_the_other() {
    use crate::room_servers::RoomServer;
    let (nats, database) = backing().await;
    let mut one = HubProcess::start(&nats, &database).await;
    // Alone for a moment, `one` takes the matcher lease.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let two = HubProcess::start(&nats, &database).await;
    let db = rallypoint_server::db::open(&database).await.unwrap();
    let token = rallypoint_server::fleet::tokens::create(&db, "eu-9", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let _rs = RoomServer::start(&two.base, &token, data.path());
    let (ann, bob) = (Client::new(&one.base).unwrap(), Client::new(&two.base).unwrap());
    ann.register("cl_kill_ann", crate::support::PASSWORD).await.unwrap();
    bob.register("cl_kill_bob", crate::support::PASSWORD).await.unwrap();
    let (mut ann_hub, mut bob_hub) = (ann.hub().await.unwrap(), bob.hub().await.unwrap());
    for hub in [&mut ann_hub, &mut bob_hub] {
        hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    }
    let (fa, fb) =
        tokio::join!(ann_hub.match_found(Duration::from_secs(15)), bob_hub.match_found(Duration::from_secs(15)));
    let ((room, ticket_a), (_, ticket_b)) = (fa.unwrap(), fb.unwrap());
    let mut bob_room = bob.room_at::<shared::arena::Arena>(bob_hub.room_url.as_deref(), &ticket_b).await.unwrap();
    let ann_room = ann.room_at::<shared::arena::Arena>(ann_hub.room_url.as_deref(), &ticket_a).await.unwrap();
    drop(ann_room); // her tab goes with her instance
    one.child.kill().unwrap();
    let _ = one.child.wait();
    // Her page reconnects through the load balancer: here, the other instance.
    let ann_again = ann.at(&two.base).unwrap();
    let mut hub = ann_again.hub().await.unwrap();
    let (again, ticket) = hub.match_found(Duration::from_secs(5)).await.unwrap();
    assert_eq!(again, room, "the same seat");
    let mut ann_room = ann_again.room_at::<shared::arena::Arena>(hub.room_url.as_deref(), &ticket).await.unwrap();
    let ((oa, ratings, _), (ob, _, _)) =
        tokio::join!(crate::rooms::play_out(&mut ann_room), crate::rooms::play_out(&mut bob_room));
    assert_eq!(oa, ob);
    assert_eq!(ratings.len(), 2, "recorded, with the rating changes");
    let recorded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM matches WHERE server = 'eu-9'").fetch_one(&db).await.unwrap();
    assert_eq!(recorded, 1);
    // The matcher is alive somewhere: a second match forms.
    let (cat, dan) = (Client::new(&two.base).unwrap(), Client::new(&two.base).unwrap());
    cat.register("cl_kill_cat", crate::support::PASSWORD).await.unwrap();
    dan.register("cl_kill_dan", crate::support::PASSWORD).await.unwrap();
    let (mut cat_hub, mut dan_hub) = (cat.hub().await.unwrap(), dan.hub().await.unwrap());
    for hub in [&mut cat_hub, &mut dan_hub] {
        hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    }
    let (fc, fd) =
        tokio::join!(cat_hub.match_found(Duration::from_secs(10)), dan_hub.match_found(Duration::from_secs(10)));
    assert_eq!(fc.unwrap().0, fd.unwrap().0, "matched after the matcher's instance was killed");
    db.close().await;
}

/// `kill -9` of the instance holding a room server registered through NATS, mid-match: the room
/// server hears no answer to its heartbeats, registers again through NATS with the other instance
/// (nothing said goodbye), its match plays on, and the result is recorded once, with the rating
/// changes shown to the players. (Real processes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_server_whose_instance_is_killed_registers_again_through_nats_and_plays_on() {
    use crate::room_servers::RoomServer;
    let (nats, database) = backing().await;
    let mut one = HubProcess::start(&nats, &database).await;
    let db = rallypoint_server::db::open(&database).await.unwrap();
    let token = rallypoint_server::fleet::tokens::create(&db, "eu-8", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    // `one` alone listens for registrations (and takes the matcher lease).
    let _rs = RoomServer::start_through_nats(&one.base, &nats.url(), &token, data.path());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let two = HubProcess::start(&nats, &database).await;
    let (ann, bob) = (Client::new(&two.base).unwrap(), Client::new(&two.base).unwrap());
    ann.register("nk_ann", crate::support::PASSWORD).await.unwrap();
    bob.register("nk_bob", crate::support::PASSWORD).await.unwrap();
    let (mut ann_hub, mut bob_hub) = (ann.hub().await.unwrap(), bob.hub().await.unwrap());
    for hub in [&mut ann_hub, &mut bob_hub] {
        hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    }
    let (fa, fb) =
        tokio::join!(ann_hub.match_found(Duration::from_secs(15)), bob_hub.match_found(Duration::from_secs(15)));
    let ((room, ticket_a), (_, ticket_b)) = (fa.unwrap(), fb.unwrap());
    assert!(room.starts_with("eu-8/"), "{room}");
    let mut ann_room = ann.room_at::<shared::arena::Arena>(ann_hub.room_url.as_deref(), &ticket_a).await.unwrap();
    let mut bob_room = bob.room_at::<shared::arena::Arena>(bob_hub.room_url.as_deref(), &ticket_b).await.unwrap();
    one.child.kill().unwrap();
    let _ = one.child.wait();
    let ((oa, ratings, _), (ob, _, _)) =
        tokio::join!(crate::rooms::play_out(&mut ann_room), crate::rooms::play_out(&mut bob_room));
    assert_eq!(oa, ob);
    assert_eq!(ratings.len(), 2, "recorded through the other instance, with the rating changes");
    let recorded: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM matches WHERE server = 'eu-8'").fetch_one(&db).await.unwrap();
    assert_eq!(recorded, 1);
    db.close().await;
}
