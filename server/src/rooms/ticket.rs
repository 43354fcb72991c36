//! Room tickets: signed (HMAC-SHA256), short-lived, single-use, bound to one user, one room and
//! one seat. The hub issues them; the room door checks them. The key lives in the database, so
//! every instance of the server (and a room in another process, later) shares it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

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

/// What a ticket grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
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

const PAYLOAD: usize = 4 + 4 + 8 + 1 + 8 + 8;

/// The key that signs tickets.
#[derive(Clone)]
pub struct TicketKey([u8; 32]);

impl fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKey(…)")
    }
}

impl TicketKey {
    pub fn new(key: [u8; 32]) -> Self {
        Self(key)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }

    /// `base64url(payload).base64url(hmac)`.
    pub fn sign(&self, t: &Ticket) -> String {
        let mut payload = Vec::with_capacity(PAYLOAD);
        payload.extend_from_slice(&t.room.slot.to_be_bytes());
        payload.extend_from_slice(&t.room.number.to_be_bytes());
        payload.extend_from_slice(&t.user_id.to_be_bytes());
        payload.push(t.seat);
        payload.extend_from_slice(&t.expires_ms.to_be_bytes());
        payload.extend_from_slice(&t.nonce.to_be_bytes());
        let mut mac = self.mac();
        mac.update(&payload);
        let tag = mac.finalize().into_bytes();
        format!("{}.{}", URL_SAFE_NO_PAD.encode(&payload), URL_SAFE_NO_PAD.encode(tag))
    }

    /// Checks the signature (in constant time) and the expiry.
    pub fn verify(&self, ticket: &str, now_ms: i64) -> Result<Ticket, TicketError> {
        if ticket.len() > 200 {
            return Err(TicketError::Forged);
        }
        let (payload, tag) = ticket.split_once('.').ok_or(TicketError::Forged)?;
        let payload = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TicketError::Forged)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TicketError::Forged)?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&tag).map_err(|_| TicketError::Forged)?;
        let p: &[u8; PAYLOAD] = payload.as_slice().try_into().map_err(|_| TicketError::Forged)?;
        let u32_at = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
        let u64_at = |i: usize| u64::from_be_bytes(p[i..i + 8].try_into().unwrap_or_default());
        let t = Ticket {
            room: RoomId { slot: u32_at(0), number: u32_at(4) },
            user_id: u64_at(8).cast_signed(),
            seat: p[16],
            expires_ms: u64_at(17).cast_signed(),
            nonce: u64_at(25),
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
        Ticket { room: RoomId { slot: 3, number: 9 }, user_id: 42, seat: 1, expires_ms: 10_000, nonce: 77 }
    }

    #[test]
    fn a_signed_ticket_verifies_until_it_expires() {
        let key = TicketKey::new([7; 32]);
        let signed = key.sign(&ticket());
        assert_eq!(key.verify(&signed, 9_999), Ok(ticket()));
        assert_eq!(key.verify(&signed, 10_001), Err(TicketError::Expired));
    }

    #[test]
    fn tampered_or_foreign_key_tickets_are_forged() {
        let key = TicketKey::new([7; 32]);
        let signed = key.sign(&ticket());
        assert_eq!(TicketKey::new([8; 32]).verify(&signed, 0), Err(TicketError::Forged));
        // Change the user id in the payload, keep the tag.
        let other = key.sign(&Ticket { user_id: 43, ..ticket() });
        let spliced = format!("{}.{}", other.split('.').next().unwrap(), signed.split('.').nth(1).unwrap());
        assert_eq!(key.verify(&spliced, 0), Err(TicketError::Forged));
        for junk in ["", ".", "abc", "a.b", &"x".repeat(500), "!!!.???"] {
            assert_eq!(key.verify(junk, 0), Err(TicketError::Forged), "{junk}");
        }
    }
}
