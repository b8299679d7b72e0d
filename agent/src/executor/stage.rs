//! Staging: verify the signed manifest against the agent's own keys and
//! the high-water mark, download the payload (hashed on the fly), unpack
//! it into a staging directory and move it into place complete.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use baton_common::artifact::{self, AGENT_NAME, ArtifactKind, Manifest, SignedManifest};
use baton_common::command::{CommandUpdate, FailureKind, Phase};
use baton_proto::agent::v1::artifact_service_client::ArtifactServiceClient;
use tracing::{debug, info};

use super::failure::{Classify, Failure};
use super::{Executor, PROGRESS_EVERY, download, lock, swarm};

impl Executor {
    pub(super) async fn stage(
        &self,
        id: &str,
        name: &str,
        version: &str,
        manifest: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), Failure> {
        artifact::validate_version(version).or_fail(FailureKind::Invalid)?;
        let (releases, kind) = if name == AGENT_NAME {
            (self.inner.config.me.releases(), ArtifactKind::Agent)
        } else {
            (&self.inner.releases, ArtifactKind::Service)
        };
        if releases.is_staged(name, version) {
            debug!(service = %name, %version, "already staged");
            return Ok(());
        }
        // A downgrade may only return to a release the host still has:
        // nothing older is ever fetched (the rollback attack).
        let running = if kind == ArtifactKind::Agent {
            Some(self.inner.config.me.version().to_owned())
        } else {
            releases.current(name)
        };
        if let Some(current) = running
            && baton_common::version::is_downgrade(&current, version)
        {
            return Err(Failure::new(
                FailureKind::Refused,
                format!(
                    "refusing to stage {name} {version}: it is older than the {current} this host runs, and a downgrade may only return to a release the host still has"
                ),
            ));
        }
        // Nor below the highest version this host ever ran, which a
        // removal does not erase.
        self.inner.installed.refuse(name, version, false, false)?;
        let signed = SignedManifest::parse(manifest, signature)
            .map_err(|e| format!("the artifact's manifest is invalid: {e}"))
            .or_fail(FailureKind::Signature)?;
        let m = &signed.manifest;
        if m.name != name || m.version != version || m.kind != kind {
            return Err(Failure::new(
                FailureKind::Signature,
                format!(
                    "the manifest is for {} {} {}, not {} {name} {version}",
                    m.kind.as_str(),
                    m.name,
                    m.version,
                    kind.as_str()
                ),
            ));
        }
        if self.inner.config.trusted_keys.is_empty() {
            return Err(Failure::new(
                FailureKind::Signature,
                format!(
                    "refusing {name} {version}: this agent trusts no release key (configure --trusted-key)"
                ),
            ));
        }
        signed
            .verify(&self.inner.config.trusted_keys)
            .map_err(|e| format!("refusing {name} {version}: {e}"))
            .or_fail(FailureKind::Signature)?;
        // Judged once, at the start of staging: a rollout that takes
        // longer than the time left does not fail halfway.
        m.check_fresh(SystemTime::now())
            .map_err(|e| format!("refusing {name} {version}: {e}"))
            .or_fail(FailureKind::Signature)?;
        let gate = lock(&self.inner.downloads)
            .entry(m.payload_sha256.clone())
            .or_default()
            .clone();
        let _one_at_a_time = gate.lock().await;
        if releases.is_staged(name, version) {
            return Ok(());
        }
        let (payload, seed) = self.download(id, m).await?;
        // Unpacking is blocking file work; keep it off the runtime.
        let releases = releases.clone();
        let (name_owned, version_owned) = (name.to_owned(), version.to_owned());
        let payload_path = payload.clone();
        let unpacked = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let dest = releases
                .staging_dir(&name_owned, &version_owned)
                .map_err(|e| format!("cannot prepare the release directory: {e}"))?;
            let file = std::fs::File::open(&payload_path)
                .map_err(|e| format!("cannot reopen the download: {e}"))?;
            artifact::unpack(
                std::io::BufReader::new(file),
                &dest,
                &artifact::UnpackLimits::default(),
            )
            .map_err(|e| format!("cannot unpack {name_owned} {version_owned}: {e}"))?;
            if kind == ArtifactKind::Agent {
                use std::os::unix::fs::PermissionsExt;
                let binary = dest.join(AGENT_NAME);
                match std::fs::symlink_metadata(&binary) {
                    Ok(m) if m.is_file() && m.permissions().mode() & 0o100 != 0 => {}
                    _ => {
                        let _ = std::fs::remove_dir_all(&dest);
                        return Err(format!(
                            "{name_owned} {version_owned} holds no executable baton-agent at its top"
                        ));
                    }
                }
            }
            releases
                .commit_staged(&dest, &name_owned, &version_owned)
                .map_err(|e| {
                    let _ = std::fs::remove_dir_all(&dest);
                    format!("cannot move the release into place: {e}")
                })
        })
        .await
        .map_err(|e| Failure::new(FailureKind::Internal, format!("the unpack task failed: {e}")))
        .and_then(|r| r.or_fail(FailureKind::Disk));
        // A payload that unpacked is not needed again, but by peers while
        // its rollout goes on; one that did not is bad (it matched its
        // signed digest, so it will not get better).
        let peers = &self.inner.config.peers;
        match (seed, &unpacked, peers.serve) {
            (Some(seed), Ok(()), Some(_)) => {
                let kept = payload.with_extension("seed");
                match std::fs::rename(&payload, &kept) {
                    Ok(()) => seed.keep(&kept, m.size, peers.serve_for),
                    Err(e) => {
                        debug!(error = %e, "cannot keep the payload for peers");
                        let _ = std::fs::remove_file(&payload);
                    }
                }
            }
            _ => {
                let _ = std::fs::remove_file(&payload);
            }
        }
        unpacked?;
        info!(service = %name, %version, "staged");
        Ok(())
    }

    /// Downloads a payload into `downloads/<hex>.partial` (see
    /// [`download`], or [`swarm::download`] when the manifest lists piece
    /// hashes: then peers may serve it), reporting progress on the command.
    async fn download(
        &self,
        id: &str,
        m: &Manifest,
    ) -> Result<(PathBuf, Option<crate::peers::Seed>), Failure> {
        let path = self
            .inner
            .config
            .data_dir
            .join("downloads")
            .join(format!("{}.partial", m.payload_sha256));
        let mut last_progress = Instant::now();
        let fetch = self.inner.fetch.clone();
        let client = move || {
            ArtifactServiceClient::new(fetch.borrow().clone()).max_decoding_message_size(8 << 20)
        };
        let progress = |offset: u64| {
            if last_progress.elapsed() >= PROGRESS_EVERY {
                last_progress = Instant::now();
                self.publish(CommandUpdate {
                    command_id: id.to_owned(),
                    phase: Phase::Running,
                    progress_percent: u32::try_from(offset * 100 / m.size.max(1)).unwrap_or(100),
                    error: String::new(),
                    health_wait: None,
                    failure: None,
                    detail: Default::default(),
                    connections_cut: 0,
                });
            }
        };
        if m.has_pieces() {
            let peers = &self.inner.config.peers;
            let sources = swarm::Sources {
                coordinator: &client,
                tls: peers.creds.as_ref().map(|identity| identity()),
                seeds: &peers.seeds,
                serve: peers.serve.map(|a| a.to_string()),
                serve_for: peers.serve_for,
            };
            let seed =
                swarm::download(sources, m, &path, self.inner.config.download, progress).await?;
            return Ok((path, Some(seed)));
        }
        download(client, m, &path, self.inner.config.download, progress).await?;
        Ok((path, None))
    }
}
