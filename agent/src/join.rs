//! `baton-agent enroll`: sets a new host up with one command. With a join
//! token from `baton enroll create` it learns the fleet CA (checked against
//! the fingerprint the token carries), generates the host's key, gets its
//! certificate (waiting, when the token says so, until an operator accepts
//! the host), copies the trusted release keys, writes `agent.toml` and
//! starts the agent under systemd.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_common::host::{HostId, validate_labels};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::EnrollTarget;
use crate::enroll::write_atomic;

pub use crate::config::{DEFAULT_CONFIG, DEFAULT_DATA_DIR, DEFAULT_KEYS_DIR, JoinArgs, MAX_WAIT};

/// Checks that the server's chain carries a CA with the pinned fingerprint
/// and that the server's certificate is valid under it; keeps that CA.
#[derive(Debug)]
struct PinnedCa {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Mutex<Option<CertificateDer<'static>>>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| baton_common::hex::sha256_hex(c.as_ref()) == self.pin)
            .ok_or_else(|| {
                rustls::Error::General(
                    "the coordinator's CA does not have the fingerprint the join token carries"
                        .into(),
                )
            })?;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)?;
        if let Ok(mut found) = self.found.lock() {
            *found = Some(ca.clone().into_owned());
        }
        Ok(ServerCertVerified::assertion())
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

/// The fleet CA (PEM), from a TLS handshake with the coordinator at `url`,
/// accepted only when it has the fingerprint `pin` and the coordinator's
/// certificate is valid under it.
pub async fn fetch_ca(url: &str, pin: &str) -> Result<String, String> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .map_err(|e| format!("coordinator URL {url:?} is invalid: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!("coordinator URL {url:?} must start with https://"));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("coordinator URL {url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa {
        pin: pin.to_owned(),
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name =
        ServerName::try_from(host.clone()).map_err(|e| format!("coordinator URL {url:?}: {e}"))?;
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: {e}"))
    };
    let _stream = tokio::time::timeout(Duration::from_secs(10), handshake)
        .await
        .map_err(|_| format!("cannot reach {url}: timed out"))??;
    let der = verifier
        .found
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .ok_or_else(|| format!("{url}: the handshake showed no CA"))?;
    Ok(baton_common::tls::der_to_pem(der.as_ref()))
}

fn mkdir(dir: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// What `run` did, for its report.
#[derive(Debug)]
pub struct Joined {
    /// The host id enrolled.
    pub host: HostId,
    /// The configuration written.
    pub config: PathBuf,
    /// The labels it carries.
    pub labels: BTreeMap<String, String>,
}

/// Sets the host up. Nothing is written over an existing configuration
/// without `--force`; the key is kept, so running it again after an
/// interruption (or a wait for approval cut short) continues.
pub async fn run(args: &JoinArgs, say: &mut dyn FnMut(&str)) -> Result<Joined, String> {
    if args.wait > MAX_WAIT {
        return Err("--wait is at most 7days".into());
    }
    for url in &args.coordinator {
        if !url.starts_with("https://") {
            return Err(format!(
                "coordinator URL {:?} must start with https:// (agents only speak mutual TLS)",
                baton_common::text::prefix(url, 64)
            ));
        }
    }
    let (secret, pin) = crate::config::split_token(&args.token)?;
    let host = match &args.host_id {
        Some(id) => HostId::try_from(id.as_str()).map_err(|e| format!("host id {}", e.reason))?,
        None => crate::config::default_host_id()?,
    };
    if args.config.exists() && !args.force {
        return Err(format!(
            "{} exists already (is this host set up?): pass --force to replace it",
            args.config.display()
        ));
    }
    let mut keys = Vec::new();
    for path in &args.trusted_keys {
        baton_common::artifact::read_public_key(path).map_err(|e| e.to_string())?;
        let name = path
            .file_name()
            .ok_or_else(|| format!("{} names no file", path.display()))?;
        keys.push((path.clone(), args.keys_dir.join(name)));
    }
    let tls_dir = args
        .tls_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("tls"));
    mkdir(&args.data_dir, 0o700)?;
    mkdir(&tls_dir, 0o700)?;

    // The CA: what is there already, the file given, or the coordinator's,
    // checked against the token.
    let ca_path = tls_dir.join("ca.pem");
    let given = match &args.ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        ),
        None => std::fs::read_to_string(&ca_path).ok(),
    };
    let ca_pem = match (given, &pin) {
        (Some(pem), Some(pin)) => {
            let have = baton_common::tls::ca_fingerprint(pem.as_bytes());
            if have != *pin {
                return Err(format!(
                    "the CA in {} has fingerprint {have}, not the join token's {pin}",
                    args.ca.as_ref().unwrap_or(&ca_path).display()
                ));
            }
            pem
        }
        (Some(pem), None) => pem,
        (None, Some(pin)) => {
            let until = tokio::time::Instant::now() + crate::enroll::UNREACHABLE_PATIENCE;
            let mut pause = Duration::from_millis(100);
            loop {
                let mut last = String::new();
                let mut got = None;
                for url in &args.coordinator {
                    match fetch_ca(url, pin).await {
                        Ok(pem) => {
                            got = Some(pem);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                match got {
                    Some(pem) => break pem,
                    // A CA with another fingerprint is an answer, and final.
                    None if last.contains("fingerprint") => return Err(last),
                    None if tokio::time::Instant::now() + pause > until => return Err(last),
                    None => {
                        tokio::time::sleep(pause.mul_f64(0.5 + fastrand::f64())).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        (None, None) => {
            return Err(
                "this token carries no CA fingerprint: pass --ca with the fleet's ca.pem".into(),
            );
        }
    };
    write_atomic(&ca_path, ca_pem.as_bytes(), 0o644)
        .map_err(|e| format!("cannot write {}: {e}", ca_path.display()))?;

    let fingerprint = crate::enroll::key_fingerprint(&tls_dir, &host)?;
    let target = EnrollTarget {
        coordinators: args.coordinator.clone(),
        host_id: host.clone(),
        tls_dir: tls_dir.clone(),
        token: secret,
    };
    let give_up = tokio::time::Instant::now() + args.wait;
    let mut waiting = || {
        say(&format!(
            "waiting for an operator to accept host {host} (on the coordinator: baton enroll accept {host}); its key's SHA-256 is {fingerprint}"
        ));
    };
    let enrolled = crate::enroll::enroll(&target, &mut waiting, Some(give_up)).await?;

    let mut labels: BTreeMap<String, String> = args.labels.iter().cloned().collect();
    labels.extend(enrolled.labels);
    validate_labels(&labels).map_err(|e| format!("labels: {e}"))?;
    if !keys.is_empty() {
        mkdir(&args.keys_dir, 0o755)?;
    }
    let mut key_paths = Vec::new();
    for (from, to) in keys {
        let bytes =
            std::fs::read(&from).map_err(|e| format!("cannot read {}: {e}", from.display()))?;
        write_atomic(&to, &bytes, 0o644)
            .map_err(|e| format!("cannot write {}: {e}", to.display()))?;
        key_paths.push(to);
    }
    let config = FileOut {
        coordinator: args.coordinator.clone(),
        host_id: host.to_string(),
        data_dir: args.data_dir.clone(),
        tls_dir,
        labels: labels.clone(),
        trusted_keys: key_paths,
    };
    let text = format!(
        "# Written by `baton-agent enroll`; every key is in `baton-agent --help`.\n{}",
        toml::to_string(&config).map_err(|e| e.to_string())?
    );
    if let Some(dir) = args.config.parent() {
        mkdir(dir, 0o755)?;
    }
    write_atomic(&args.config, text.as_bytes(), 0o640)
        .map_err(|e| format!("cannot write {}: {e}", args.config.display()))?;
    Ok(Joined {
        host,
        config: args.config.clone(),
        labels,
    })
}

#[derive(serde::Serialize)]
#[serde(rename_all = "kebab-case")]
struct FileOut {
    coordinator: Vec<String>,
    host_id: String,
    data_dir: PathBuf,
    tls_dir: PathBuf,
    labels: BTreeMap<String, String>,
    trusted_keys: Vec<PathBuf>,
}

/// Runs `systemctl enable --now baton-agent` when systemd runs this host.
pub fn start(args: &JoinArgs, say: &mut dyn FnMut(&str)) -> Result<(), String> {
    let how = format!("baton-agent --config {}", args.config.display());
    if args.no_start {
        say(&format!(
            "not started (--no-start): systemctl enable --now baton-agent, or {how}"
        ));
        return Ok(());
    }
    if !Path::new("/run/systemd/system").exists() {
        say(&format!(
            "systemd does not run this host: start the agent with {how}"
        ));
        return Ok(());
    }
    let systemctl = args
        .systemctl
        .clone()
        .unwrap_or_else(|| PathBuf::from("systemctl"));
    let status = std::process::Command::new(&systemctl)
        .args(["enable", "--now", "baton-agent"])
        .status()
        .map_err(|e| format!("cannot run {}: {e}", systemctl.display()))?;
    if !status.success() {
        return Err(format!(
            "systemctl enable --now baton-agent failed ({status}); see journalctl -u baton-agent"
        ));
    }
    say("started: systemctl enable --now baton-agent");
    Ok(())
}
