//! Room servers as real processes of the built binary, registered with a hub: placement,
//! results recorded once (official or not), tokens, a room server killed, the hub restarted,
//! and a drain on SIGTERM.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rallypoint_load::client::{ClientError, Room};
use rallypoint_server::fleet::tokens;
use shared::arena::Arena;
use shared::hub::ClientMsg;
use shared::room::close;

use crate::rooms::{Player, aborted, count, play_out, player, quick};
use crate::support::TestServer;

const WAIT: Duration = Duration::from_secs(10);

/// A `rallypoint room-server` process, killed when dropped.
pub(crate) struct RoomServer {
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl RoomServer {
    fn command(hub: &str, token: &str, data: &Path) -> Command {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rallypoint"));
        cmd.args(["room-server", "--hub", hub, "--token", token, "--log", "warn", "--drain-timeout", "30"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--public-url", &format!("http://127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data)
            .env_clear()
            .stdout(Stdio::null());
        cmd
    }

    pub(crate) fn start(hub: &str, token: &str, data: &Path) -> Self {
        let child = Self::command(hub, token, data).stderr(Stdio::null()).spawn().unwrap();
        Self { child }
    }

    /// One that registers through the cluster's NATS at `nats` (`--hub` names the site).
    pub(crate) fn start_through_nats(hub: &str, nats: &str, token: &str, data: &Path) -> Self {
        let child = Self::command(hub, token, data).args(["--nats-url", nats]).stderr(Stdio::null()).spawn().unwrap();
        Self { child }
    }

    /// Waits for the process to end by itself; its exit status. (The hub runs on this test's
    /// thread: nothing here may block it.)
    async fn wait(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: sends a signal to our own child process.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

impl Drop for RoomServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the hub counts `n` live room servers.
async fn room_servers(server: &TestServer, n: usize) {
    let deadline = Instant::now() + WAIT;
    while server.running.app.hub.stats().await.unwrap().room_servers != n {
        assert!(Instant::now() < deadline, "the hub never counted {n} room servers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A hub that runs no match itself, and one room server registered with it.
async fn hub_and_room_server(community: bool) -> (TestServer, RoomServer, tempfile::TempDir) {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.local_rooms = false;
    })
    .await;
    let token = tokens::create(&server.running.app.db, "eu-1", community).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let rs = RoomServer::start(&server.base, &token, data.path());
    room_servers(&server, 1).await;
    (server, rs, data)
}

/// Both queue for a duel; each gets its ticket and the room server's address.
async fn matched(a: &mut Player, b: &mut Player) -> (String, String) {
    let ((_, ta), (_, tb)) = matched_in(a, b).await;
    (ta, tb)
}

/// Like [`matched`], with the room's name (for WebRTC signaling) beside each ticket.
pub(crate) async fn matched_in(a: &mut Player, b: &mut Player) -> ((String, String), (String, String)) {
    for p in [&mut *a, &mut *b] {
        p.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    }
    let (ta, tb) = tokio::join!(a.hub.match_found(WAIT), b.hub.match_found(WAIT));
    (ta.unwrap(), tb.unwrap())
}

pub(crate) async fn seat(p: &Player, ticket: &str) -> Result<Room<Arena>, ClientError> {
    p.client.room_at::<Arena>(p.hub.room_url.as_deref(), ticket).await
}

#[tokio::test]
async fn a_match_placed_on_a_room_server_is_played_there_and_recorded_once_as_official() {
    let (server, _rs, data) = hub_and_room_server(false).await;
    let (mut a, mut b) = (player(&server, "far_a").await, player(&server, "far_b").await);
    let ((room, ta), (_, tb)) = matched_in(&mut a, &mut b).await;
    assert!(room.starts_with("eu-1/"), "{room}");
    let url = a.hub.room_url.clone().expect("the match runs on the room server");
    assert_ne!(url, server.base);
    // The hub's own door does not take a room server's ticket.
    assert!(matches!(a.client.room::<Arena>(&ta).await, Err(ClientError::Closed { code: close::TICKET_FOREIGN, .. })));
    let mut ra = seat(&a, &ta).await.unwrap();
    let mut rb = seat(&b, &tb).await.unwrap();
    // Someone else's ticket, a replayed one and a forged one are refused there too.
    assert!(matches!(seat(&b, &ta).await, Err(ClientError::Closed { code: close::TICKET_USED, .. })));
    let forged = format!("{}x", &ta[..ta.len() - 1]);
    assert!(matches!(seat(&a, &forged).await, Err(ClientError::Closed { code: close::TICKET_FORGED, .. })));
    // In-room traffic over WebRTC: signaled through the hub, the peer is the room server's.
    ra.open_data_channel(&mut a.hub, &room, WAIT).await.unwrap();
    for _ in 0..10 {
        ra.recv_timeout(WAIT).await.unwrap();
    }
    assert_eq!(ra.transport(), "webrtc", "the data channel carried the snapshots without failing");
    let ((oa, ratings, snaps), (ob, _, _)) = tokio::join!(play_out(&mut ra), play_out(&mut rb));
    assert_eq!(oa, ob);
    assert!(snaps > 30, "{snaps} snapshots");
    assert_eq!(ratings.len(), 2, "the hub recorded it and answered with the rating changes");
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches WHERE server = 'eu-1' AND official = 1").await, 1);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM ratings WHERE mode = 'duel' AND matches = 1").await, 2);
    // Acknowledged: nothing left on the room server's disk; both players are free again.
    let results = data.path().join("results");
    let deadline = Instant::now() + WAIT;
    while std::fs::read_dir(&results).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "an acknowledged result stayed on disk");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.running.app.hub.stats().await.unwrap().playing, 0);
}

#[tokio::test]
async fn a_community_servers_results_are_history_only() {
    let (server, _rs, _data) = hub_and_room_server(true).await;
    let (mut a, mut b) = (player(&server, "club_a").await, player(&server, "club_b").await);
    let (ta, tb) = matched(&mut a, &mut b).await;
    let (mut ra, mut rb) = (seat(&a, &ta).await.unwrap(), seat(&b, &tb).await.unwrap());
    let ((_, ratings, _), _) = tokio::join!(play_out(&mut ra), play_out(&mut rb));
    assert!(ratings.iter().all(|r| r.after == r.before), "no rating changes: {ratings:?}");
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches WHERE server = 'eu-1' AND official = 0").await, 1);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM ratings").await, 0);
    // The history says so.
    let page = a.client.http().get(format!("{}/u/club_a", server.base)).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("· unofficial (eu-1)") && page.contains("unrated"), "{page}");
}

#[tokio::test]
async fn wrong_and_revoked_tokens_are_refused_and_a_revoked_server_is_dropped() {
    let server = TestServer::start_with(quick).await;
    let db = &server.running.app.db;
    let dir = tempfile::tempdir().unwrap();
    for token in ["rpt_not-a-token".to_owned(), tokens::create(db, "gone", false).await.unwrap()] {
        if token != "rpt_not-a-token" {
            tokens::revoke(db, "gone").await.unwrap();
        }
        let mut cmd = RoomServer::command(&server.base, &token, dir.path());
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("refused this token"), "{stderr}");
    }
    // Connected, then revoked: out within seconds.
    let token = tokens::create(db, "soon-gone", false).await.unwrap();
    let _rs = RoomServer::start(&server.base, &token, dir.path());
    room_servers(&server, 1).await;
    tokens::revoke(db, "soon-gone").await.unwrap();
    room_servers(&server, 0).await;
}

#[tokio::test]
async fn players_of_a_killed_room_server_are_back_in_the_lobby_within_five_seconds() {
    let (server, rs, _data) = hub_and_room_server(false).await;
    let (mut a, mut b) = (player(&server, "kill_a").await, player(&server, "kill_b").await);
    let (ta, tb) = matched(&mut a, &mut b).await;
    let (_ra, _rb) = (seat(&a, &ta).await.unwrap(), seat(&b, &tb).await.unwrap());
    rs.signal(libc::SIGKILL);
    let killed = Instant::now();
    let (ma, mb) = tokio::join!(aborted(&mut a.hub), aborted(&mut b.hub));
    assert!(killed.elapsed() < Duration::from_secs(5), "told after {:?}", killed.elapsed());
    assert!(ma.contains("went away") && mb.contains("No rating changed"), "{ma}");
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches").await, 0);
    let stats = server.running.app.hub.stats().await.unwrap();
    assert_eq!((stats.playing, stats.room_servers), (0, 0));
    // Free to queue again.
    a.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
}

#[tokio::test]
async fn a_result_made_while_the_hub_is_down_is_delivered_once_when_it_is_back() {
    let (server, _rs, data) = hub_and_room_server(false).await;
    let (mut a, mut b) = (player(&server, "wait_a").await, player(&server, "wait_b").await);
    let (ta, tb) = matched(&mut a, &mut b).await;
    let (mut ra, mut rb) = (seat(&a, &ta).await.unwrap(), seat(&b, &tb).await.unwrap());
    // The hub goes away mid-match; the players play on, on the room server.
    let addr = server.running.addr;
    let dir = server.stop().await;
    let ((oa, ratings, _), (ob, _, _)) = tokio::join!(play_out(&mut ra), play_out(&mut rb));
    assert_eq!(oa, ob);
    assert!(ratings.is_empty(), "no hub, no rating changes to show");
    assert_eq!(std::fs::read_dir(data.path().join("results")).unwrap().count(), 1, "the result waits on disk");
    // The hub is back: the room server registers again and delivers the result, once.
    let server = TestServer::restart_at(addr, dir, |c| {
        quick(c);
        c.local_rooms = false;
    })
    .await;
    room_servers(&server, 1).await;
    let deadline = Instant::now() + WAIT;
    while count(&server, "SELECT COUNT(*) FROM matches WHERE server = 'eu-1'").await == 0 {
        assert!(Instant::now() < deadline, "the result never arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches").await, 1);
    assert_eq!(count(&server, "SELECT COUNT(*) FROM ratings WHERE matches = 1").await, 2);
    assert_eq!(std::fs::read_dir(data.path().join("results")).unwrap().count(), 0);
}

#[tokio::test]
async fn sigterm_drains_a_room_server_its_match_finishes_then_it_exits_cleanly() {
    let (server, mut rs, _data) = hub_and_room_server(false).await;
    let (mut a, mut b) = (player(&server, "drain_a").await, player(&server, "drain_b").await);
    let (ta, tb) = matched(&mut a, &mut b).await;
    let (mut ra, mut rb) = (seat(&a, &ta).await.unwrap(), seat(&b, &tb).await.unwrap());
    rs.signal(libc::SIGTERM);
    // No new match goes there while it drains: these two wait in the queue.
    let (mut c, mut d) = (player(&server, "drain_c").await, player(&server, "drain_d").await);
    for p in [&mut c, &mut d] {
        p.hub.send(&ClientMsg::FindMatch { mode: "duel".into() }).await.unwrap();
    }
    let ((_, ratings, _), _) = tokio::join!(play_out(&mut ra), play_out(&mut rb));
    assert_eq!(ratings.len(), 2, "the running match finished and was recorded");
    let status = rs.wait(WAIT).await.expect("the drained room server exits");
    assert!(status.success(), "{status}");
    assert!(c.hub.match_found(Duration::from_secs(1)).await.is_err(), "nothing was placed on a draining server");
    assert_eq!(count(&server, "SELECT COUNT(*) FROM matches").await, 1);
}

#[tokio::test]
async fn a_room_server_reaches_an_https_hub_trusting_its_certificate() {
    let certs = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key_file) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&key_file, key.signing_key.serialize_pem()).unwrap();
    let tls = rallypoint_server::tls::load(&cert, &key_file).unwrap();
    let server = TestServer::start_with(|c| c.tls = Some(tls)).await;
    let hub = format!("https://{}", server.running.addr);
    let token = tokens::create(&server.running.app.db, "tls-1", false).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    // Not trusting the hub's certificate: one clear line, and no registration.
    let mut cmd = RoomServer::command(&hub, &token, data.path());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("cannot reach the hub"), "{stderr}");
    // Trusting it with --hub-ca: registered.
    let mut cmd = RoomServer::command(&hub, &token, data.path());
    cmd.arg("--hub-ca").arg(&cert).stderr(Stdio::null());
    let _rs = RoomServer { child: cmd.spawn().unwrap() };
    room_servers(&server, 1).await;
}

/// The control connection, spoken by hand: a registration of another version, garbage, and an
/// oversized message each get a clean close with a reason; none of them registers anything.
#[tokio::test]
async fn the_control_connection_refuses_other_versions_and_bad_messages_with_a_reason() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use rallypoint_server::fleet::control::{self, FromServer};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
    let server = TestServer::start_with(quick).await;
    let token = tokens::create(&server.running.app.db, "manual", false).await.unwrap();
    let connect = || async {
        let url = format!("ws://{}{}", server.running.addr, control::PATH);
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(request).await.unwrap().0
    };
    let register = |control_version, public_url: &str| FromServer::Register {
        control_version,
        room_protocol: shared::room::ROOM_PROTOCOL_VERSION,
        public_url: public_url.into(),
        free: 1,
        running: Vec::new(),
        registered_ms: 1,
    };
    let cases: Vec<(Message, u16, &str)> = vec![
        (Message::text(register(99, "http://127.0.0.1:9").to_json()), control::close::VERSION, "same release"),
        (Message::text(register(control::CONTROL_VERSION, "javascript:alert(1)").to_json()), 1008, "public URL"),
        (Message::text("{\"type\":\"load\",\"free\":1,\"draining\":false}"), 1008, "registration"),
        (Message::text("not json"), 1008, "unreadable"),
        (Message::binary(vec![1, 2, 3]), 1008, "JSON text"),
        (Message::text("x".repeat(control::MAX_MESSAGE + 1)), 1009, "too big"),
    ];
    for (msg, code, reason) in cases {
        let mut socket = connect().await;
        let _ = socket.send(msg).await;
        let close = loop {
            match tokio::time::timeout(WAIT, socket.next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => {}
                _ => break None,
            }
        };
        let frame = close.unwrap_or_else(|| panic!("a close frame for {code} {reason:?}"));
        assert_eq!(u16::from(frame.code), code, "{frame:?}");
        assert!(frame.reason.contains(reason), "{frame:?}");
    }
    assert_eq!(server.running.app.hub.stats().await.unwrap().room_servers, 0);
    // Without a token, or with another, the upgrade itself is refused.
    let url = format!("ws://{}{}", server.running.addr, control::PATH);
    let refused = tokio_tungstenite::connect_async(url).await;
    assert!(matches!(refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 401));
}

#[tokio::test]
async fn matches_spread_over_two_room_servers_by_free_rooms() {
    let server = TestServer::start_with(|c| {
        quick(c);
        c.local_rooms = false;
    })
    .await;
    let db = &server.running.app.db;
    let (data_a, data_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _a = RoomServer::start(&server.base, &tokens::create(db, "rs-a", false).await.unwrap(), data_a.path());
    let _b = RoomServer::start(&server.base, &tokens::create(db, "rs-b", false).await.unwrap(), data_b.path());
    room_servers(&server, 2).await;
    // Two matches at once: the second goes where more rooms are free, the other server.
    let mut urls = std::collections::BTreeSet::new();
    let mut rooms = Vec::new();
    for pair in 0..2 {
        let (mut p, mut q) =
            (player(&server, &format!("two_{pair}a")).await, player(&server, &format!("two_{pair}b")).await);
        let (tp, tq) = matched(&mut p, &mut q).await;
        assert_eq!(p.hub.room_url, q.hub.room_url, "a match runs in one place");
        urls.insert(p.hub.room_url.clone().unwrap());
        rooms.push((seat(&p, &tp).await.unwrap(), seat(&q, &tq).await.unwrap()));
    }
    for (mut rp, mut rq) in rooms {
        let ((_, ratings, _), _) = tokio::join!(play_out(&mut rp), play_out(&mut rq));
        assert_eq!(ratings.len(), 2);
    }
    assert_eq!(urls.len(), 2, "one match on each room server: {urls:?}");
    assert_eq!(count(&server, "SELECT COUNT(DISTINCT server) FROM matches").await, 2);
}
