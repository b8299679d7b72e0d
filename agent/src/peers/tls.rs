//! Mutual TLS between agents. Agent certificates are client certificates
//! (they name `urn:baton:agent:<id>`, no address), so neither side uses
//! the web's server-name rules: each checks that the other's chain leads
//! to the fleet CA and that it is an agent — the client, that it is the
//! very agent the coordinator named.

use std::sync::Arc;
use std::time::Duration;

use baton_common::host::HostId;
use baton_common::tls::{ClientTls, PeerIdentity, identity_from_der};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_rustls::rustls::server::danger::ClientCertVerifier;
use tonic::transport::{Channel, Endpoint};

/// How long connecting to a peer (TCP and TLS) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks chains against the fleet CA, with the client-auth purpose agent
/// certificates carry.
fn agent_verifier(
    tls: &ClientTls,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca_pem).flatten() {
        roots.add(cert).map_err(|e| format!("the fleet CA: {e}"))?;
    }
    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("the fleet CA: {e}"))
}

fn identity(
    tls: &ClientTls,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&tls.identity.cert_pem)
            .flatten()
            .collect();
    let key = PrivateKeyDer::from_pem_slice(&tls.identity.key_pem)
        .map_err(|e| format!("the agent's key: {e}"))?;
    Ok((chain, key))
}

/// The server side: this agent's certificate, and an agent certificate of
/// the fleet required of every client.
pub fn server_config(tls: &ClientTls) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = provider();
    let verifier = agent_verifier(tls, provider.clone())?;
    let (chain, key) = identity(tls)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("the agent's certificate: {e}"))?;
    config.alpn_protocols.push(b"h2".to_vec());
    Ok(Arc::new(config))
}

/// Accepts a server whose chain leads to the fleet CA and whose
/// certificate names agent `expected`.
#[derive(Debug)]
struct ThePeer {
    expected: HostId,
    chain: Arc<dyn ClientCertVerifier>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for ThePeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        match identity_from_der(end_entity.as_ref()) {
            Ok(PeerIdentity::Agent(id)) if id == self.expected => {
                Ok(ServerCertVerified::assertion())
            }
            Ok(other) => Err(rustls::Error::General(format!(
                "the peer is {other}, not agent {}",
                self.expected
            ))),
            Err(e) => Err(rustls::Error::General(e.to_string())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A channel to agent `peer` at `addr`, presenting `tls`; connected (TCP
/// and TLS) within [`CONNECT_TIMEOUT`].
pub async fn connect(
    tls: &ClientTls,
    peer: &HostId,
    addr: std::net::SocketAddr,
) -> Result<Channel, String> {
    let provider = provider();
    let verifier = Arc::new(ThePeer {
        expected: peer.clone(),
        chain: agent_verifier(tls, provider.clone())?,
        provider: provider.clone(),
    });
    let (chain, key) = identity(tls)?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the agent's certificate: {e}"))?;
    config.alpn_protocols.push(b"h2".to_vec());
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let connect = tower::service_fn(move |_: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            // Not checked: the verifier checks the certificate's identity.
            let name = ServerName::try_from("peer.baton.invalid").map_err(std::io::Error::other)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    let endpoint = Endpoint::from_static("http://peer.baton.invalid")
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(16 << 20);
    tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect_with_connector(connect))
        .await
        .map_err(|_| format!("cannot reach peer {peer} at {addr}: timed out"))?
        .map_err(|e| {
            format!(
                "cannot reach peer {peer} at {addr}: {}",
                baton_common::error_chain(&e)
            )
        })
}
