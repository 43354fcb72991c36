//! Room tickets: signed with Ed25519, short-lived, single-use, bound to one user, one room and
//! one seat on one room server. The hub signs them with a private key that never leaves it; a
//! room checks them with the public key alone, so a room in another process (a room server,
//! perhaps a community's) can admit players but never mint a ticket. The key's seed lives in
//! the database, so every hub instance signs with the same key.

use std::fmt;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Identifies one match: the room slot that runs it and the match's number in that slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomId {
    pub slot: u32,
    pub number: u32,
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "r{}-{}", self.slot, self.number)
    }
}

/// The server number of rooms that run inside the hub's own process.
pub const LOCAL_SERVER: u32 = 0;

/// What a ticket grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The room server that hosts the room ([`LOCAL_SERVER`] for this process's own rooms).
    pub server: u32,
    pub room: RoomId,
    pub user_id: i64,
    pub seat: u8,
    /// Unix milliseconds after which the ticket is refused.
    pub expires_ms: i64,
    /// Makes each ticket unique, so that a room can refuse a second use.
    pub nonce: u64,
}

/// Why a ticket is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("ticket forged or malformed")]
    Forged,
    #[error("ticket expired")]
    Expired,
    #[error("ticket already used")]
    Used,
    #[error("ticket for another player or room")]
    Foreign,
    #[error("the match is over")]
    Over,
}

impl TicketError {
    /// The close code a room connection is closed with.
    pub fn close_code(self) -> u16 {
        use shared::room::close;
        match self {
            Self::Forged => close::TICKET_FORGED,
            Self::Expired => close::TICKET_EXPIRED,
            Self::Used => close::TICKET_USED,
            Self::Foreign => close::TICKET_FOREIGN,
            Self::Over => close::MATCH_OVER,
        }
    }
}

const PAYLOAD: usize = 4 + 4 + 4 + 8 + 1 + 8 + 8;
const SIGNATURE: usize = 64;
/// Longest ticket text accepted: base64 of the payload and the signature, and a dot.
const MAX_TICKET: usize = 4 * (PAYLOAD + SIGNATURE) / 3 + 4;

/// Signs tickets: the hub's Ed25519 private key.
pub struct TicketSigner {
    pair: Ed25519KeyPair,
    verifier: TicketVerifier,
}

impl fmt::Debug for TicketSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketSigner(…)")
    }
}

/// Checks tickets: the hub's public key, which is all a room needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketVerifier([u8; 32]);

impl TicketSigner {
    /// The key pair derived from a 32-byte secret seed.
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are an Ed25519 seed");
        let mut public = [0u8; 32];
        public.copy_from_slice(pair.public_key().as_ref());
        Self { pair, verifier: TicketVerifier(public) }
    }

    /// What checks this signer's tickets.
    pub fn verifier(&self) -> &TicketVerifier {
        &self.verifier
    }

    /// An Ed25519 signature of `message` (callers prefix their own context).
    pub fn sign_bytes(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }

    /// `base64url(payload).base64url(signature)`.
    pub fn sign(&self, t: &Ticket) -> String {
        let mut payload = Vec::with_capacity(PAYLOAD);
        payload.extend_from_slice(&t.server.to_be_bytes());
        payload.extend_from_slice(&t.room.slot.to_be_bytes());
        payload.extend_from_slice(&t.room.number.to_be_bytes());
        payload.extend_from_slice(&t.user_id.to_be_bytes());
        payload.push(t.seat);
        payload.extend_from_slice(&t.expires_ms.to_be_bytes());
        payload.extend_from_slice(&t.nonce.to_be_bytes());
        let signature = self.pair.sign(&payload);
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(signature.as_ref()))
    }
}

impl TicketVerifier {
    /// A public key as sent over the wire.
    pub fn from_bytes(public: [u8; 32]) -> Self {
        Self(public)
    }

    /// The public key's bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }

    /// Whether `signature` is this key's over `message`.
    pub fn verify_bytes(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.0).verify(message, signature).is_ok()
    }

    /// Checks the signature and the expiry.
    pub fn verify(&self, ticket: &str, now_ms: i64) -> Result<Ticket, TicketError> {
        if ticket.len() > MAX_TICKET {
            return Err(TicketError::Forged);
        }
        let (payload, signature) = ticket.split_once('.').ok_or(TicketError::Forged)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TicketError::Forged)?;
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| TicketError::Forged)?;
        let p: &[u8; PAYLOAD] = payload.as_slice().try_into().map_err(|_| TicketError::Forged)?;
        UnparsedPublicKey::new(&ED25519, &self.0).verify(p, &signature).map_err(|_| TicketError::Forged)?;
        let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or_default());
        let t = Ticket {
            server: u32_at(0),
            room: RoomId { slot: u32_at(4), number: u32_at(8) },
            user_id: u64_at(12).cast_signed(),
            seat: p[20],
            expires_ms: u64_at(21).cast_signed(),
            nonce: u64_at(29),
        };
        if now_ms > t.expires_ms {
            return Err(TicketError::Expired);
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket() -> Ticket {
        Ticket { server: 2, room: RoomId { slot: 3, number: 9 }, user_id: 42, seat: 1, expires_ms: 10_000, nonce: 77 }
    }

    #[test]
    fn a_signed_ticket_verifies_with_the_public_key_until_it_expires() {
        let signer = TicketSigner::from_seed(&[7; 32]);
        let signed = signer.sign(&ticket());
        let verifier = TicketVerifier::from_bytes(signer.verifier().to_bytes());
        assert_eq!(verifier.verify(&signed, 9_999), Ok(ticket()));
        assert_eq!(verifier.verify(&signed, 10_001), Err(TicketError::Expired));
        assert!(signed.len() <= MAX_TICKET, "{} > {MAX_TICKET}", signed.len());
    }

    #[test]
    fn tampered_or_foreign_key_tickets_are_forged() {
        let signer = TicketSigner::from_seed(&[7; 32]);
        let signed = signer.sign(&ticket());
        let other_hub = TicketSigner::from_seed(&[8; 32]);
        assert_eq!(other_hub.verifier().verify(&signed, 0), Err(TicketError::Forged));
        // A ticket signed by another key is refused even though its payload is genuine.
        assert_eq!(signer.verifier().verify(&other_hub.sign(&ticket()), 0), Err(TicketError::Forged));
        // Change the user id or the server in the payload, keep the signature.
        for changed in [Ticket { user_id: 43, ..ticket() }, Ticket { server: 1, ..ticket() }] {
            let other = signer.sign(&changed);
            let spliced = format!("{}.{}", other.split('.').next().unwrap(), signed.split('.').nth(1).unwrap());
            assert_eq!(signer.verifier().verify(&spliced, 0), Err(TicketError::Forged));
        }
        for junk in ["", ".", "abc", "a.b", &"x".repeat(500), "!!!.???"] {
            assert_eq!(signer.verifier().verify(junk, 0), Err(TicketError::Forged), "{junk}");
        }
    }
}
