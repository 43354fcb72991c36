//! Randomness from the operating system, for tokens and secrets.

/// Fills `buf` with cryptographically secure random bytes.
///
/// # Panics
/// When the operating system cannot provide randomness, which leaves no safe way to go on.
pub fn fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

/// A random 64-bit number (ids, seeds, nonces).
pub fn u64() -> u64 {
    let mut bytes = [0u8; 8];
    fill(&mut bytes);
    u64::from_le_bytes(bytes)
}

/// A random token of 32 bytes (256 bits), URL-safe base64 without padding.
pub fn token() -> String {
    use base64::Engine as _;
    let mut bytes = [0u8; 32];
    fill(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
