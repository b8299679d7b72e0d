//! The development PKI behind `baton certs init`: one CA, the coordinator's
//! server certificate, an operator certificate and one certificate per
//! agent, each carrying its identity as a `urn:baton:` URI (see [`crate::tls`]).
//!
//! An existing CA in the output directory is reused and existing files are
//! never overwritten, so running the command again with more `--agents`
//! adds their certificates without invalidating the ones already handed out.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::host::HostId;
use crate::tls::{AGENT_URN, COORDINATOR_URN, OPERATOR_URN, ROLE_URN};

/// How long leaf certificates are valid.
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long the CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Writing the PKI failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file or directory could not be written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate {what}: {source}")]
    Generate {
        /// Which certificate.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// An operator name that cannot be a file name and an identity.
    #[error("operator name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: String,
    },
    /// `ca.pem` exists without `ca-key.pem` (or the reverse).
    #[error("{} holds only half of a CA (ca.pem and ca-key.pem go together); use an empty directory", dir.display())]
    HalfCa {
        /// The directory.
        dir: PathBuf,
    },
}

/// What `init` did with each file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// Files written now.
    pub written: Vec<String>,
    /// Files that existed and were left alone.
    pub kept: Vec<String>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

fn gen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Generate {
        what: what.to_owned(),
        source,
    }
}

/// Writes `contents` to a new file with `mode`; never replaces a file.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn validity(params: &mut CertificateParams, length: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for clocks that are a little behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + length;
}

fn uri(s: String) -> Result<SanType, PkiError> {
    let ia5 = s.clone().try_into().map_err(gen_err(&s))?;
    Ok(SanType::URI(ia5))
}

/// The kinds of leaf certificate the dev PKI issues.
enum Leaf<'a> {
    /// With the DNS names and IP addresses agents and operators reach it by,
    /// besides the loopback ones.
    Coordinator(&'a [String]),
    Operator {
        name: &'a str,
        role: &'a str,
    },
    Agent(&'a HostId),
}

fn leaf_params(leaf: &Leaf<'_>) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    validity(&mut params, LEAF_VALIDITY);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Baton");
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    match leaf {
        Leaf::Coordinator(names) => {
            dn.push(DnType::CommonName, "batond");
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().map_err(gen_err("coordinator"))?),
                SanType::IpAddress([127, 0, 0, 1].into()),
                SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
                uri(COORDINATOR_URN.to_owned())?,
            ];
            for name in names.iter() {
                params.subject_alt_names.push(coordinator_name(name)?);
            }
            // Client auth too: coordinators talk to each other in HA setups.
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
        }
        Leaf::Operator { name, role } => {
            dn.push(DnType::CommonName, *name);
            params.subject_alt_names = vec![
                uri(format!("{OPERATOR_URN}{name}"))?,
                uri(format!("{ROLE_URN}{role}"))?,
            ];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        Leaf::Agent(id) => {
            dn.push(DnType::CommonName, id.as_str());
            params.subject_alt_names = vec![uri(format!("{AGENT_URN}{id}"))?];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.distinguished_name = dn;
    Ok(params)
}

/// Reads the CA (`ca.pem` and `ca-key.pem`) from `dir`.
fn read_ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
    let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
    let key = KeyPair::from_pem(&key_pem).map_err(gen_err("the CA key (reading ca-key.pem)"))?;
    Issuer::from_ca_cert_pem(&cert_pem, key).map_err(gen_err("the CA (reading ca.pem)"))
}

fn load_or_create_ca(
    dir: &Path,
    report: &mut InitReport,
) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let cert_path = dir.join("ca.pem");
    let key_path = dir.join("ca-key.pem");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let issuer = read_ca_issuer(dir)?;
            report
                .kept
                .extend(["ca.pem".to_owned(), "ca-key.pem".to_owned()]);
            Ok(issuer)
        }
        (false, false) => {
            let mut params = CertificateParams::default();
            validity(&mut params, CA_VALIDITY);
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "Baton");
            dn.push(DnType::CommonName, "Baton fleet CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().map_err(gen_err("the CA key"))?;
            let cert = params
                .self_signed(&key)
                .map_err(gen_err("the CA certificate"))?;
            write_new(&key_path, &key.serialize_pem(), 0o600)?;
            write_new(&cert_path, &cert.pem(), 0o644)?;
            report
                .written
                .extend(["ca.pem".to_owned(), "ca-key.pem".to_owned()]);
            Ok(Issuer::new(params, key))
        }
        _ => Err(PkiError::HalfCa {
            dir: dir.to_owned(),
        }),
    }
}

fn issue(
    dir: &Path,
    base: &str,
    leaf: &Leaf<'_>,
    ca: &Issuer<'_, KeyPair>,
    report: &mut InitReport,
) -> Result<(), PkiError> {
    let cert_name = format!("{base}.pem");
    let key_name = format!("{base}-key.pem");
    let (cert_path, key_path) = (dir.join(&cert_name), dir.join(&key_name));
    if cert_path.exists() || key_path.exists() {
        report.kept.extend([cert_name, key_name]);
        return Ok(());
    }
    let key = KeyPair::generate().map_err(gen_err(base))?;
    let cert = leaf_params(leaf)?
        .signed_by(&key, ca)
        .map_err(gen_err(base))?;
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    report.written.extend([cert_name, key_name]);
    Ok(())
}

/// A new agent key and a request to certify it: `(key PEM, CSR PEM)`. The
/// request carries no identity: the CA that signs it decides that.
pub fn agent_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(gen_err("an agent key"))?;
    let key_pem = key.serialize_pem();
    Ok((key_pem.clone(), csr_for(&key_pem)?))
}

/// A request to certify the key `key_pem` (PEM).
pub fn csr_for(key_pem: &str) -> Result<String, PkiError> {
    let key = KeyPair::from_pem(key_pem).map_err(gen_err("the agent key"))?;
    CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(gen_err("a certificate request"))
}

/// The public key a request asks to certify (DER), after checking its
/// signature.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    use rcgen::PublicKeyData;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(gen_err("the certificate request"))?;
    Ok(csr.public_key.der_bytes().to_vec())
}

/// The fleet CA, able to sign (its key is at hand).
pub struct Ca(Issuer<'static, KeyPair>);

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Ca")
    }
}

impl Ca {
    /// The CA in `dir` when `ca-key.pem` is there; `None` otherwise.
    pub fn load(dir: &Path) -> Result<Option<Self>, PkiError> {
        if !dir.join("ca-key.pem").exists() {
            return Ok(None);
        }
        read_ca_issuer(dir).map(|i| Some(Self(i)))
    }

    /// Signs `csr_pem` as the agent certificate of `host`, valid for
    /// `lifetime`. Only the public key is taken from the request: the
    /// identity, usages and validity are the CA's choice.
    pub fn sign_agent(
        &self,
        csr_pem: &str,
        host: &HostId,
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(gen_err("the certificate request"))?;
        let mut params = leaf_params(&Leaf::Agent(host))?;
        // Slack for clocks a little behind, small against the lifetime
        // (agents renew at two thirds of not_before..not_after).
        let now = time::OffsetDateTime::now_utc();
        let slack = (lifetime / 6).min(Duration::from_secs(3600));
        params.not_before = now - slack;
        params.not_after = now + lifetime;
        csr.params = params;
        Ok(csr
            .signed_by(&self.0)
            .map_err(gen_err(host.as_str()))?
            .pem())
    }
}

/// Issues an operator certificate `NAME.pem`/`NAME-key.pem` with `role`,
/// signed by the CA in `dir` (which must hold `ca.pem` and `ca-key.pem`).
/// Never replaces a file. Returns the two paths.
pub fn issue_operator(
    dir: &Path,
    name: &str,
    role: crate::tls::Role,
) -> Result<(PathBuf, PathBuf), PkiError> {
    crate::artifact::validate_name(name).map_err(|e| PkiError::BadName {
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let ca = read_ca_issuer(dir)?;
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    for path in [&cert, &key] {
        if path.exists() {
            return Err(PkiError::Io {
                path: path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists; pick another name or remove it first",
                ),
            });
        }
    }
    let mut report = InitReport::default();
    issue(
        dir,
        name,
        &Leaf::Operator {
            name,
            role: role.as_str(),
        },
        &ca,
        &mut report,
    )?;
    Ok((cert, key))
}

/// Writes the dev PKI into `out` (created with mode 0700 when missing):
/// `ca.pem`, `ca-key.pem`, `coordinator.pem`/`-key.pem`,
/// `operator.pem`/`-key.pem` and `agent-<id>.pem`/`-key.pem` per agent.
pub fn init(out: &Path, agents: &[HostId]) -> Result<InitReport, PkiError> {
    init_with_names(out, agents, &[])
}

/// A name the coordinator is reached by, as a certificate's subject
/// alternative name: an IP address, or a DNS name.
fn coordinator_name(name: &str) -> Result<SanType, PkiError> {
    let bad = |reason: String| PkiError::BadName {
        name: crate::text::prefix(name, 64),
        reason,
    };
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !valid {
        return Err(bad(
            "not an IP address or a DNS name (letters, digits and '-' in dot-separated labels)"
                .into(),
        ));
    }
    Ok(SanType::DnsName(
        name.to_owned()
            .try_into()
            .map_err(|e| bad(format!("{e}")))?,
    ))
}

/// [`init`], with a coordinator certificate that also names
/// `coordinator_names` (DNS names or IP addresses).
pub fn init_with_names(
    out: &Path,
    agents: &[HostId],
    coordinator_names: &[String],
) -> Result<InitReport, PkiError> {
    for name in coordinator_names {
        coordinator_name(name)?;
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(out)
        .map_err(io(out))?;
    let mut report = InitReport::default();
    let ca = load_or_create_ca(out, &mut report)?;
    issue(
        out,
        "coordinator",
        &Leaf::Coordinator(coordinator_names),
        &ca,
        &mut report,
    )?;
    issue(
        out,
        "operator",
        &Leaf::Operator {
            name: "operator",
            role: "admin",
        },
        &ca,
        &mut report,
    )?;
    for id in agents {
        issue(
            out,
            &format!("agent-{id}"),
            &Leaf::Agent(id),
            &ca,
            &mut report,
        )?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{PeerIdentity, identity_from_der, read_keyed_cert};

    #[test]
    fn the_coordinator_certificate_names_what_it_is_reached_by() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["coord.example.org".to_owned(), "10.1.2.3".to_owned()];
        init_with_names(dir.path(), &[], &names).unwrap();
        let pem = std::fs::read(dir.path().join("coordinator.pem")).unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = der.parse_x509().unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let text = format!("{:?}", san.general_names);
        assert!(text.contains("coord.example.org"), "{text}");
        assert!(text.contains("[10, 1, 2, 3]"), "{text}");
        for bad in ["", "a b", "-x.org", "x..org", "a\0b"] {
            let other = tempfile::tempdir().unwrap();
            assert!(
                init_with_names(other.path(), &[], &[bad.to_owned()]).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn init_writes_every_file_with_its_identity_and_keeps_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let h1 = HostId::try_from("h1").unwrap();
        let report = init(dir.path(), std::slice::from_ref(&h1)).unwrap();
        assert_eq!(report.written.len(), 8, "{report:?}");

        let agent = read_keyed_cert(
            &dir.path().join("agent-h1.pem"),
            &dir.path().join("agent-h1-key.pem"),
        )
        .unwrap();
        assert_eq!(
            identity_from_der(&agent.leaf_der).unwrap(),
            PeerIdentity::Agent(h1.clone())
        );
        let op = read_keyed_cert(
            &dir.path().join("operator.pem"),
            &dir.path().join("operator-key.pem"),
        )
        .unwrap();
        assert_eq!(
            identity_from_der(&op.leaf_der).unwrap(),
            PeerIdentity::Operator {
                name: "operator".into(),
                role: "admin".into()
            }
        );
        let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        // A second run with one more agent reuses the CA and adds only the new pair.
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        let h2 = HostId::try_from("h2").unwrap();
        let report = init(dir.path(), &[h1, h2]).unwrap();
        assert_eq!(
            report.written,
            vec!["agent-h2.pem".to_owned(), "agent-h2-key.pem".to_owned()]
        );
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    }

    #[test]
    fn half_a_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        assert!(matches!(
            init(dir.path(), &[]),
            Err(PkiError::HalfCa { .. })
        ));
    }
}
