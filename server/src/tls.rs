//! TLS for `--tls-cert/--tls-key`: the site, the hub and the room WebSockets over `https`/`wss`
//! with no proxy in front, on the aws-lc-rs crypto that the WebRTC stack already uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::crypto::aws_lc_rs;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain and key that cannot be used, with the file at fault.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    pub path: PathBuf,
    pub reason: String,
}

/// What the accept loop needs to serve TLS.
#[derive(Clone)]
pub struct Tls(pub TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls(..)")
    }
}

/// Loads a PEM certificate chain (leaf first) and its PEM private key.
pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
    let err = |path: &Path, reason: String| TlsError { path: path.to_owned(), reason };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| err(cert, format!("cannot read a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(err(cert, "holds no PEM certificate".to_owned()));
    }
    let private =
        PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, format!("cannot read a PEM private key: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| err(key, format!("does not go with the certificate: {e}")))?;
    // HTTP/1.1 only: WebSocket upgrades need it, and the server speaks nothing else.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Tls(TlsAcceptor::from(Arc::new(config))))
}
