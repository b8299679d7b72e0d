//! The agent's certificate: its first one in exchange for a one-time
//! token (`--enroll-token`), and a fresh one at two thirds of each
//! certificate's life, over the stream's own mutual TLS, without dropping
//! the stream (the new certificate is presented from the next connection
//! on). The private key is generated here and never leaves the host.

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
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
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

/// Enrolls: a new key, a certificate for it from the first coordinator that
/// answers (or the leader a follower names), both written to the TLS
/// directory.
pub async fn enroll(target: &EnrollTarget) -> Result<(), String> {
    let ca = read_ca(&target.tls_dir.join("ca.pem")).map_err(|e| e.to_string())?;
    // The key is kept before asking: a retry after a lost answer (or a
    // crash) asks again for the same key, which the coordinator answers
    // with the same certificate.
    let (cert_path, key_path) = paths(&target.tls_dir, &target.host_id);
    let key_pem = match std::fs::read_to_string(&key_path) {
        Ok(pem) => pem,
        Err(_) => {
            let (pem, _) = baton_common::pki::agent_csr().map_err(|e| e.to_string())?;
            write_atomic(&key_path, pem.as_bytes(), 0o600)
                .map_err(|e| format!("cannot write {}: {e}", key_path.display()))?;
            pem
        }
    };
    let csr_pem = baton_common::pki::csr_for(&key_pem).map_err(|e| e.to_string())?;
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
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
            Err(e) => return Err(format!("coordinator URL {url:?} is invalid: {}", chain(&e))),
        };
        let answer = EnrollmentServiceClient::new(channel)
            .enroll(EnrollRequest {
                token: target.token.clone(),
                host_id: target.host_id.to_string(),
                csr_pem: csr_pem.clone(),
            })
            .await;
        match answer {
            Ok(cert) => {
                write_atomic(&cert_path, cert.into_inner().cert_pem.as_bytes(), 0o644)
                    .map_err(|e| format!("cannot write the certificate: {e}"))?;
                info!(host = %target.host_id, coordinator = %url, "enrolled");
                return Ok(());
            }
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
                if status.code() == tonic::Code::PermissionDenied {
                    break;
                }
            }
        }
    }
    Err(format!("enrollment failed: {last}"))
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
