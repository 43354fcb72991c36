//! The WebRTC transport: native clients (the same sans-I/O stack as the server, str0m) negotiate
//! over the hub, play over the data channel, and send bad signaling.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use rallypoint_server::bots::{BotsArgs, Transport};
use rallypoint_server::client::{Client, FromRoom, Hub, Room};
use rallypoint_server::config::Config;
use shared::arena::{Arena, ArenaInput};
use shared::hub::{ClientMsg, ErrorCode, ServerMsg};
use shared::room::ToRoom;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{TestServer, expect_close};

const WAIT: Duration = Duration::from_secs(10);
const OPEN: Duration = Duration::from_secs(3);

fn long_matches(c: &mut Config) {
    c.rooms.time_limit_secs = Some(600);
    c.rooms.claim_timeout = Duration::from_secs(5);
}

struct Seat {
    client: Client,
    hub: Hub,
    room_name: String,
    room: Room<Arena>,
}

/// Two users, matched in a duel, each seated in the room over its WebSocket.
async fn duel(server: &TestServer, a: &str, b: &str) -> (Seat, Seat) {
    let (a, b) = tokio::join!(seat(server, a), seat(server, b));
    (a, b)
}

async fn seat(server: &TestServer, name: &str) -> Seat {
    let client = server.user(name).await;
    let mut hub = client.hub().await.unwrap();
    hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    let (room_name, ticket) = hub.match_found(WAIT).await.unwrap();
    let room = client.room::<Arena>(&ticket).await.unwrap();
    Seat { client, hub, room_name, room }
}

/// The hub's answer to a signaling message: the refusal's text, or `None` for an answer.
async fn rtc_refusal(hub: &mut Hub) -> Option<String> {
    hub.recv_until(WAIT, |m| match m {
        ServerMsg::RtcAnswer { .. } => Some(None),
        ServerMsg::Error { code: ErrorCode::Rtc, message } => Some(Some(message)),
        _ => None,
    })
    .await
    .unwrap()
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real SDP offer with the data channel, made as the native client makes it.
fn offer_sdp() -> String {
    let provider = std::sync::Arc::new(str0m::crypto::from_feature_flags());
    let mut rtc = str0m::RtcConfig::new().set_crypto_provider(provider).build(std::time::Instant::now());
    let mut change = rtc.sdp_api();
    change.add_channel(shared::room::DATA_CHANNEL_LABEL.to_owned());
    change.apply().unwrap().0.to_sdp_string()
}

#[tokio::test]
async fn a_match_is_played_over_the_data_channel_and_snapshots_arrive_on_it() {
    let server = TestServer::start_with(long_matches).await;
    let (mut a, mut b) = duel(&server, "rtc_a", "rtc_b").await;
    a.room.open_data_channel(&mut a.hub, &a.room_name, OPEN).await.unwrap();
    b.room.open_data_channel(&mut b.hub, &b.room_name, OPEN).await.unwrap();
    assert_eq!(a.room.transport(), "webrtc");
    let rtc = server.running.app.hub.rtc().stats();
    assert_eq!(rtc.peers.load(Relaxed), 2);
    wait_for("the server to see both channels open", || rtc.channels_opened.load(Relaxed) == 2).await;
    // Inputs go up the data channel and are applied: the acks in the snapshots climb.
    let mut acked = 0;
    for seq in 1..=60u32 {
        let input = ArenaInput { buttons: ArenaInput::RIGHT, aim_x: 1, aim_y: 0 };
        a.room.send(&ToRoom::Inputs { first_seq: seq, tick: 0, inputs: vec![input] }).await.unwrap();
        if let FromRoom::<Arena>::Snapshot { ack, .. } = a.room.recv_timeout(WAIT).await.unwrap() {
            acked = ack;
        }
    }
    assert!(acked > 30, "acked {acked}");
    // A data-channel frame that does not decode is dropped and counted; play goes on.
    let rooms = server.running.app.hub.rooms().stats();
    a.room.send_raw(vec![0, 255, 255, 255, 255]).await.unwrap();
    wait_for("the malformed frame to be counted", || rooms.frames_malformed.load(Relaxed) == 1).await;
    while !matches!(a.room.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
    // The channel fails mid-match (here: its signaling connection goes, so the server closes the
    // peer): both sides go back to the WebSocket and play goes on.
    a.hub.close().await;
    wait_for("the server to close the peer", || rtc.peers.load(Relaxed) == 1).await;
    let mut snapshots = 0;
    while snapshots < 30 {
        if let FromRoom::<Arena>::Snapshot { .. } = a.room.recv_timeout(WAIT).await.unwrap() {
            snapshots += 1;
        }
    }
    assert_eq!(a.room.transport(), "websocket");
    // Leaving closes and frees the other peer connection.
    a.room.close().await;
    b.room.close().await;
    wait_for("every peer to be freed", || rtc.peers.load(Relaxed) == 0).await;
}

#[tokio::test]
async fn bots_play_full_matches_over_webrtc() {
    let server = TestServer::start_with(|c| c.rooms.time_limit_secs = Some(2)).await;
    let args = BotsArgs {
        server: server.base.clone(),
        count: 2,
        duration: 6,
        mode: "duel".into(),
        json: true,
        name_prefix: "rtcbot".into(),
        transport: Transport::Webrtc,
        password: "robot password".into(),
    };
    let report = rallypoint_server::bots::run(&args).await;
    assert_eq!(report.protocol_errors, 0, "{:?}", report.errors);
    assert!(report.matches_completed >= 2, "{report:?}");
    // Every match on a data channel (the last one, cut by the deadline, is not completed).
    assert!(report.data_channels_opened >= report.matches_completed, "{report:?}");
    assert!(report.snapshots_received > 100, "{report:?}");
    let rtc = server.running.app.hub.rtc().stats();
    wait_for("every peer to be freed", || rtc.peers.load(Relaxed) == 0).await;
}

#[tokio::test]
async fn bad_signaling_is_refused_with_a_reason() {
    let server = TestServer::start_with(long_matches).await;
    let (mut a, b) = duel(&server, "signal_a", "signal_b").await;
    let sdp = offer_sdp();

    // Malformed: not a message at all, then an offer whose SDP is nonsense.
    a.hub.send_raw(Message::text(r#"{"type":"rtc_offer","room":5}"#)).await.unwrap();
    let malformed = a
        .hub
        .recv_until(WAIT, |m| matches!(m, ServerMsg::Error { code: ErrorCode::Malformed, .. }).then_some(()))
        .await;
    assert!(malformed.is_ok());
    a.hub.send(&ClientMsg::RtcOffer { room: a.room_name.clone(), sdp: "v=0 nonsense".into() }).await.unwrap();
    assert!(rtc_refusal(&mut a.hub).await.unwrap().contains("not a valid SDP offer"));

    // Out of order: a candidate before any offer.
    let candidate = ClientMsg::RtcCandidate {
        room: a.room_name.clone(),
        candidate: "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host".into(),
        sdp_mid: Some("0".into()),
        sdp_m_line_index: Some(0),
    };
    a.hub.send(&candidate).await.unwrap();
    assert!(rtc_refusal(&mut a.hub).await.unwrap().contains("no offer"));

    // A room the user has no seat in (another match's, or made up).
    a.hub.send(&ClientMsg::RtcOffer { room: "r999-999".into(), sdp: sdp.clone() }).await.unwrap();
    assert!(rtc_refusal(&mut a.hub).await.unwrap().contains("no seat"));
    let mut stranger = server.user("stranger").await.hub().await.unwrap();
    stranger.send(&ClientMsg::RtcOffer { room: b.room_name.clone(), sdp: sdp.clone() }).await.unwrap();
    assert!(rtc_refusal(&mut stranger).await.unwrap().contains("no seat"));

    // A flood of offers: the first ones are answered (each replacing the last), then refused.
    let mut refused = 0;
    for _ in 0..6 {
        a.hub.send(&ClientMsg::RtcOffer { room: a.room_name.clone(), sdp: sdp.clone() }).await.unwrap();
        if let Some(reason) = rtc_refusal(&mut a.hub).await {
            assert!(reason.contains("too many offers"), "{reason}");
            refused += 1;
        }
    }
    assert!(refused >= 3, "{refused} of 6 refused");
    // The answered ones were replaced, never piled up.
    let rtc = server.running.app.hub.rtc().stats();
    assert!(rtc.peers.load(Relaxed) <= 1);

    // A candidate on another hub connection of the same user is not for that peer.
    let mut other_tab = a.client.hub().await.unwrap();
    other_tab.send(&candidate).await.unwrap();
    assert!(rtc_refusal(&mut other_tab).await.unwrap().contains("no offer"));

    // Oversized: the hub's 4 KiB limit closes the socket with 1009.
    let huge = ClientMsg::RtcOffer { room: a.room_name.clone(), sdp: "a".repeat(5000) };
    a.hub.send(&huge).await.unwrap();
    expect_close(&mut a.hub, shared::hub::close::TOO_BIG).await;
    // The signaling connection is gone, and so is every peer it negotiated.
    wait_for("the peer to be freed", || rtc.peers.load(Relaxed) == 0).await;
    drop(b);
}

#[tokio::test]
async fn a_peer_that_never_completes_its_handshake_is_dropped_on_time() {
    let server = TestServer::start_with(|c| {
        long_matches(c);
        c.webrtc.handshake_timeout = Duration::from_millis(500);
    })
    .await;
    let (mut a, _b) = duel(&server, "silent_a", "silent_b").await;
    // An offer whose answer is never applied: ICE and DTLS never start.
    let sdp = offer_sdp();
    a.hub.send(&ClientMsg::RtcOffer { room: a.room_name.clone(), sdp }).await.unwrap();
    assert_eq!(rtc_refusal(&mut a.hub).await, None);
    let rtc = server.running.app.hub.rtc().stats();
    assert_eq!(rtc.peers.load(Relaxed), 1);
    wait_for("the handshake to time out", || rtc.handshakes_timed_out.load(Relaxed) == 1).await;
    wait_for("the peer to be freed", || rtc.peers.load(Relaxed) == 0).await;
    // The seat is unharmed: snapshots still come over the WebSocket.
    while !matches!(a.room.recv_timeout(WAIT).await.unwrap(), FromRoom::<Arena>::Snapshot { .. }) {}
}

#[tokio::test]
async fn two_hundred_joins_and_leaves_free_every_peer() {
    let server = TestServer::start_with(|c| {
        long_matches(c);
        c.rooms.seat_hold = Duration::from_mins(1);
        c.webrtc.offer_burst = 1000.0;
    })
    .await;
    let (a, _b) = duel(&server, "cycler", "anchor").await;
    let rtc = server.running.app.hub.rtc().stats();
    let mut rss_after_warmup = 0;
    for cycle in 0..200 {
        // Join: a fresh hub connection sends the seat's ticket again; take it, open WebRTC.
        let mut hub = a.client.hub().await.unwrap();
        let (_, ticket) = hub.match_found(WAIT).await.unwrap();
        let mut room = a.client.room::<Arena>(&ticket).await.unwrap();
        room.open_data_channel(&mut hub, &a.room_name, OPEN).await.unwrap();
        // Leave: the room connection and the hub connection go.
        room.close().await;
        hub.close().await;
        if cycle == 49 {
            wait_for("the peers to be freed", || rtc.peers.load(Relaxed) == 0).await;
            rss_after_warmup = rss_kib();
        }
    }
    wait_for("every peer to be freed", || rtc.peers.load(Relaxed) == 0).await;
    assert_eq!(rtc.peers_opened.load(Relaxed), 200);
    // Memory stays put over the last 150 cycles (a leak of each peer would be ~38 MB).
    let grown = rss_kib().saturating_sub(rss_after_warmup);
    assert!(grown < 12 * 1024, "resident memory grew by {grown} KiB over 150 cycles");
    a.hub.close().await;
}

/// This process's resident memory (server and clients both live in it).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
