//! DTLS implementation using dimpl with AWS-LC-RS backend.

use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use dimpl::crypto::{Buf, HashAlgorithm, KeyProvider, SignatureAlgorithm, SigningKey};
use str0m_proto::crypto::CryptoError;
use str0m_proto::crypto::DtlsVersion;
use str0m_proto::crypto::dtls::ProtocolVersion;
use str0m_proto::crypto::dtls::{DtlsCert, DtlsImplError, DtlsInstance, DtlsOutput, DtlsProvider};

// ============================================================================
// DTLS Provider Implementation
// ============================================================================

#[derive(Debug)]
pub(super) struct AwsLcRsDtlsProvider;

impl DtlsProvider for AwsLcRsDtlsProvider {
    fn generate_certificate(&self) -> Option<DtlsCert> {
        // Use dimpl's rcgen-based certificate generation (with aws-lc-rs backend)
        dimpl::certificate::generate_self_signed_certificate()
            .ok()
            .map(|cert| DtlsCert {
                certificate: cert.certificate,
                private_key: cert.private_key,
            })
    }

    fn new_dtls(
        &self,
        cert: &DtlsCert,
        now: Instant,
        dtls_version: DtlsVersion,
        mtu: Option<usize>,
    ) -> Result<Box<dyn DtlsInstance>, CryptoError> {
        let dimpl_cert = dimpl::DtlsCertificate {
            certificate: cert.certificate.clone(),
            private_key: cert.private_key.clone(),
        };

        // Rallypoint patch: the dimpl Config is built once per MTU and shared by every
        // instance. Building it validates the crypto provider, which runs a live key exchange
        // on every group (X25519, P-256, P-384): in a storm of peers opening at once, that was
        // ~17% of the server's CPU, for a result that cannot change within a process.
        let is_test = self.is_test();
        let cached = if is_test { None } else { cached_config(mtu) };
        let config = match cached {
            Some(config) => config,
            None => {
                // Create a default dimpl Config with AWS-LC-RS crypto provider
                // ICE verifies return routability before DTLS, making server cookies redundant.
                let mut builder = dimpl::Config::builder()
                    .use_server_cookie(false)
                    .with_crypto_provider(dimpl::crypto::CryptoProvider {
                        key_provider: &SHARED_KEYS,
                        ..dimpl::crypto::aws_lc_rs::default_provider()
                    });
                if let Some(mtu) = mtu {
                    builder = builder.mtu(mtu);
                }
                if is_test {
                    // We need the DTLS impl to be deterministic for the BWE tests.
                    builder = builder.dangerously_set_rng_seed(42);
                }

                let config = builder.build().map_err(|e| {
                    CryptoError::Other(format!("dimpl config creation failed: {}", e))
                })?;

                let config = Arc::new(config);
                if !is_test {
                    cache_config(mtu, &config);
                }
                config
            }
        };
        let dtls = match dtls_version {
            DtlsVersion::Dtls12 => dimpl::Dtls::new_12(config, dimpl_cert, now),
            DtlsVersion::Dtls13 => dimpl::Dtls::new_13(config, dimpl_cert, now),
            DtlsVersion::Auto => dimpl::Dtls::new_auto(config, dimpl_cert, now),
            _ => {
                return Err(CryptoError::Other(format!(
                    "Unsupported DTLS version: {dtls_version}"
                )));
            }
        };

        Ok(Box::new(AwsLcRsDtlsInstance { dtls }))
    }
}

/// Rallypoint patch: the dimpl Configs built so far, by MTU (a process uses one or two).
static CONFIGS: std::sync::Mutex<Vec<(Option<usize>, Arc<dimpl::Config>)>> =
    std::sync::Mutex::new(Vec::new());

fn cached_config(mtu: Option<usize>) -> Option<Arc<dimpl::Config>> {
    let configs = CONFIGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    configs
        .iter()
        .find(|(m, _)| *m == mtu)
        .map(|(_, c)| Arc::clone(c))
}

fn cache_config(mtu: Option<usize>, config: &Arc<dimpl::Config>) {
    let mut configs = CONFIGS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !configs.iter().any(|(m, _)| *m == mtu) {
        configs.push((mtu, Arc::clone(config)));
    }
}

/// Rallypoint patch: every DTLS instance parsed its certificate's private key anew, though a
/// process signs with one key (str0m's `RtcConfig` holds one certificate for all its peers):
/// ~45 µs per peer, half of `Rtc::new`, in a storm of peers opening at once, and a parsed key
/// (aws-lc's `EC_KEY`) held by each peer for its whole life. The keys parsed here are shared.
static SHARED_KEYS: SharedKeys = SharedKeys::new();

/// Distinct keys kept at most (a process that makes a certificate per peer keeps only its
/// last few; Rallypoint's server and bots each use one).
const SHARED_KEYS_KEPT: usize = 4;

/// Rallypoint patch: a key provider that parses each P-256 PKCS#8 key once and hands out
/// shared signers of it. Any other key goes to dimpl's own provider, parsed every time.
#[derive(Debug)]
struct SharedKeys {
    keys: std::sync::Mutex<Vec<(Vec<u8>, Arc<EcdsaKeyPair>)>>,
}

impl SharedKeys {
    const fn new() -> Self {
        Self {
            keys: std::sync::Mutex::new(Vec::new()),
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    fn holds(&self, key_der: &[u8]) -> bool {
        self.lock().iter().any(|(der, _)| der == key_der)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<u8>, Arc<EcdsaKeyPair>)>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl KeyProvider for SharedKeys {
    fn load_private_key(&self, key_der: &[u8]) -> Result<Box<dyn SigningKey>, dimpl::CryptoError> {
        let mut keys = self.lock();
        if let Some((_, pair)) = keys.iter().find(|(der, _)| der == key_der) {
            return Ok(Box::new(SharedP256Key(Arc::clone(pair))));
        }
        let Ok(pair) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_der) else {
            drop(keys);
            return dimpl::crypto::aws_lc_rs::default_provider()
                .key_provider
                .load_private_key(key_der);
        };
        let pair = Arc::new(pair);
        if keys.len() >= SHARED_KEYS_KEPT {
            keys.remove(0);
        }
        keys.push((key_der.to_vec(), Arc::clone(&pair)));
        Ok(Box::new(SharedP256Key(pair)))
    }
}

/// Rallypoint patch: a P-256 ECDSA signer of a shared key (what dimpl's own provider makes of
/// such a key, without owning it).
#[derive(Debug)]
struct SharedP256Key(Arc<EcdsaKeyPair>);

impl SigningKey for SharedP256Key {
    fn sign(
        &mut self,
        data: &[u8],
        hash_alg: HashAlgorithm,
        out: &mut Buf,
    ) -> Result<(), dimpl::CryptoError> {
        if hash_alg != HashAlgorithm::SHA256 {
            return Err(dimpl::CryptoError::SigningKeyHashMismatch {
                key_hash: HashAlgorithm::SHA256,
                requested: hash_alg,
            });
        }
        let signature = self
            .0
            .sign(&aws_lc_rs::rand::SystemRandom::new(), data)
            .map_err(|_| dimpl::CryptoError::OperationFailed(dimpl::CryptoOperation::Sign))?;
        out.clear();
        out.extend_from_slice(signature.as_ref());
        Ok(())
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ECDSA
    }

    fn hash_algorithm(&self) -> HashAlgorithm {
        HashAlgorithm::SHA256
    }

    fn supported_hash_algorithms(&self) -> &[HashAlgorithm] {
        &[HashAlgorithm::SHA256]
    }
}

// ============================================================================
// DTLS Instance Wrapper
// ============================================================================

struct AwsLcRsDtlsInstance {
    dtls: dimpl::Dtls,
}

impl std::fmt::Debug for AwsLcRsDtlsInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsLcRsDtlsInstance").finish()
    }
}

impl DtlsInstance for AwsLcRsDtlsInstance {
    fn set_active(&mut self, active: bool) {
        self.dtls.set_active(active);
    }

    fn handle_packet(&mut self, packet: &[u8]) -> Result<(), DtlsImplError> {
        self.dtls.handle_packet(packet)
    }

    fn poll_output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
        // Rallypoint patch: the SRTP keying material is not handed on. It is what makes str0m
        // build its two SRTP contexts (a ~2 KB scratch buffer and two AES keys each) for every
        // peer, and Rallypoint's peers carry data channels only, never media: that was ~10% of
        // a peer's memory, for keys that are never used.
        let again: *mut [u8] = &raw mut *buf;
        match self.dtls.poll_output(buf) {
            DtlsOutput::KeyingMaterial(..) => {
                // SAFETY: the output that borrowed `buf` is dropped in this arm, so nothing
                // borrows it any more; the borrow checker cannot see that a borrow returned
                // from the other arm ends here (NLL "problem case #3", which Polonius accepts).
                #[allow(unsafe_code)]
                let buf = unsafe { &mut *again };
                self.poll_output(buf)
            }
            other => other,
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Result<(), DtlsImplError> {
        self.dtls.handle_timeout(now)
    }

    fn send_application_data(&mut self, data: &[u8]) -> Result<usize, DtlsImplError> {
        self.dtls.send_application_data(data)
    }

    fn is_active(&self) -> bool {
        self.dtls.is_active()
    }

    fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.dtls.protocol_version()
    }

    fn is_closing(&self) -> bool {
        self.dtls.is_closing()
    }

    fn is_closed(&self) -> bool {
        self.dtls.is_closed()
    }

    fn close(&mut self) -> Result<(), DtlsImplError> {
        self.dtls.close()
    }
}

/// Rallypoint patch's test: a handshake between two instances completes, and neither hands on
/// SRTP keying material, which plain dimpl (the same handshake, unwrapped) does.
#[cfg(test)]
mod tests {
    use super::*;

    /// What one side of a handshake reported: connected, and how many keying materials.
    #[derive(Default, Debug, PartialEq)]
    struct Seen {
        connected: bool,
        keying_materials: usize,
    }

    /// One end of a handshake: the backend's instance, or dimpl's own.
    trait End {
        fn output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a>;
        fn packet(&mut self, packet: &[u8]);
        fn timeout(&mut self, now: Instant);

        /// The next packet to deliver, or `None` when it is time to wait; notes what it saw.
        fn next(&mut self, buf: &mut [u8], seen: &mut Seen) -> Option<Vec<u8>> {
            loop {
                match self.output(buf) {
                    DtlsOutput::Packet(p) => return Some(p.to_vec()),
                    DtlsOutput::Timeout(_) => return None,
                    DtlsOutput::Connected => seen.connected = true,
                    DtlsOutput::KeyingMaterial(..) => seen.keying_materials += 1,
                    _ => {}
                }
            }
        }
    }

    impl End for Box<dyn DtlsInstance> {
        fn output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
            self.poll_output(buf)
        }
        fn packet(&mut self, packet: &[u8]) {
            self.handle_packet(packet).unwrap();
        }
        fn timeout(&mut self, now: Instant) {
            self.handle_timeout(now).unwrap();
        }
    }

    impl End for dimpl::Dtls {
        fn output<'a>(&mut self, buf: &'a mut [u8]) -> DtlsOutput<'a> {
            self.poll_output(buf)
        }
        fn packet(&mut self, packet: &[u8]) {
            self.handle_packet(packet).unwrap();
        }
        fn timeout(&mut self, now: Instant) {
            self.handle_timeout(now).unwrap();
        }
    }

    /// Runs a DTLS 1.2 handshake between a client and a server.
    fn handshake<D: End>(mut client: D, mut server: D) -> (Seen, Seen) {
        let (mut seen_client, mut seen_server) = (Seen::default(), Seen::default());
        let mut buf = vec![0; 2048];
        client.timeout(Instant::now());
        server.timeout(Instant::now());
        for _ in 0..50 {
            while let Some(p) = client.next(&mut buf, &mut seen_client) {
                server.packet(&p);
            }
            while let Some(p) = server.next(&mut buf, &mut seen_server) {
                client.packet(&p);
            }
            if seen_client.connected && seen_server.connected {
                break;
            }
        }
        (seen_client, seen_server)
    }

    fn pair() -> (DtlsCert, DtlsCert) {
        let provider = AwsLcRsDtlsProvider;
        (
            provider.generate_certificate().unwrap(),
            provider.generate_certificate().unwrap(),
        )
    }

    #[test]
    fn the_handshake_completes_without_handing_on_srtp_keys() {
        let (a, b) = pair();
        let now = Instant::now();
        let new = |cert: &DtlsCert, active: bool| {
            let mut d = AwsLcRsDtlsProvider
                .new_dtls(cert, now, DtlsVersion::Dtls12, None)
                .unwrap();
            d.set_active(active);
            d
        };
        let (client, server) = handshake(new(&a, true), new(&b, false));
        let done = || Seen {
            connected: true,
            keying_materials: 0,
        };
        assert_eq!((client, server), (done(), done()));

        // The same handshake with dimpl itself does export them: the patch is what removes them.
        let (a, b) = pair();
        let config = Arc::new(
            dimpl::Config::builder()
                .use_server_cookie(false)
                .build()
                .unwrap(),
        );
        let new = |cert: DtlsCert, active: bool| {
            let cert = dimpl::DtlsCertificate {
                certificate: cert.certificate,
                private_key: cert.private_key,
            };
            let mut d = dimpl::Dtls::new_12(Arc::clone(&config), cert, now);
            d.set_active(active);
            d
        };
        let (client, server) = handshake(new(a, true), new(b, false));
        assert!(client.connected && server.connected);
        assert_eq!((client.keying_materials, server.keying_materials), (1, 1));
    }

    /// Rallypoint patch's test: a key is parsed once and its signers, shared by every instance,
    /// make signatures that the certificate verifies; a handshake of two instances on one
    /// certificate works (both sign with the one parsed key), and a new key pushes the oldest out.
    #[test]
    fn a_key_is_parsed_once_and_every_signer_of_it_signs() {
        let keys = SharedKeys::new();
        let cert = AwsLcRsDtlsProvider.generate_certificate().unwrap();
        let provider = dimpl::crypto::aws_lc_rs::default_provider();
        let mut signers = [(); 2].map(|()| keys.load_private_key(&cert.private_key).unwrap());
        assert_eq!(keys.kept(), 1);
        for signer in &mut signers {
            let mut signature = Buf::new();
            signer
                .sign(b"hello", HashAlgorithm::SHA256, &mut signature)
                .unwrap();
            provider
                .signature_verification
                .verify_signature(
                    &cert.certificate,
                    b"hello",
                    &signature,
                    HashAlgorithm::SHA256,
                    SignatureAlgorithm::ECDSA,
                )
                .expect("the certificate verifies what its shared key signs");
            let wrong_hash = signer.sign(b"hello", HashAlgorithm::SHA384, &mut signature);
            assert!(wrong_hash.is_err());
        }
        for _ in 0..SHARED_KEYS_KEPT {
            let other = AwsLcRsDtlsProvider.generate_certificate().unwrap();
            keys.load_private_key(&other.private_key).unwrap();
        }
        assert_eq!(keys.kept(), SHARED_KEYS_KEPT);
        keys.load_private_key(&cert.private_key).unwrap();
        assert_eq!(
            keys.kept(),
            SHARED_KEYS_KEPT,
            "parsed again in place of the oldest"
        );

        let now = Instant::now();
        let new = |active: bool| {
            let mut d = AwsLcRsDtlsProvider
                .new_dtls(&cert, now, DtlsVersion::Dtls12, None)
                .unwrap();
            d.set_active(active);
            d
        };
        let (client, server) = handshake(new(true), new(false));
        assert!(client.connected && server.connected);
        assert!(
            SHARED_KEYS.holds(&cert.private_key),
            "the backend's instances take their key from the shared keys"
        );
    }
}
