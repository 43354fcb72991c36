//! The decoders that read bytes from the network, one entry point each, for the fuzz targets in
//! `fuzz/` (`cargo xtask fuzz`) and the corpus replay in `cargo xtask test`. Whatever the bytes,
//! none may panic, hang or allocate without bound; what they decode is thrown away.

use shared::arena::{Arena, ArenaInput, ArenaView};
use shared::game::Game as _;
use shared::hub::{ClientMsg, ServerMsg};
use shared::room::{FromRoomOf, JoinRequest, ToRoom};

use crate::rooms::TicketSigner;

/// A decoder's entry point.
pub type Target = fn(&[u8]);

/// Every target, by name (the folder names under `fuzz/corpus/`).
pub const TARGETS: [(&str, Target); 7] = [
    ("hub_message", hub_message),
    ("control_message", control_message),
    ("room_frame", room_frame),
    ("ticket", ticket),
    ("sdp_offer", sdp_offer),
    ("ice_candidate", ice_candidate),
    ("form", form),
];

/// Hub WebSocket text: what the server reads from browsers, and what browsers read from it.
pub fn hub_message(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ClientMsg::from_json(text);
        let _ = serde_json::from_str::<ServerMsg>(text);
    }
}

/// What travels between hub and room servers and between hub instances (JSON): room servers'
/// control messages both ways, a registration over NATS (read before any token is checked) and
/// its envelope, and the cluster bus's notes.
pub fn control_message(data: &[u8]) {
    use crate::fleet::control::{FromHub, FromServer, nats};
    let _ = serde_json::from_slice::<FromServer>(data);
    let _ = serde_json::from_slice::<FromHub>(data);
    let _ = serde_json::from_slice::<nats::Registration>(data);
    let _ = serde_json::from_slice::<nats::Down>(data);
    let _ = crate::bus::decode(data);
}

/// Room frames (bitcode), over the WebSocket or a data channel: the join request and inputs the
/// room reads, and the snapshots the client reads.
pub fn room_frame(data: &[u8]) {
    let _ = JoinRequest::decode(data);
    let _ = bitcode::Buffer::new().decode::<ToRoom<ArenaInput>>(data);
    if let Ok(FromRoomOf::<Arena>::Delta { back, delta, .. }) = FromRoomOf::<Arena>::decode(data) {
        // What a client does with a delta: patch a view it holds.
        static BASE: std::sync::OnceLock<ArenaView> = std::sync::OnceLock::new();
        let base = BASE.get_or_init(|| {
            let setup = shared::game::MatchSetup { players: 2, tick_hz: 30, seed: 1, time_limit_secs: None };
            let mut arena = Arena::new(&Arena::modes()[0], &setup);
            arena.set_present(0, true);
            arena.set_present(1, true);
            arena.view(0)
        });
        let _ = Arena::patch(base, &delta, u32::from(back));
    }
}

/// A room ticket as a client presents it.
pub fn ticket(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        static SIGNER: std::sync::OnceLock<TicketSigner> = std::sync::OnceLock::new();
        let _ = SIGNER.get_or_init(|| TicketSigner::from_seed(&[7; 32])).verifier().verify(text, 0);
    }
}

/// A browser's SDP offer, as the hub relays it to the WebRTC server.
pub fn sdp_offer(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        crate::transport::webrtc::fuzz_offer(text);
    }
}

/// A trickled ICE candidate line.
pub fn ice_candidate(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        crate::transport::webrtc::fuzz_candidate(text);
    }
}

/// Form bodies and query strings of the site.
pub fn form(data: &[u8]) {
    let _ = serde_urlencoded::from_bytes::<crate::site::AuthForm>(data);
    let _ = serde_urlencoded::from_bytes::<crate::site::CsrfForm>(data);
    let _ = serde_urlencoded::from_bytes::<crate::site::PageQuery>(data).map(|q| q.page());
}

/// A Chromium offer for one data channel, as the hub relays it.
const OFFER: &str = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
a=group:BUNDLE 0\r\na=extmap-allow-mixed\r\na=msid-semantic: WMS\r\n\
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\n\
a=ice-ufrag:Vx9q\r\na=ice-pwd:xK5bU1Ylt0QQIb3YSsNfBHjp\r\na=ice-options:trickle\r\n\
a=fingerprint:sha-256 6B:8B:5D:EA:59:04:20:23:29:C8:87:1C:CC:87:32:BE:DD:8C:66:A5:8E:50:55:EA:8C:D3:B6:5C:09:5E:D6:BC\r\n\
a=setup:actpass\r\na=mid:0\r\na=sctp-port:5000\r\na=max-message-size:262144\r\n";

/// Valid examples of what each target reads, to start the fuzzer from (written into
/// `fuzz/corpus/<target>/` by `cargo xtask fuzz`) and to replay in the tests.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use shared::hub::PROTOCOL_VERSION;
    use shared::room::ROOM_PROTOCOL_VERSION;
    let json = |m: &ClientMsg| serde_json::to_vec(m).unwrap_or_default();
    let ticket = TicketSigner::from_seed(&[7; 32]).sign(&crate::rooms::Ticket {
        server: 0,
        room: crate::rooms::RoomId { slot: 3, number: 9 },
        user_id: 42,
        seat: 1,
        expires_ms: i64::MAX,
        nonce: 7,
    });
    let inputs = ToRoom::Inputs { first_seq: 1, tick: 10, seen: 9, inputs: vec![ArenaInput::default(); 3] };
    let register = crate::fleet::control::FromServer::Register {
        control_version: crate::fleet::control::CONTROL_VERSION,
        room_protocol: ROOM_PROTOCOL_VERSION,
        public_url: "https://r1.example.com:9000".into(),
        free: 100,
        running: Vec::new(),
        registered_ms: 1,
    };
    let registration = crate::fleet::control::nats::Registration { token: "rpt_x".into(), session: 7, register };
    let note =
        crate::bus::Note::Seek { from: 1, conn: 2, user: shared::hub::UserSummary { id: 3, name: "ann".into() } };
    vec![
        ("hub_message", json(&ClientMsg::Hello { version: PROTOCOL_VERSION })),
        ("control_message", serde_json::to_vec(&registration).unwrap_or_default()),
        ("control_message", crate::fleet::control::nats::Down::Beat.to_json()),
        ("control_message", serde_json::to_vec(&note).unwrap_or_default()),
        ("hub_message", json(&ClientMsg::Chat { text: "gl hf \u{1F44B}".into() })),
        ("hub_message", json(&ClientMsg::FindMatch { mode: "duel".into() })),
        ("room_frame", JoinRequest { version: ROOM_PROTOCOL_VERSION, ticket: ticket.clone() }.encode()),
        ("room_frame", inputs.encode()),
        ("room_frame", ToRoom::<ArenaInput>::Ping { id: 5 }.encode()),
        ("ticket", ticket.into_bytes()),
        ("sdp_offer", OFFER.as_bytes().to_vec()),
        (
            "ice_candidate",
            b"candidate:842163049 1 udp 1677729535 203.0.113.7 51234 typ srflx raddr 0.0.0.0 rport 0 generation 0"
                .to_vec(),
        ),
        (
            "ice_candidate",
            b"candidate:1 1 udp 2122260223 3a4b7c1e-0f5d-4b0e-9d1e-2f3c4d5e6f70.local 54321 typ host".to_vec(),
        ),
        ("form", b"username=alice&password=a+long+password&password_confirm=a+long+password&csrf=x".to_vec()),
        ("form", b"page=2&mode=duel".to_vec()),
    ]
}
