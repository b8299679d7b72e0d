//! Mutual TLS: loading the PEM files of a TLS directory, building tonic's
//! server and client configurations, and reading a peer's identity from its
//! certificate.
//!
//! Identity lives in URI subject alternative names under `urn:baton:`, so a
//! certificate says both *who* (a host id, an operator name) and *what kind*
//! of caller it is. The coordinator takes an agent's host id from here and
//! never from what the agent claims.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::host::HostId;

/// URI SAN prefix of agent certificates: `urn:baton:agent:<host-id>`.
pub const AGENT_URN: &str = "urn:baton:agent:";
/// URI SAN prefix of operator certificates: `urn:baton:operator:<name>`.
pub const OPERATOR_URN: &str = "urn:baton:operator:";
/// URI SAN prefix of an operator's role: `urn:baton:role:<role>`.
pub const ROLE_URN: &str = "urn:baton:role:";
/// URI SAN of the coordinator's certificate.
pub const COORDINATOR_URN: &str = "urn:baton:coordinator";

/// A TLS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file is missing or unreadable.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// What the file is for ("CA certificate", ...).
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but holds no usable PEM object.
    #[error("the {what} {} is not valid: {reason}", path.display())]
    Invalid {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A certificate chain and its private key, read and checked.
#[derive(Clone)]
pub struct KeyedCert {
    /// The certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key, PEM.
    pub key_pem: Vec<u8>,
    /// The leaf certificate, DER (for reading its identity).
    pub leaf_der: CertificateDer<'static>,
}

impl std::fmt::Debug for KeyedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("KeyedCert").finish_non_exhaustive()
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM file of CA certificates (at least one).
pub fn read_ca(path: &Path) -> Result<Vec<u8>, TlsError> {
    let what = "CA certificate";
    let pem = read(path, what)?;
    let count = CertificateDer::pem_slice_iter(&pem)
        .filter(Result::is_ok)
        .count();
    if count == 0 {
        return Err(TlsError::Invalid {
            what,
            path: path.to_owned(),
            reason: "it holds no PEM certificate".into(),
        });
    }
    Ok(pem)
}

/// Reads a certificate and its key, checking that both parse.
pub fn read_keyed_cert(cert_path: &Path, key_path: &Path) -> Result<KeyedCert, TlsError> {
    let cert_pem = read(cert_path, "certificate")?;
    let leaf_der = CertificateDer::pem_slice_iter(&cert_pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| TlsError::Invalid {
            what: "certificate",
            path: cert_path.to_owned(),
            reason: "it holds no PEM certificate".into(),
        })?;
    let key_pem = read(key_path, "private key")?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        what: "private key",
        path: key_path.to_owned(),
        reason: format!("it holds no PEM private key ({e})"),
    })?;
    Ok(KeyedCert {
        cert_pem,
        key_pem,
        leaf_der: leaf_der.into_owned(),
    })
}

/// The TLS material of a server: its identity and the CA its clients must
/// chain to.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The CA bundle, PEM.
    pub ca_pem: Vec<u8>,
    /// The server's certificate and key.
    pub identity: KeyedCert,
}

impl ServerTls {
    /// Loads `ca.pem`, `coordinator.pem` and `coordinator-key.pem` from a
    /// TLS directory as written by `baton certs init`.
    pub fn load_coordinator(dir: &Path) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: read_ca(&dir.join("ca.pem"))?,
            identity: read_keyed_cert(
                &dir.join("coordinator.pem"),
                &dir.join("coordinator-key.pem"),
            )?,
        })
    }

    /// The rustls configuration `batond` accepts connections with (it runs
    /// the handshake itself, to bound it and to route connections by
    /// whether they carry a certificate): TLS 1.2 and 1.3 with ring, HTTP/2
    /// by ALPN, and client certificates that must chain to the CA when
    /// presented — optional only so that a new host can enroll.
    pub fn rustls_config(&self) -> Result<std::sync::Arc<rustls::ServerConfig>, TlsError> {
        let invalid = |what: &'static str, reason: String| TlsError::Invalid {
            what,
            path: PathBuf::from("(the coordinator's TLS directory)"),
            reason,
        };
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.ca_pem).flatten() {
            roots
                .add(cert)
                .map_err(|e| invalid("CA certificate", e.to_string()))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| invalid("CA certificate", e.to_string()))?;
        // The CA goes with the certificate: a new host that knows only its
        // fingerprint (a join token) can then check the coordinator.
        let mut chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&self.identity.cert_pem)
                .flatten()
                .collect();
        for ca in CertificateDer::pem_slice_iter(&self.ca_pem).flatten() {
            if !chain.contains(&ca) {
                chain.push(ca);
            }
        }
        let key = PrivateKeyDer::from_pem_slice(&self.identity.key_pem)
            .map_err(|e| invalid("private key", e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("certificate", e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| invalid("certificate", e.to_string()))?;
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(std::sync::Arc::new(config))
    }
}

/// The SHA-256 (hex) of the first certificate's DER in a PEM bundle: the
/// CA fingerprint join tokens carry. Empty when there is none.
pub fn ca_fingerprint(ca_pem: &[u8]) -> String {
    CertificateDer::pem_slice_iter(ca_pem)
        .flatten()
        .next()
        .map(|der| crate::hex::sha256_hex(der.as_ref()))
        .unwrap_or_default()
}

/// A certificate's DER as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// How long a client may take to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The TLS material of a client: the CA that must have signed the server,
/// and the client's own identity.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA bundle, PEM.
    pub ca_pem: Vec<u8>,
    /// The client's certificate and key.
    pub identity: KeyedCert,
}

impl ClientTls {
    /// Loads `ca.pem` plus a named certificate pair from a TLS directory,
    /// e.g. `operator` reads `operator.pem` and `operator-key.pem`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        Ok(Self {
            ca_pem: read_ca(&dir.join("ca.pem"))?,
            identity: read_keyed_cert(
                &dir.join(format!("{name}.pem")),
                &dir.join(format!("{name}-key.pem")),
            )?,
        })
    }

    /// tonic's client configuration; the server name is taken from the URL.
    pub fn to_tonic(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(
                &self.identity.cert_pem,
                &self.identity.key_pem,
            ))
    }
}

/// What an operator certificate allows on the Control API; each role can
/// do what the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: hosts, artifacts, rollouts.
    Viewer,
    /// Changes: pushes artifacts, starts and steers rollouts.
    Operator,
    /// Everything: also the audit log, enrollment and keys.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// `viewer`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role {s:?} (viewer | operator | admin)"))
    }
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &Self::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(
            clap::builder::PossibleValue::new(self.as_str()).help(match self {
                Role::Viewer => "reads: hosts, artifacts, rollouts",
                Role::Operator => "also pushes artifacts, starts and steers rollouts",
                Role::Admin => "everything: also the audit log, enrollment and keys",
            }),
        )
    }
}

/// Who is on the other end of a connection, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// An agent, for the host named.
    Agent(HostId),
    /// An operator (a person, a CI job, an integration).
    Operator {
        /// The operator's name.
        name: String,
        /// The role in the certificate, as written (empty when none is
        /// given: such a certificate may call nothing).
        role: String,
    },
    /// Another coordinator.
    Coordinator,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Agent(id) => write!(f, "agent {id}"),
            Self::Operator { name, role } => write!(f, "operator {name} ({role})"),
            Self::Coordinator => f.write_str("coordinator"),
        }
    }
}

/// Why a certificate does not name a Baton identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER does not parse as X.509.
    #[error("the certificate cannot be parsed: {0}")]
    Unparseable(String),
    /// No `urn:baton:` URI names what the certificate is for.
    #[error(
        "the certificate carries no Baton identity (no urn:baton: URI in its subject alternative names)"
    )]
    Missing,
    /// The identity is there but malformed.
    #[error("the certificate's Baton identity is invalid: {0}")]
    Invalid(String),
}

/// The validity of the first certificate in `cert_pem`: (not before, not
/// after).
pub fn cert_validity(cert_pem: &[u8]) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        Some(
            std::time::SystemTime::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(t.timestamp()).ok()?),
        )
    };
    let v = cert.validity();
    Some((at(v.not_before)?, at(v.not_after)?))
}

/// Reads the Baton identity from the first certificate in `cert_pem`.
pub fn identity_from_pem(cert_pem: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let der = CertificateDer::pem_slice_iter(cert_pem)
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| IdentityError::Unparseable("no PEM certificate".into()))?;
    identity_from_der(&der)
}

/// Reads the Baton identity from a DER certificate.
pub fn identity_from_der(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparseable(e.to_string()))?
        .ok_or(IdentityError::Missing)?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    let role = uris
        .iter()
        .find_map(|u| u.strip_prefix(ROLE_URN))
        .unwrap_or("");
    for uri in &uris {
        if let Some(id) = uri.strip_prefix(AGENT_URN) {
            return HostId::try_from(id)
                .map(PeerIdentity::Agent)
                .map_err(|e| IdentityError::Invalid(e.to_string()));
        }
        if let Some(name) = uri.strip_prefix(OPERATOR_URN) {
            return Ok(PeerIdentity::Operator {
                name: name.to_owned(),
                role: role.to_owned(),
            });
        }
        if *uri == COORDINATOR_URN {
            return Ok(PeerIdentity::Coordinator);
        }
    }
    Err(IdentityError::Missing)
}
