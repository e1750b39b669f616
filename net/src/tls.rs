//! Mutual TLS between nodes (and from clients to nodes), with certificates of the cluster CA
//! ([`crate::pki`]).
//!
//! TLS 1.3 only, with rustls' ring provider passed explicitly: nothing here depends on a
//! process-wide default provider. Clients name the node they connect to by its node name
//! (which every node certificate holds as a DNS SAN).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, CommonState, RootCertStore, ServerConfig};

use crate::pki::{cert_name, Identity};

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("no CA certificate to trust: check that ca.pem of the TLS directory holds the cluster CA certificate")]
    NoRoots,
    #[error("the CA certificates cannot be used to verify peers ({0}): check ca.pem of the TLS directory")]
    Verifier(rustls::server::VerifierBuilderError),
    #[error("the certificate and key of {name:?} cannot be used ({source}): issue them again with the cluster CA")]
    Identity { name: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Whether a server asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// A client without a certificate is let in (it then needs a bearer token at the HTTP
    /// level), but one presenting a certificate that does not verify against the roots (e.g.
    /// from another CA) is refused in the handshake.
    Optional,
    /// Every client must present a certificate that verifies against the roots.
    Required,
}

/// The crypto provider of every configuration made here: ring.
///
/// Without AES instructions (the nested host's emulated CPU has none), AES-GCM runs in slow
/// constant-time software and ChaCha20-Poly1305 is several times faster, so it is put first:
/// clients offer it first and servers follow the client's order.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !aes_in_hardware() {
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
    Arc::new(provider)
}

/// Whether this CPU has the AES and carry-less multiply instructions AES-GCM is fast with.
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

/// A server configuration presenting `id` and verifying client certificates against
/// `roots`, as `auth` says.
pub fn server_config(
    roots: RootCertStore,
    id: &Identity,
    auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let verifier = match auth {
        ClientAuth::Optional => verifier.allow_unauthenticated(),
        ClientAuth::Required => verifier,
    }
    .build()
    .map_err(TlsError::Verifier)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.cert_chain().to_vec(), id.private_key().clone_key())
        .map_err(|source| TlsError::Identity {
            name: id.name.clone(),
            source,
        })?;
    Ok(Arc::new(config))
}

/// A client configuration verifying servers against `roots` and presenting `id`, if given.
pub fn client_config(
    roots: RootCertStore,
    id: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_webpki_verifier(verifier);
    let config = match id {
        Some(id) => builder
            .with_client_auth_cert(id.cert_chain().to_vec(), id.private_key().clone_key())
            .map_err(|source| TlsError::Identity {
                name: id.name.clone(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The node name (the CN, or the first DNS SAN) of the client certificate a server-side
/// connection verified, if any. (On a client-side connection: of the server's certificate.)
///
/// Only meaningful once the handshake is complete: a certificate that did not verify fails
/// the handshake, so one present then has been verified.
pub fn peer_name(conn: &CommonState) -> Option<String> {
    cert_name(conn.peer_certificates()?.first()?)
}
