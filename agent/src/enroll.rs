//! The agent's certificate: its first one in exchange for a one-time
//! token (`--enroll-token`), and a fresh one at two thirds of each
//! certificate's life, over the stream's own mutual TLS, without dropping
//! the stream (the new certificate is presented from the next connection
//! on). The private key is generated here and never leaves the host.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use baton_common::error_chain as chain;
use baton_common::host::HostId;
use baton_common::tls::{ClientTls, read_ca, read_keyed_cert};
use baton_proto::agent::v1::enrollment_service_client::EnrollmentServiceClient;
use baton_proto::agent::v1::{EnrollRequest, RenewRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use crate::connection::Credentials;

/// How long to wait before trying a failed renewal again.
const RETRY: Duration = Duration::from_secs(30);

pub use crate::config::EnrollTarget;

fn paths(dir: &Path, host: &HostId) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("agent-{host}.pem")),
        dir.join(format!("agent-{host}-key.pem")),
    )
}

fn pending(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}

/// Completes a renewal a crash interrupted between its two renames (the
/// new certificate waits beside the new key): run before the TLS files
/// are read.
pub fn finish_renewal(tls_dir: &Path, host: &HostId) -> std::io::Result<()> {
    let (cert_path, key_path) = paths(tls_dir, host);
    let (cert_new, key_new) = (pending(&cert_path), pending(&key_path));
    if !cert_new.exists() {
        let _ = std::fs::remove_file(&key_new);
        return Ok(());
    }
    if key_new.exists() {
        std::fs::rename(&key_new, &key_path)?;
    }
    std::fs::rename(&cert_new, &cert_path)?;
    info!("finished a certificate renewal interrupted by a restart");
    Ok(())
}

/// Writes `contents` to `path` atomically, with `mode`.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{:08x}", fastrand::u32(..)));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// How often a host waiting for approval asks again.
pub const PENDING_POLL: Duration = Duration::from_secs(5);

/// What enrolling got.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The labels the token grants.
    pub labels: BTreeMap<String, String>,
    /// Where the certificate is.
    pub cert_path: PathBuf,
}

/// The key this host enrolls with, made (and kept) on first use: a retry
/// after a lost answer, a crash or a wait for approval asks again for the
/// same key, which the coordinator answers with the same certificate.
fn enrollment_key(key_path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(key_path) {
        Ok(pem) => Ok(pem),
        Err(_) => {
            let (pem, _) = baton_common::pki::agent_csr().map_err(|e| e.to_string())?;
            write_atomic(key_path, pem.as_bytes(), 0o600)
                .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
            Ok(pem)
        }
    }
}

/// The SHA-256 of the enrollment key's public half (hex), as
/// `baton enroll pending` shows it: compare before accepting a host.
pub fn key_fingerprint(tls_dir: &Path, host: &HostId) -> Result<String, String> {
    let (_, key_path) = paths(tls_dir, host);
    let key_pem = enrollment_key(&key_path)?;
    let csr = baton_common::pki::csr_for(&key_pem).map_err(|e| e.to_string())?;
    let public = baton_common::pki::csr_public_key(&csr).map_err(|e| e.to_string())?;
    Ok(baton_common::hex::sha256_hex(&public))
}

/// Enrolls: a new key, a certificate for it from the first coordinator that
/// answers (or the leader a follower names), both written to the TLS
/// directory. While the token's hosts wait for approval, asks again every
/// [`PENDING_POLL`], calling `waiting` once, until `give_up` (forever with
/// `None`).
pub async fn enroll(
    target: &EnrollTarget,
    waiting: &mut dyn FnMut(),
    give_up: Option<tokio::time::Instant>,
) -> Result<Enrolled, String> {
    let ca = read_ca(&target.tls_dir.join("ca.pem")).map_err(|e| e.to_string())?;
    let (cert_path, key_path) = paths(&target.tls_dir, &target.host_id);
    let key_pem = enrollment_key(&key_path)?;
    let csr_pem = baton_common::pki::csr_for(&key_pem).map_err(|e| e.to_string())?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
    let mut told = false;
    loop {
        let cert = ask_patiently(target, &tls, &csr_pem).await?;
        if !cert.pending {
            write_atomic(&cert_path, cert.cert_pem.as_bytes(), 0o644)
                .map_err(|e| format!("cannot write the certificate: {e}"))?;
            info!(host = %target.host_id, "enrolled");
            return Ok(Enrolled {
                labels: cert.labels.into_iter().collect(),
                cert_path,
            });
        }
        if !told {
            told = true;
            waiting();
        }
        if give_up.is_some_and(|at| tokio::time::Instant::now() + PENDING_POLL > at) {
            return Err(format!(
                "host {} still waits for an operator to accept it (baton enroll accept {}); run this again to keep waiting",
                target.host_id, target.host_id
            ));
        }
        tokio::time::sleep(PENDING_POLL).await;
    }
}

/// How long enrolling keeps trying coordinators that cannot be reached (or
/// turn connections away: each address may hold only a few connections
/// without a certificate, and many hosts may enroll at once).
pub const UNREACHABLE_PATIENCE: Duration = Duration::from_secs(120);

/// [`ask`], again after a jittered, growing pause while no coordinator
/// answers, for [`UNREACHABLE_PATIENCE`]; a refusal is final at once.
async fn ask_patiently(
    target: &EnrollTarget,
    tls: &ClientTlsConfig,
    csr_pem: &str,
) -> Result<baton_proto::agent::v1::Certificate, String> {
    let until = tokio::time::Instant::now() + UNREACHABLE_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match ask(target, tls, csr_pem).await {
            Ok(cert) => return Ok(cert),
            Err(Asked::Refused(e)) => return Err(e),
            Err(Asked::Unreachable(e)) => {
                if tokio::time::Instant::now() + pause > until {
                    return Err(e);
                }
                tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Why a request got no certificate.
enum Asked {
    /// No coordinator answered: worth asking again.
    Unreachable(String),
    /// One answered no.
    Refused(String),
}

/// One request, to the first coordinator that answers.
async fn ask(
    target: &EnrollTarget,
    tls: &ClientTlsConfig,
    csr_pem: &str,
) -> Result<baton_proto::agent::v1::Certificate, Asked> {
    let mut urls: Vec<String> = target.coordinators.clone();
    let mut last = String::from("no coordinator URL");
    let mut i = 0;
    while i < urls.len() && i < 8 {
        let url = urls[i].clone();
        i += 1;
        let channel = match Endpoint::from_shared(url.clone())
            .and_then(|e| e.tls_config(tls.clone()))
            .map(|e| e.connect_timeout(Duration::from_secs(5)))
        {
            Ok(e) => match tokio::time::timeout(Duration::from_secs(10), e.connect()).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    last = format!("cannot reach {url}: {}", chain(&e));
                    continue;
                }
                Err(_) => {
                    last = format!("cannot reach {url}: timed out");
                    continue;
                }
            },
            Err(e) => {
                return Err(Asked::Refused(format!(
                    "coordinator URL {url:?} is invalid: {}",
                    chain(&e)
                )));
            }
        };
        let answer = EnrollmentServiceClient::new(channel)
            .enroll(EnrollRequest {
                token: target.token.clone(),
                host_id: target.host_id.to_string(),
                csr_pem: csr_pem.to_owned(),
            })
            .await;
        match answer {
            Ok(cert) => return Ok(cert.into_inner()),
            Err(status) => {
                if let Some(leader) = status
                    .metadata()
                    .get("baton-leader")
                    .and_then(|v| v.to_str().ok())
                    .filter(|l| l.starts_with("https://"))
                {
                    urls.push(leader.to_owned());
                }
                last = format!("{url}: {}", status.message());
                if matches!(
                    status.code(),
                    tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument
                        | tonic::Code::FailedPrecondition
                ) {
                    return Err(Asked::Refused(format!("enrollment failed: {last}")));
                }
            }
        }
    }
    Err(Asked::Unreachable(format!("enrollment failed: {last}")))
}

/// Renews the agent's certificate at two thirds of its life, for as long
/// as the agent runs, retrying every 30 s while the coordinator cannot.
pub async fn renew_forever(
    tls_dir: PathBuf,
    host: HostId,
    creds: Credentials,
    shutdown: CancellationToken,
) {
    loop {
        let current = creds.current();
        let wait = match baton_common::tls::cert_validity(&current.identity.cert_pem) {
            Some((from, until)) => {
                let life = until.duration_since(from).unwrap_or_default();
                let at = from + life * 2 / 3;
                at.duration_since(SystemTime::now()).unwrap_or_default()
            }
            None => {
                warn!("cannot read the agent certificate's validity; not renewing it");
                return;
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match renew(&tls_dir, &host, &creds).await {
            Ok(until) => {
                info!(until = %baton_common::time::rfc3339(until), "renewed the agent certificate")
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the agent certificate yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

async fn renew(tls_dir: &Path, host: &HostId, creds: &Credentials) -> Result<SystemTime, String> {
    let (key_pem, csr_pem) = baton_common::pki::agent_csr().map_err(|e| e.to_string())?;
    let channel = creds.channel();
    let cert = EnrollmentServiceClient::new(channel)
        .renew(RenewRequest { csr_pem })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let (cert_path, key_path) = paths(tls_dir, host);
    // Both new files first, then the key, then the certificate: a crash
    // between the two renames is finished by `finish_renewal` at start.
    let (cert_new, key_new) = (pending(&cert_path), pending(&key_path));
    write_atomic(&key_new, key_pem.as_bytes(), 0o600)
        .and_then(|()| write_atomic(&cert_new, cert.cert_pem.as_bytes(), 0o644))
        .and_then(|()| std::fs::rename(&key_new, &key_path))
        .and_then(|()| std::fs::rename(&cert_new, &cert_path))
        .map_err(|e| format!("cannot write the certificate: {e}"))?;
    let identity = read_keyed_cert(&cert_path, &key_path).map_err(|e| e.to_string())?;
    let until =
        baton_common::tls::cert_validity(&identity.cert_pem).map_or(SystemTime::now(), |(_, u)| u);
    creds.replace(ClientTls {
        ca_pem: creds.current().ca_pem,
        identity,
    });
    Ok(until)
}
