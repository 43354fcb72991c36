//! Matchmaking and rooms, with native clients playing through the same protocol as the browser.

use std::time::Duration;

use rallypoint_load::client::{Client, ClientError, FromRoom, Hub, Room};
use rallypoint_server::config::Config;
use shared::arena::{Arena, ArenaInput, ArenaRules, ArenaView};
use shared::game::{Game, MatchSetup, Mode, Outcome, Seat};
use shared::hub::{ClientMsg, ErrorCode, ServerMsg};
use shared::room::{ToRoom, close};

use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(10);

/// Short matches and timeouts, so that tests finish quickly.
pub(crate) fn quick(c: &mut Config) {
    c.rooms.time_limit_secs = Some(2);
    c.rooms.claim_timeout = Duration::from_secs(3);
    c.rooms.seat_hold = Duration::from_secs(1);
}

pub(crate) struct Player {
    pub(crate) client: Client,
    pub(crate) hub: Hub,
}

pub(crate) async fn player(server: &TestServer, name: &str) -> Player {
    let client = server.user(name).await;
    let hub = client.hub().await.unwrap();
    Player { client, hub }
}

/// Queues for `mode` and waits for the ticket.
async fn find_match(p: &mut Player, mode: &str) -> String {
    p.hub.send(&ClientMsg::FindMatch { mode: mode.into() }).await.unwrap();
    p.hub.match_found(WAIT).await.unwrap().1
}

/// Both queue for a duel together, and each takes their seat over the room WebSocket.
async fn seat_both(a: &mut Player, b: &mut Player) -> (Room<Arena>, Room<Arena>) {
    let (ta, tb) = tokio::join!(find_match(a, "duel"), find_match(b, "duel"));
    (a.client.room::<Arena>(&ta).await.unwrap(), b.client.room::<Arena>(&tb).await.unwrap())
}

/// Plays (walking right, shooting) until the match ends; returns the outcome and ratings and
/// the snapshots seen.
pub(crate) async fn play_out(room: &mut Room<Arena>) -> (Outcome, Vec<shared::room::RatingChange>, u32) {
    let mut seq = 0;
    let mut snapshots = 0;
    let mut every = tokio::time::interval(Duration::from_millis(33));
    loop {
        tokio::select! {
            _ = every.tick() => {
                seq += 1;
                let input = ArenaInput { buttons: ArenaInput::RIGHT | ArenaInput::FIRE, aim_x: 100, aim_y: 0 };
                room.send(&ToRoom::Inputs { first_seq: seq, tick: 0, seen: room.seen(), inputs: vec![input] }).await.unwrap();
            }
            frame = room.recv_timeout(WAIT) => match frame.unwrap() {
                FromRoom::<Arena>::Snapshot { .. } => snapshots += 1,
                FromRoom::<Arena>::Ended { outcome, ratings } => return (outcome, ratings, snapshots),
                _ => {}
            },
        }
    }
}

pub(crate) async fn count(server: &TestServer, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(&server.running.app.db).await.unwrap()
}

#[tokio::test]
async fn two_players_go_from_the_queue_to_a_recorded_result() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "alice").await;
    let mut b = player(&server, "bob").await;
    let (mut ra, mut rb) = seat_both(&mut a, &mut b).await;
    assert_eq!(ra.players, rb.players);
    assert_ne!(ra.seat, rb.seat);
    assert_eq!(ra.tick_hz, 30);
    let ((oa, rating_a, snaps_a), (ob, _, snaps_b)) = tokio::join!(play_out(&mut ra), play_out(&mut rb));
    assert_eq!(oa, ob);
    assert!(snaps_a > 30 && snaps_b > 30, "about 60 ticks of snapshots: {snaps_a}, {snaps_b}");
    assert_eq!(rating_a.len(), 2);
    assert!(rating_a.iter().all(|r| r.before == 1500));
    // One match, its two players and their two ratings, all in the database.
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches").await, 1);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM match_players").await, 2);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM ratings WHERE mode = 'duel' AND matches = 1").await, 2);
    // Both are free to queue again.
    let stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!((stats.playing, stats.queued), (0, 0));
    a.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    let queued = a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Queued { .. }).then_some(())).await;
    assert!(queued.is_ok());
}

/// A match that ends just as the server stops still has its result written: the hub waits
/// for the results it is writing before the database closes. (Without that wait, the
/// benchmarks' servers, stopped as their bots left, logged "closed pool" for such results.)
#[tokio::test]
async fn a_match_that_ends_as_the_server_stops_is_still_recorded() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "leaver").await;
    let mut b = player(&server, "stayer").await;
    let (mut ra, _rb) = seat_both(&mut a, &mut b).await;
    while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    // One player leaves: the match ends, and the hub (which frees both players as it takes
    // the result) writes it while the server is asked to stop.
    ra.send(&ToRoom::Leave).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.running.app.hub.stats().await.unwrap().playing > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the match never ended");
        tokio::task::yield_now().await;
    }
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, quick).await;
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches").await, 1);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM match_players").await, 2);
}

#[tokio::test]
async fn snapshots_carry_the_last_input_applied_and_only_what_the_player_sees() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "seer").await;
    let mut b = player(&server, "seen").await;
    let (mut ra, _rb) = seat_both(&mut a, &mut b).await;
    // Like a browser, start sending once play has started (the first snapshot).
    while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    // Three inputs at once: two are taken this tick, the third is dropped and, as a client
    // does with whatever is not acknowledged, sent again.
    let input = ArenaInput { buttons: ArenaInput::DOWN, aim_x: 1, aim_y: 0 };
    let mut acks = Vec::new();
    while acks.last() != Some(&3) {
        let first_seq = acks.last().map_or(1, |a| a + 1);
        let inputs = vec![input; (4 - first_seq) as usize];
        ra.send(&ToRoom::Inputs { first_seq, tick: 0, seen: ra.seen(), inputs }).await.unwrap();
        if let FromRoom::<Arena>::Snapshot { ack, view, .. } = ra.recv_timeout(WAIT).await.unwrap() {
            assert!(view.others.iter().all(|o| o.seat != ra.seat), "never yourself among the others");
            assert_eq!(view.scores.len(), 2);
            assert!(ack <= 3);
            acks.push(ack);
        }
    }
    let stats = server.running.app.hub.rooms().stats();
    assert!(stats.inputs_dropped.load(std::sync::atomic::Ordering::Relaxed) >= 1, "the third of the first three");
}

/// Reads frames until the room connection closes; its close code.
async fn close_code<G: Game>(room: &mut Room<G>) -> u16 {
    loop {
        match room.recv_timeout(WAIT).await {
            Ok(_) => {}
            Err(ClientError::Closed { code, .. }) => return code,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Waits for the hub's word that the match stopped; its message.
pub(crate) async fn aborted(hub: &mut Hub) -> String {
    hub.recv_until(WAIT, |m| match m {
        ServerMsg::MatchAborted { message } => Some(message),
        _ => None,
    })
    .await
    .unwrap()
}

fn closed_with(result: Result<Room<Arena>, ClientError>) -> u16 {
    match result {
        Err(ClientError::Closed { code, .. }) => code,
        Err(other) => panic!("expected a close, got {other}"),
        Ok(_) => panic!("expected a close, got a seat"),
    }
}

#[tokio::test]
async fn forged_expired_reused_and_foreign_tickets_are_refused() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "holder").await;
    let mut b = player(&server, "other").await;
    let (ta, _tb) = tokio::join!(find_match(&mut a, "duel"), find_match(&mut b, "duel"));

    // Forged: a flipped byte in the signature, or garbage.
    let mut forged = ta.clone().into_bytes();
    let last = forged.len() - 2;
    forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    assert_eq!(closed_with(a.client.room::<Arena>(&forged).await), close::TICKET_FORGED);
    assert_eq!(closed_with(a.client.room::<Arena>("not a ticket").await), close::TICKET_FORGED);
    // Foreign: someone else's ticket, or a genuine one for the same seat on another room server.
    assert_eq!(closed_with(b.client.room::<Arena>(&ta).await), close::TICKET_FOREIGN);
    let seed = rallypoint_server::db::secret(&server.running.app.db, "room-tickets-ed25519").await.unwrap();
    let signer = rallypoint_server::rooms::TicketSigner::from_seed(&seed);
    let genuine = signer.verifier().verify(&ta, 0).unwrap();
    let elsewhere = signer.sign(&rallypoint_server::rooms::Ticket { server: 7, nonce: 1, ..genuine });
    assert_eq!(closed_with(a.client.room::<Arena>(&elsewhere).await), close::TICKET_FOREIGN);
    // Used: the first use takes the seat, the second is refused.
    let seat = a.client.room::<Arena>(&ta).await.unwrap();
    assert_eq!(closed_with(a.client.room::<Arena>(&ta).await), close::TICKET_USED);
    drop(seat);

    // Expired: a server whose tickets last no time.
    let server = TestServer::start_with(|c| {
        quick(c);
        c.rooms.ticket_ttl = Duration::ZERO;
    })
    .await;
    let mut a = player(&server, "late1").await;
    let mut b = player(&server, "late2").await;
    let (ta, _) = tokio::join!(find_match(&mut a, "duel"), find_match(&mut b, "duel"));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(closed_with(a.client.room::<Arena>(&ta).await), close::TICKET_EXPIRED);
}

#[tokio::test]
async fn the_room_door_needs_a_session_a_same_site_origin_and_a_join_first() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(quick).await;
    let anonymous = server.client();
    let refused = tokio_tungstenite::connect_async(anonymous.room_request().unwrap()).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401));
    let user = server.user("doorman").await;
    let mut request = user.room_request().unwrap();
    request.headers_mut().insert("origin", "http://evil.test".parse().unwrap());
    let refused = tokio_tungstenite::connect_async(request).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 403));
    // Text instead of a join request.
    let (mut socket, _) = tokio_tungstenite::connect_async(user.room_request().unwrap()).await.unwrap();
    socket.send(Message::text("hello?")).await.unwrap();
    match socket.next().await.unwrap().unwrap() {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), close::NO_JOIN),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_are_dropped_counted_and_repeated_ones_close_the_connection() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "garbler").await;
    let mut b = player(&server, "victim").await;
    let (mut ra, mut rb) = seat_both(&mut a, &mut b).await;
    let stats = server.running.app.hub.rooms().stats();
    ra.send_raw(vec![0, 255, 255, 255, 255, 255]).await.unwrap();
    // Still playing: snapshots keep coming.
    while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    assert_eq!(stats.frames_malformed.load(std::sync::atomic::Ordering::Relaxed), 1);
    for _ in 0..20 {
        if ra.send_raw(vec![9; 40]).await.is_err() {
            break;
        }
    }
    let closed = close_code(&mut ra).await;
    assert_eq!(closed, close::POLICY);
    // An oversized frame: 1009.
    rb.send_raw(vec![0; 2048]).await.unwrap();
    let closed = close_code(&mut rb).await;
    assert_eq!(closed, close::TOO_BIG);
}

#[tokio::test]
async fn a_flood_of_pings_is_held_to_the_message_limit() {
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "pinger").await;
    let mut b = player(&server, "bystander").await;
    let (mut ra, mut rb) = seat_both(&mut a, &mut b).await;
    // Each ping costs the server a pong: past the burst (180), the connection is closed.
    for _ in 0..400 {
        if ra.send_ws(Message::Ping(vec![0; 125].into())).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ra).await, close::POLICY);
    while !matches!(rb.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
}

#[tokio::test]
async fn inputs_far_ahead_or_far_behind_are_dropped_and_counted() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "cheater").await;
    let mut b = player(&server, "honest").await;
    let (mut ra, _rb) = seat_both(&mut a, &mut b).await;
    let input = ArenaInput { buttons: ArenaInput::RIGHT, aim_x: 1, aim_y: 0 };
    // Wait for play to start, then send inputs far ahead in sequence and far off in time.
    while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    ra.send(&ToRoom::Inputs { first_seq: 1_000_000, tick: 0, seen: 0, inputs: vec![input] }).await.unwrap();
    ra.send(&ToRoom::Inputs { first_seq: 1, tick: 1_000_000, seen: 0, inputs: vec![input; 3] }).await.unwrap();
    let stats = server.running.app.hub.rooms().stats();
    let deadline = tokio::time::Instant::now() + WAIT;
    // The room counts the drops as it takes the frames; snapshots show none was applied.
    loop {
        if let FromRoom::<Arena>::Snapshot { ack, .. } = ra.recv_timeout(WAIT).await.unwrap() {
            assert_eq!(ack, 0, "no dropped input was applied");
            if stats.inputs_dropped.load(std::sync::atomic::Ordering::Relaxed) >= 4 {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline);
    }
}

#[tokio::test]
async fn a_reloaded_tab_goes_back_to_its_seat_and_an_empty_seat_is_given_up() {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.rooms.time_limit_secs = Some(30);
        c.rooms.seat_hold = Duration::from_secs(2);
    })
    .await;
    let mut a = player(&server, "reloader").await;
    let mut b = player(&server, "stayer").await;
    let (ta, tb) = tokio::join!(find_match(&mut a, "duel"), find_match(&mut b, "duel"));
    let ra = a.client.room::<Arena>(&ta).await.unwrap();
    let mut rb = b.client.room::<Arena>(&tb).await.unwrap();
    let seat = ra.seat;
    // "Reload": both sockets go, and a new hub connection is sent back into the match.
    ra.close().await;
    drop(a.hub);
    let mut hub = a.client.hub().await.unwrap();
    let (_, ticket) = hub.match_found(WAIT).await.unwrap();
    assert_ne!(ticket, ta, "a fresh ticket");
    let back = a.client.room::<Arena>(&ticket).await.unwrap();
    assert_eq!(back.seat, seat, "the same seat");
    // Now leave for good: after the seat hold, the other player wins by forfeit.
    back.close().await;
    let (outcome, ratings) = loop {
        if let FromRoom::<Arena>::Ended { outcome, ratings } = rb.recv_timeout(WAIT).await.unwrap() {
            break (outcome, ratings);
        }
    };
    assert_eq!(outcome.reason, shared::game::EndReason::Forfeit);
    assert_eq!(outcome.ranks[usize::from(rb.seat)], 1);
    assert!(ratings[usize::from(rb.seat)].after > ratings[usize::from(rb.seat)].before);
}

/// The room writes to a room WebSocket itself (plain TCP): a player who stops reading loses
/// snapshots, holds neither the room nor the other player up, and is let go once their socket
/// has taken nothing for the write timeout.
#[tokio::test]
async fn a_player_who_stops_reading_loses_snapshots_holds_nobody_up_and_is_let_go() {
    use tokio_tungstenite::tungstenite::Message;
    let server = TestServer::start_with(|c| {
        quick(c);
        c.rooms.time_limit_secs = Some(120);
        c.limits.ws_write_timeout = Duration::from_millis(500);
        c.limits.room_messages_per_second = 100_000.0;
        c.limits.room_message_burst = 100_000.0;
    })
    .await;
    let mut a = player(&server, "stalled").await;
    let mut b = player(&server, "reader").await;
    let (ta, tb) = tokio::join!(find_match(&mut a, "duel"), find_match(&mut b, "duel"));
    // A real WebSocket over a socket with a tiny receive buffer, never read after the join.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.running.addr).await.unwrap();
    let mut stalled = Room::<Arena>::join(a.client.room_request().unwrap(), Some(stream), &ta).await.unwrap();
    let mut rb = b.client.room::<Arena>(&tb).await.unwrap();
    // Snapshots are small: the stalled player fills its socket faster with pings, whose pongs
    // the server writes on the same connection (the kernel takes a few MB first).
    let flood = tokio::spawn(async move {
        for _ in 0..100_000 {
            if stalled.send_ws(Message::Ping(vec![0; 125].into())).await.is_err() {
                return true;
            }
        }
        false
    });
    let stats = server.running.app.hub.rooms().stats();
    let started = tokio::time::Instant::now();
    let mut last = tokio::time::Instant::now();
    let outcome = loop {
        match rb.recv_timeout(WAIT).await.unwrap() {
            FromRoom::<Arena>::Snapshot { .. } => {
                assert!(last.elapsed() < Duration::from_millis(500), "the reader waited {:?}", last.elapsed());
                last = tokio::time::Instant::now();
            }
            FromRoom::<Arena>::Ended { outcome, .. } => break outcome,
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the stalled player was never let go");
    };
    // Let go, the stalled player's seat was given up after the hold: the reader wins.
    assert_eq!(outcome.reason, shared::game::EndReason::Forfeit);
    assert_eq!(outcome.ranks[usize::from(rb.seat)], 1);
    assert!(stats.snapshots_dropped.load(std::sync::atomic::Ordering::Relaxed) > 0, "dropped and counted");
    assert!(flood.await.unwrap(), "the server closed the stalled connection");
    eprintln!("let go after {:?}", started.elapsed());
}

#[tokio::test]
async fn nobody_is_queued_twice_and_leaving_the_lobby_leaves_the_queue() {
    let server = TestServer::start_with(quick).await;
    let mut a = player(&server, "eager").await;
    a.hub.send(&ClientMsg::FindMatch { mode: "nonsense".into() }).await.unwrap();
    let refused = a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Error { .. }).then_some(m)).await.unwrap();
    assert!(matches!(refused, ServerMsg::Error { code: ErrorCode::UnknownMode, .. }));
    a.hub.send(&ClientMsg::FindMatch { mode: "ffa".into() }).await.unwrap();
    a.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    let refused = a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Error { .. }).then_some(m)).await.unwrap();
    assert!(matches!(refused, ServerMsg::Error { code: ErrorCode::AlreadyBusy, .. }));
    // Another tab of the same user cannot queue either.
    let mut tab = a.client.hub().await.unwrap();
    tab.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    let refused = tab.recv_until(WAIT, |m| matches!(m, ServerMsg::Error { .. }).then_some(m)).await.unwrap();
    assert!(matches!(refused, ServerMsg::Error { code: ErrorCode::AlreadyBusy, .. }));
    assert_eq!(server.running.app.hub.stats().await.unwrap().queued, 1);
    // Cancel, queue again, then close the tab that queued: out of the queue.
    a.hub.send(&ClientMsg::CancelMatch).await.unwrap();
    a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Unqueued).then_some(())).await.unwrap();
    a.hub.send(&ClientMsg::CancelMatch).await.unwrap();
    let refused = a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Error { .. }).then_some(m)).await.unwrap();
    assert!(matches!(refused, ServerMsg::Error { code: ErrorCode::NotQueued, .. }));
    a.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    a.hub.recv_until(WAIT, |m| matches!(m, ServerMsg::Queued { .. }).then_some(())).await.unwrap();
    a.hub.close().await;
    tab.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    tab.recv_until(WAIT, |m| matches!(m, ServerMsg::Queued { .. }).then_some(())).await.unwrap();
}

#[tokio::test]
async fn a_match_whose_players_do_not_come_is_cancelled() {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.rooms.claim_timeout = Duration::from_millis(500);
    })
    .await;
    let mut a = player(&server, "early").await;
    let mut b = player(&server, "absent").await;
    let (ta, _) = tokio::join!(find_match(&mut a, "duel"), find_match(&mut b, "duel"));
    let mut ra = a.client.room::<Arena>(&ta).await.unwrap();
    let message = aborted(&mut a.hub).await;
    assert!(message.contains("Too few players"), "{message}");
    assert!(matches!(ra.recv_timeout(WAIT).await, Err(ClientError::Closed { code: close::MATCH_OVER, .. })));
    assert_eq!(server.running.app.hub.stats().await.unwrap().playing, 0);
}

/// The arena, except that an input with every button pressed makes it panic.
struct Fragile(Arena);

impl Game for Fragile {
    type Input = ArenaInput;
    type View = ArenaView;
    type Delta = <Arena as Game>::Delta;
    type Own = <Arena as Game>::Own;
    type Rules = ArenaRules;

    fn modes() -> &'static [Mode] {
        Arena::modes()
    }
    fn new(mode: &Mode, setup: &MatchSetup) -> Self {
        Self(Arena::new(mode, setup))
    }
    fn step(&mut self, inputs: &[&[ArenaInput]]) {
        assert!(!inputs.iter().flat_map(|i| i.iter()).any(|i| i.buttons == u8::MAX), "deliberate panic");
        self.0.step(inputs);
    }
    fn set_present(&mut self, seat: Seat, present: bool) {
        self.0.set_present(seat, present);
    }
    fn view(&self, seat: Seat) -> ArenaView {
        self.0.view(seat)
    }
    fn diff(base: &ArenaView, now: &ArenaView, ticks: u32) -> Self::Delta {
        Arena::diff(base, now, ticks)
    }
    fn patch(base: &ArenaView, delta: &Self::Delta, ticks: u32) -> Option<ArenaView> {
        Arena::patch(base, delta, ticks)
    }
    fn outcome(&self) -> Option<Outcome> {
        self.0.outcome()
    }
    fn tick(&self) -> u32 {
        self.0.tick()
    }
    fn state_hash(&self) -> u64 {
        self.0.state_hash()
    }
    fn rules(&self) -> ArenaRules {
        self.0.rules()
    }
    fn own(view: &ArenaView) -> Self::Own {
        Arena::own(view)
    }
    fn predict(rules: &ArenaRules, own: &mut Self::Own, input: &ArenaInput) {
        Arena::predict(rules, own, input);
    }
    fn divergence(a: &Self::Own, b: &Self::Own) -> u32 {
        Arena::divergence(a, b)
    }
}

#[tokio::test]
async fn a_panic_in_one_room_ends_that_room_only() {
    let server = TestServer::start_game::<Fragile>(|c| {
        quick(c);
        c.rooms.time_limit_secs = Some(30);
    })
    .await;
    let mut players = Vec::new();
    for name in ["crash1", "crash2", "calm1", "calm2"] {
        players.push(player(&server, name).await);
    }
    let mut tickets = Vec::new();
    for pair in players.chunks_mut(2) {
        let (p, q) = pair.split_at_mut(1);
        let (tp, tq) = tokio::join!(find_match(&mut p[0], "duel"), find_match(&mut q[0], "duel"));
        tickets.push(tp);
        tickets.push(tq);
    }
    let mut rooms = Vec::new();
    for (p, ticket) in players.iter().zip(&tickets) {
        rooms.push(p.client.room::<Fragile>(ticket).await.unwrap());
    }
    while !matches!(rooms[0].recv_timeout(WAIT).await.unwrap(), FromRoom::<Fragile>::Snapshot { .. }) {}
    let bomb = ArenaInput { buttons: u8::MAX, aim_x: 0, aim_y: 0 };
    rooms[0].send(&ToRoom::Inputs { first_seq: 1, tick: 0, seen: 0, inputs: vec![bomb] }).await.unwrap();
    // The crashed room's players are told, and their room connection closes.
    for p in &mut players[..2] {
        let message = aborted(&mut p.hub).await;
        assert!(message.contains("server error"), "{message}");
    }
    let closed = close_code(&mut rooms[1]).await;
    assert_eq!(closed, close::ROOM_FAILED);
    // The other room keeps ticking.
    let mut ticks = Vec::new();
    while ticks.len() < 30 {
        if let FromRoom::<Fragile>::Snapshot { tick, .. } = rooms[2].recv_timeout(WAIT).await.unwrap() {
            ticks.push(tick);
        }
    }
    assert!(ticks.windows(2).all(|w| w[1] > w[0]));
    let stats = server.running.app.hub.rooms().stats();
    assert_eq!(stats.crashes.load(std::sync::atomic::Ordering::Relaxed), 1);
    // And the crashed players can play again.
    let hub_stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!(hub_stats.playing, 2);
}

#[tokio::test]
async fn bots_sign_up_queue_play_and_report() {
    let server = TestServer::start_with(quick).await;
    let args = rallypoint_load::bots::BotsArgs {
        server: server.base.clone(),
        count: 4,
        duration: 6,
        mode: "duel".into(),
        json: true,
        name_prefix: "robo".into(),
        transport: rallypoint_load::bots::Transport::Ws,
        password: "robot password".into(),
        network: rallypoint_load::bots::NetworkArgs::default(),
    };
    let report = rallypoint_load::bots::run(&args).await;
    assert_eq!(report.protocol_errors, 0, "{:?}", report.errors);
    assert!(report.matches_completed >= 4, "two 2-second duels each: {report:?}");
    assert!(report.inputs_sent > 100 && report.snapshots_received > 100, "{report:?}");
    assert!(report.rtt_p99_ms > 0.0);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM users WHERE username LIKE 'robo%'").await, 4);
    assert!(count(&server, "SELECT COUNT(*) FROM matches").await >= 2);
}

/// Bots play duels through a relay that cuts their room connections mid-match: each comes back
/// through the hub, gets a fresh ticket and takes its seat back (the browser does the same).
async fn cut_room_connections_are_taken_back(transport: rallypoint_load::bots::Transport) {
    use rallypoint_load::bench::relay::{Kind, Relay};
    let server = TestServer::start_with(|c| c.rooms.time_limit_secs = Some(30)).await;
    let relay = Relay::start(server.running.addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(12);
    let bots: Vec<_> = (0..4)
        .map(|i| {
            let base = relay.base();
            tokio::spawn(async move {
                let client = Client::new(&base).unwrap();
                client.register(&format!("cut{i}"), crate::support::PASSWORD).await.unwrap();
                let mut tally = rallypoint_load::bots::Tally::default();
                let conditions = rallypoint_load::client::Conditions::default();
                rallypoint_load::bots::play(&client, "duel", transport, conditions, deadline, i, &mut tally).await;
                tally
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(8), async {
        while relay.count(Kind::Room) < 4 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("four bots in two duels");
    let mut cuts = 0;
    for pick in 0..12 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cuts += u64::from(relay.cut(Kind::Room, pick));
    }
    let mut tallies = Vec::new();
    for bot in bots {
        tallies.push(bot.await.unwrap());
    }
    let report = rallypoint_load::bots::report(4, tallies);
    assert_eq!(report.protocol_errors, 0, "{:?}", report.errors);
    assert!(cuts >= 10 && report.room_connections_lost >= cuts / 2, "{cuts} cuts: {report:?}");
    // Every cut ends back in the seat, unless that match ended meanwhile (rare in 12 s).
    assert!(report.seats_gone <= 1, "{report:?}");
    assert_eq!(report.seats_regained + report.seats_gone, report.room_connections_lost, "{report:?}");
}

#[tokio::test]
async fn players_cut_off_mid_match_take_their_seat_back_over_the_websocket() {
    cut_room_connections_are_taken_back(rallypoint_load::bots::Transport::Ws).await;
}

#[tokio::test]
async fn players_cut_off_mid_match_take_their_seat_back_over_webrtc() {
    cut_room_connections_are_taken_back(rallypoint_load::bots::Transport::Webrtc).await;
}

/// A `Leave` sent just before the connection closes reaches the room before the close does, so
/// the seat is given up at once rather than held for the player's return.
#[tokio::test]
async fn a_leave_sent_as_the_connection_closes_gives_the_seat_up_at_once() {
    let server = TestServer::start_with(|c| {
        c.rooms.time_limit_secs = Some(60);
        c.rooms.seat_hold = Duration::from_mins(1);
    })
    .await;
    let mut a = player(&server, "quitter").await;
    let mut b = player(&server, "remains").await;
    let (mut ra, mut rb) = seat_both(&mut a, &mut b).await;
    while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    ra.send(&ToRoom::Leave).await.unwrap();
    ra.close().await;
    // The duel ends with one player gone, well before the 60 s hold would have run out.
    loop {
        match rb.recv_timeout(WAIT).await {
            Ok(FromRoom::<Arena>::Ended { .. }) => break,
            Ok(_) => {}
            Err(e) => panic!("the seat was held, not given up: {e:?}"),
        }
    }
}

/// Matches that end as the server is asked to stop (their last player left a moment before):
/// every player told that the match ended (`Ended`, whose result is recorded) finds it in the
/// database after a restart. A room whose match ends before it hears of the stop reports it,
/// and the stopping hub writes it before the database closes. Matches still playing end
/// without a result, and without an `Ended`. The stop comes at a different point of the rooms'
/// tick each round. (On this idle test server the rooms hear of the stop before their next
/// tick, so this did not catch the hub that stopped listening to rooms once it had taken the
/// results already reported; `bench webrtc`, which stops a busy server as 512 players leave,
/// lost ~7 results a run that way, and loses none now.)
#[tokio::test]
async fn every_match_a_player_is_told_has_ended_is_recorded_when_the_server_stops_at_once() {
    const DUELS: usize = 8;
    let mut dir = tempfile::tempdir().unwrap();
    let (mut told, mut recorded) = (0, 0);
    for round in 0..6u64 {
        let server = TestServer::start_in(dir, |c| c.rooms.time_limit_secs = Some(60)).await;
        let mut leavers = Vec::new();
        let mut stayers = Vec::new();
        for i in 0..DUELS {
            let mut a = player(&server, &format!("goes{round}_{i}")).await;
            let mut b = player(&server, &format!("stays{round}_{i}")).await;
            let (mut ra, rb) = seat_both(&mut a, &mut b).await;
            while !matches!(ra.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
            leavers.push((a, ra));
            stayers.push((b, rb));
        }
        for (_, ra) in &mut leavers {
            ra.send(&ToRoom::Leave).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(7 * round)).await;
        let stopping = tokio::spawn(server.stop());
        for (_, rb) in &mut stayers {
            loop {
                match rb.recv_timeout(WAIT).await {
                    Ok(FromRoom::<Arena>::Ended { .. }) => {
                        told += 1;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        }
        dir = stopping.await.unwrap();
        let server = TestServer::start_in(dir, quick).await;
        recorded = count(&server, "SELECT COUNT(*) FROM matches").await;
        eprintln!("round {round}: {told} told the match ended so far, {recorded} recorded");
        assert!(recorded >= told, "{told} players were told their match ended, {recorded} matches recorded");
        dir = server.stop().await;
    }
    assert!(told > 0 && recorded > 0, "some matches ended before the stop");
}
