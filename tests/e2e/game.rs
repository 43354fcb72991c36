//! Two people in two browsers are matched, walk into each other's sight, see each other move,
//! one reloads mid-match and is put back in, and the result lands in both histories.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rallypoint_tests::{Browser, Driver, Server};
use serde_json::Value;
use shared::arena::{TILE, is_wall};

const PASSWORD: &str = "a long enough password";

async fn register(browser: &Browser, server: &Server, name: &str) {
    register_at(browser, &server.base, name).await;
}

async fn register_at(browser: &Browser, base: &str, name: &str) {
    browser.goto(&format!("{base}/register")).await;
    browser.submit(&[("username", name), ("password", PASSWORD), ("password_confirm", PASSWORD)]).await;
    browser.wait_for_path("/play").await;
    browser.find("#status[data-state='online']").await;
}

/// Chooses the duel in the lobby and presses Find match.
async fn find_duel(b: &Browser) {
    b.find("input[name='mode'][value='duel']").await.click().await.unwrap();
    b.find("#find-match:not([disabled])").await.click().await.unwrap();
}

async fn state(b: &Browser) -> Value {
    b.js("return window.rallypoint.state()").await
}

async fn key(b: &Browser, code: &str, down: bool) {
    let kind = if down { "keydown" } else { "keyup" };
    b.js(&format!("window.dispatchEvent(new KeyboardEvent('{kind}', {{ code: '{code}' }})); return null")).await;
}

fn position(state: &Value) -> Option<(i32, i32)> {
    let me = &state["me"];
    Some((me["x"].as_i64()? as i32, me["y"].as_i64()? as i32))
}

/// `b`'s player holds "down" until it has moved.
async fn moves_down(b: &Browser, what: &str) {
    let before = position(&state(b).await).unwrap();
    key(b, "KeyS", true).await;
    b.wait_until(what, || async { position(&state(b).await) != Some(before) }).await;
    key(b, "KeyS", false).await;
}

/// The tiles from `from` to `to`, stepping to neighbours that are not walls.
fn path(from: (i32, i32), to: (i32, i32)) -> Vec<(i32, i32)> {
    let mut came_from = HashMap::from([(from, from)]);
    let mut queue = VecDeque::from([from]);
    while let Some(tile) = queue.pop_front() {
        if tile == to {
            break;
        }
        for (dx, dy) in [(1, 0), (-1, 0), (0, 1), (0, -1)] {
            let next = (tile.0 + dx, tile.1 + dy);
            if !is_wall(next.0, next.1) && !came_from.contains_key(&next) {
                came_from.insert(next, tile);
                queue.push_back(next);
            }
        }
    }
    let mut steps = vec![to];
    while let Some(&prev) = came_from.get(steps.last().unwrap()) {
        if prev == *steps.last().unwrap() {
            break;
        }
        steps.push(prev);
    }
    steps.reverse();
    steps
}

/// Holds the direction keys that lead from the player's position towards `target` tile, tile
/// by tile, until the player stands in it. A held key is pressed again while the player stands
/// still, as a keyboard's auto-repeat does: the page lets go of every key when its window loses
/// the focus, which another test window can take at any time.
async fn walk_to(b: &Browser, target: (i32, i32)) {
    let mut held: [bool; 4] = [false; 4];
    let codes = ["KeyD", "KeyA", "KeyS", "KeyW"];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut last = None;
    loop {
        let s = state(b).await;
        assert!(tokio::time::Instant::now() < deadline, "never reached {target:?}: {s}");
        let Some((x, y)) = position(&s) else {
            tokio::time::sleep(Duration::from_millis(30)).await;
            continue;
        };
        let here = (x.div_euclid(TILE), y.div_euclid(TILE));
        let route = path(here, target);
        let next = route.get(1).copied().unwrap_or(target);
        let (cx, cy) = (next.0 * TILE + TILE / 2, next.1 * TILE + TILE / 2);
        let (dx, dy) = (cx - x, cy - y);
        let done = here == target && dx.abs() < 40 && dy.abs() < 40;
        let want = [!done && dx > 24, !done && dx < -24, !done && dy > 24, !done && dy < -24];
        let still = last == Some((x, y));
        last = Some((x, y));
        for i in 0..4 {
            if want[i] != held[i] || (want[i] && still) {
                key(b, codes[i], want[i]).await;
                held[i] = want[i];
            }
        }
        if done {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Where `watcher` sees the player in `seat`, if it sees them.
async fn seen(watcher: &Browser, seat: u64) -> Option<(i64, i64)> {
    let s = state(watcher).await;
    s["others"]
        .as_array()?
        .iter()
        .find(|o| o["seat"] == seat)
        .map(|o| (o["x"].as_i64().unwrap(), o["y"].as_i64().unwrap()))
}

/// `mover` steps left and right while `watcher` records where it sees them: it must see them in
/// several places. The key is pressed again at each look, as a held key repeats (see `walk_to`).
async fn sees_moving(watcher: &Browser, mover: &Browser) {
    let seat = state(mover).await["seat"].as_u64().unwrap();
    let mut places = std::collections::BTreeSet::new();
    for code in ["KeyA", "KeyD"] {
        for _ in 0..8 {
            key(mover, code, true).await;
            if let Some(p) = seen(watcher, seat).await {
                places.insert(p);
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        key(mover, code, false).await;
    }
    let (w, m) = (state(watcher).await, state(mover).await);
    assert!(places.len() >= 3, "the watcher saw the mover at {places:?}\nwatcher: {w}\nmover: {m}");
}

/// Waits until snapshots arrive on the WebRTC data channel, and the net graph says so.
async fn on_the_data_channel(b: &Browser) {
    b.wait_until("the data channel carries snapshots", || async {
        let s = state(b).await;
        s["transport"] == "webrtc" && s["data_channel_frames"].as_u64().unwrap_or(0) > 30
    })
    .await;
}

#[tokio::test]
async fn without_webrtc_in_the_page_the_match_is_played_over_the_websocket() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&["--match-seconds", "20"]).await;
    let driver = Driver::start().await;
    let carol = driver.browser(&[]).await;
    let dave = driver.browser(&[]).await;
    register(&carol, &server, "carol").await;
    register(&dave, &server, "dave").await;
    // Dave's browser has no WebRTC at all; Carol's has.
    dave.js("window.RTCPeerConnection = undefined; return null").await;
    for b in [&carol, &dave] {
        find_duel(b).await;
    }
    // From the moment the match view opens, Dave plays over the WebSocket within 3 s.
    dave.find("#game:not([hidden])").await;
    let started = std::time::Instant::now();
    dave.wait_until("playing over the WebSocket", || async {
        let s = state(&dave).await;
        s["transport"] == "websocket" && s["state"] == "playing"
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
    dave.wait_until("a full second of snapshots", || async { state(&dave).await["snapshots"].as_u64() > Some(20) })
        .await;
    let s = state(&dave).await;
    assert_eq!(s["data_channel_frames"], 0, "{s}");
    on_the_data_channel(&carol).await;
    // Dave moves, and Carol's prediction and Dave's inputs over the WebSocket agree.
    moves_down(&dave, "dave moves").await;
    carol.close().await;
    dave.close().await;
    server.stop().await;
}

/// Over TLS the room WebSocket keeps its queue and task (a room writes to a player's socket
/// itself only over plain TCP): two players without WebRTC play over `wss` there.
#[tokio::test]
async fn over_https_players_without_webrtc_play_over_the_secure_websocket() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_tls_with(&["--match-seconds", "20"]).await;
    let driver = Driver::start().await;
    let erin = driver.browser(&["--ignore-certificate-errors"]).await;
    let frank = driver.browser(&["--ignore-certificate-errors"]).await;
    register(&erin, &server, "erin").await;
    register(&frank, &server, "frank").await;
    for b in [&erin, &frank] {
        b.js("window.RTCPeerConnection = undefined; return null").await;
        find_duel(b).await;
    }
    for b in [&erin, &frank] {
        b.wait_until("a second of snapshots over the WebSocket", || async {
            let s = state(b).await;
            s["transport"] == "websocket" && s["state"] == "playing" && s["snapshots"].as_u64() > Some(30)
        })
        .await;
    }
    moves_down(&frank, "frank moves").await;
    erin.close().await;
    frank.close().await;
    server.stop().await;
}

#[tokio::test]
async fn two_players_are_matched_see_each_other_move_and_the_result_is_kept() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&["--match-seconds", "40"]).await;
    let driver = Driver::start().await;
    let alice = driver.browser(&[]).await;
    let bob = driver.browser(&[]).await;
    register(&alice, &server, "alice").await;
    register(&bob, &server, "bob").await;

    for b in [&alice, &bob] {
        find_duel(b).await;
    }
    alice.find("#game[data-state='playing']").await;
    bob.find("#game[data-state='playing']").await;
    for b in [&alice, &bob] {
        on_the_data_channel(b).await;
    }
    let alice_seat = state(&alice).await["seat"].as_u64().unwrap();

    // A reload mid-match puts the player back in their seat, on a new peer connection.
    alice.client.refresh().await.unwrap();
    alice.find("#game[data-state='playing']").await;
    assert_eq!(state(&alice).await["seat"].as_u64().unwrap(), alice_seat);
    on_the_data_channel(&alice).await;

    // Walk into each other's sight on the open row in the middle of the map.
    tokio::join!(walk_to(&alice, (17, 10)), walk_to(&bob, (22, 10)));
    let bob_seat = state(&bob).await["seat"].as_u64().unwrap();
    bob.wait_until("bob sees alice", || async { seen(&bob, alice_seat).await.is_some() }).await;
    alice.wait_until("alice sees bob", || async { seen(&alice, bob_seat).await.is_some() }).await;
    sees_moving(&bob, &alice).await;
    sees_moving(&alice, &bob).await;
    // Others were drawn between snapshots on the snapshot clock: the buffer hardly ran dry, and
    // nobody jumped across the screen between two frames.
    let s = state(&bob).await;
    eprintln!("interpolation in the browser: {s}");
    let (frames, dry) = (s["frames"].as_u64().unwrap(), s["dry_frames"].as_u64().unwrap());
    assert!(frames > 60 && dry * 20 < frames, "{dry} of {frames} frames dry: {s}");
    assert!(s["largest_step"].as_f64().unwrap() < 1.0, "{s}");
    assert!(s["interp_delay_ticks"].as_f64().unwrap() >= 1.5, "{s}");
    alice.screenshot("match").await;
    // Prediction kept up: the walking client hardly had to correct itself.
    let corrections = state(&alice).await["corrections"].as_u64().unwrap();
    assert!(corrections < 20, "{corrections} corrections");

    // The match runs out; both see the result, go back to the lobby, and find it in history.
    for b in [&alice, &bob] {
        b.find_within("#result:not([hidden])", Duration::from_mins(1)).await;
        let title = b.find("#result-title").await.text().await.unwrap();
        assert!(["You win!", "A draw", "You placed"].iter().any(|t| title.starts_with(t)), "{title}");
    }
    alice.screenshot("result").await;
    alice.find("#back-to-lobby").await.click().await.unwrap();
    alice.find("#lobby:not([hidden]) #find-match:not([disabled])").await;
    for (b, name) in [(&alice, "alice"), (&bob, "bob")] {
        b.goto(&server.url(&format!("/u/{name}"))).await;
        let row = b.find("table.history tbody tr").await.text().await.unwrap();
        assert!(row.contains("Duel"), "{row}");
    }
    alice.goto(&server.url("/leaderboard?mode=duel")).await;
    let board = alice.find("table tbody").await.text().await.unwrap();
    assert!(board.contains("alice") && board.contains("bob"), "{board}");
    alice.close().await;
    bob.close().await;
    server.stop().await;
}

/// The hub runs no match itself: the match goes to a room server, another process on another
/// port (another origin). Both browsers play there over WebRTC (signaled through the hub), and
/// the result lands in the hub's history.
#[tokio::test]
async fn two_browsers_play_a_match_hosted_on_a_room_server_over_webrtc() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&["--match-seconds", "12", "--local-rooms", "off"]).await;
    let _rooms = server.room_server("eu-1").await;
    let driver = Driver::start().await;
    let erin = driver.browser(&[]).await;
    let frank = driver.browser(&[]).await;
    register(&erin, &server, "erin").await;
    register(&frank, &server, "frank").await;
    play_a_short_duel_over_webrtc(&erin, &frank).await;
    erin.goto(&server.url("/u/erin")).await;
    let row = erin.find("table.history tbody tr").await.text().await.unwrap();
    assert!(row.contains("Duel"), "{row}");
    erin.close().await;
    frank.close().await;
    server.stop().await;
}

/// Both queue for a duel, play it on a data channel (the second one moves), and see the result.
async fn play_a_short_duel_over_webrtc(first: &Browser, second: &Browser) {
    for b in [first, second] {
        find_duel(b).await;
    }
    for b in [first, second] {
        b.find("#game[data-state='playing']").await;
        on_the_data_channel(b).await;
    }
    moves_down(second, "the second player moves").await;
    for b in [first, second] {
        b.find_within("#result:not([hidden])", Duration::from_secs(30)).await;
    }
}

/// Through a load balancer in front of two hub instances (PostgreSQL, NATS, no sticky
/// sessions; every request may land on either): two browsers register, see each other, are
/// matched and play a match on a room server over WebRTC, and find it in their history.
#[tokio::test]
async fn two_browsers_play_through_a_load_balancer_in_front_of_two_hub_instances() {
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let cluster = rallypoint_tests::Cluster::start().await;
    let driver = Driver::start().await;
    let (gina, hugo) = (driver.browser(&[]).await, driver.browser(&[]).await);
    register_at(&gina, &cluster.base, "gina").await;
    register_at(&hugo, &cluster.base, "hugo").await;
    play_a_short_duel_over_webrtc(&gina, &hugo).await;
    gina.goto(&cluster.url("/u/hugo")).await;
    let row = gina.find_within("table.history tbody tr", Duration::from_secs(30)).await.text().await.unwrap();
    assert!(row.contains("Duel"), "{row}");
    gina.close().await;
    hugo.close().await;
    cluster.stop().await;
}

/// The network drops both players' connections mid-match (a relay between the browsers and the
/// server cuts every hub and room connection): each page says it is reconnecting, comes back by
/// itself with backoff, and is put back in the same seat, on a new data channel, without a
/// reload.
#[tokio::test]
async fn a_dropped_connection_comes_back_to_the_same_seat_without_a_reload() {
    use rallypoint_load::bench::relay::{Kind, Relay};
    let _one = crate::ONE_AT_A_TIME.lock().await;
    let server = Server::start_with(&["--match-seconds", "60"]).await;
    let addr = server.base.trim_start_matches("http://").parse().unwrap();
    let relay = Relay::start(addr).await.unwrap();
    let driver = Driver::start().await;
    let (erin, frank) = (driver.browser(&[]).await, driver.browser(&[]).await);
    for (b, name) in [(&erin, "erin"), (&frank, "frank")] {
        b.goto(&format!("{}/register", relay.base())).await;
        b.submit(&[("username", name), ("password", PASSWORD), ("password_confirm", PASSWORD)]).await;
        b.wait_for_path("/play").await;
        b.find("#status[data-state='online']").await;
        find_duel(b).await;
    }
    let mut seats = Vec::new();
    for b in [&erin, &frank] {
        b.find("#game[data-state='playing']").await;
        on_the_data_channel(b).await;
        b.js("window.notReloaded = true; return null").await;
        seats.push(state(b).await["seat"].as_u64().unwrap());
    }

    // The hub connections drop: the pages say so, and come back by themselves; the match goes on,
    // in the same match view (the fresh ticket the hub hands out for the seat is kept for later:
    // the room's link never dropped). A new match view would count data-channel frames from zero.
    let frames = |b| async move { state(b).await["data_channel_frames"].as_u64().unwrap_or(0) };
    let mut before = Vec::new();
    for b in [&erin, &frank] {
        before.push(frames(b).await);
    }
    while relay.cut(Kind::Hub, 0) {}
    erin.wait_until("erin's page says it is reconnecting", || async {
        erin.exists("#status[data-state='offline']").await
    })
    .await;
    for (i, b) in [&erin, &frank].into_iter().enumerate() {
        b.find("#status[data-state='online']").await;
        assert_eq!(state(b).await["state"], "playing");
        assert!(frames(b).await >= before[i], "the same match view played on");
        // Its peer connection went with the old hub connection: a new one, offered over the new,
        // carries the snapshots again.
        let at = frames(b).await;
        b.wait_until("snapshots on a new data channel", || async {
            state(b).await["transport"] == "webrtc" && frames(b).await > at + 60
        })
        .await;
    }

    // The room connections drop: each page rejoins its seat through the hub, on a new peer. A
    // new match view counts its data-channel frames from zero: play 5 s first, so that the
    // count falling is seen.
    let mut before = Vec::new();
    for b in [&erin, &frank] {
        b.wait_until("5 s on the data channel", || async { frames(b).await > 150 }).await;
        before.push(frames(b).await);
    }
    while relay.cut(Kind::Room, 0) {}
    for (i, b) in [&erin, &frank].into_iter().enumerate() {
        b.wait_until("a new match view", || async { frames(b).await < before[i] }).await;
        b.find("#game[data-state='playing']").await;
        on_the_data_channel(b).await;
        let s = state(b).await;
        assert_eq!(s["seat"].as_u64(), Some(seats[i]), "{s}");
        assert_eq!(b.js("return window.notReloaded === true").await, true, "no reload");
    }
    erin.close().await;
    frank.close().await;
    server.stop().await;
}
