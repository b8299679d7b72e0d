//! Recovery at start: every service whose `current` release is on disk
//! runs again. A process a previous agent left running is adopted with
//! its sockets (from systemd's fd store or the process itself); a unit is
//! left to systemd; anything else is started.

use super::*;

impl Executor {
    /// Picks up the services a previous agent run left: a process still
    /// running is adopted (not restarted) together with its listening
    /// sockets, a stopped one is started, and a process of another release
    /// left by an interrupted swap is stopped.
    pub async fn recover(&self) {
        for name in self.inner.releases.services() {
            // A swap a crash interrupted left its new symlink unrenamed.
            self.inner.releases.clean(&name);
            if let Err(e) = self.recover_one(&name).await {
                error!(service = %name, error = %e, "cannot recover the service");
            }
        }
        // Stored sockets no service claimed (one removed meanwhile, or a
        // listen entry that changed): close them and tell systemd.
        let unclaimed: Vec<String> = lock(&self.inner.stored)
            .drain()
            .map(|(name, _)| name)
            .collect();
        for name in unclaimed {
            info!(fd = %name, "closing a stored socket no service claims");
            self.inner.notifier.remove_fds(&name);
        }
    }

    pub(super) async fn recover_one(&self, name: &str) -> Result<(), String> {
        let version = self
            .inner
            .releases
            .current(name)
            .ok_or("no current release")?;
        // A host that ran this before the records existed: what runs is
        // the mark to start from. Only then: `current` may be a release
        // whose health gate a crash interrupted, which must not raise it.
        if matches!(self.inner.installed.highest(name), Ok(None))
            && let Err(e) = self.inner.installed.record(name, &version)
        {
            warn!(service = %name, error = %e, "cannot record the installed version");
        }
        let release_dir = self.inner.releases.release_dir(name, &version);
        let spec = service::load(&release_dir, &self.inner.config.vars).map_err(|e| {
            self.set_status(name, &version, ServiceState::Failed, false);
            format!("cannot load the current release {version}: {e}")
        })?;
        let slot = self.slot(name);
        let mut st = slot.state.lock().await;
        if let SupervisorKind::Systemd { unit } = &spec.supervisor {
            info!(service = %name, %version, %unit, "managed by systemd");
            let unit = unit.clone();
            self.install(
                &mut st,
                Release::new(&self.inner.releases, name, &version, spec),
                Box::new(Unit::new(unit)),
            );
            return Ok(());
        }
        let cfg = self.inner.config.supervisor;
        // Every process a previous run left, per release.
        let mut live = Vec::new();
        for dir in self.inner.releases.run_dirs(name) {
            match read_process_file(&dir) {
                Ok(Some(record)) if crate::supervisor::is_alive_record(&record) => {
                    live.push((dir, record))
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(service = %name, dir = %dir.display(), error = %e, "unreadable process file")
                }
            }
        }
        let specs = listen_specs(&spec)?;
        st.sockets = Arc::new(self.recover_sockets(name, &specs, &live));
        if !specs.is_empty() && st.sockets.is_empty() {
            if live.is_empty() {
                // After a reboot nothing runs and nothing was stored: bind
                // afresh before starting the service below.
                self.sockets_for(&mut st, name, &specs)?;
            } else {
                error!(service = %name, "cannot recover the running service's sockets; its next activation will fail to bind them until it is restarted");
            }
        }
        let mut current = None;
        for (dir, record) in live {
            let rel = record.release_dir.clone();
            let this_spec =
                service::load(&rel, &self.inner.config.vars).unwrap_or_else(|_| spec.clone());
            let adopted =
                Supervisor::adopt_listening(name, &rel, this_spec, &dir, cfg, st.sockets.clone())
                    .map_err(|e| e.to_string())?;
            let Some(sup) = adopted else { continue };
            if record.version == version && current.is_none() {
                info!(service = %name, %version, pid = ?sup.pid(), "adopted the running service");
                current = Some(sup);
            } else {
                info!(service = %name, running = %record.version, current = %version, "stopping a process an interrupted swap left behind");
                if let Err(e) = sup.stop().await {
                    warn!(service = %name, error = %e, "cannot stop the stale process");
                }
            }
        }
        let sup = match current {
            Some(sup) => sup,
            None => {
                let run_dir = self.inner.releases.run_dir(name, &version);
                let sup = Supervisor::start_listening(
                    name,
                    &version,
                    &release_dir,
                    spec.clone(),
                    &run_dir,
                    cfg,
                    st.sockets.clone(),
                )
                .map_err(|e| {
                    self.set_status(name, &version, ServiceState::Failed, false);
                    format!("cannot start {version}: {e}")
                })?;
                info!(service = %name, %version, "started the service, which was not running");
                sup
            }
        };
        self.install(
            &mut st,
            Release::new(&self.inner.releases, name, &version, spec),
            Box::new(sup),
        );
        Ok(())
    }

    /// The service's listening sockets after an agent restart: from
    /// systemd's fd store if it gave them back, else copied out of a live
    /// process that has them. Entries found nowhere are bound again later.
    pub(super) fn recover_sockets(
        &self,
        name: &str,
        specs: &[ListenSpec],
        live: &[(PathBuf, crate::supervisor::ProcessRecord)],
    ) -> Vec<ListenSocket> {
        if specs.is_empty() {
            return Vec::new();
        }
        let mut stored = lock(&self.inner.stored);
        let from_store: Option<Vec<ListenSocket>> = specs
            .iter()
            .map(|spec| {
                let fd = stored.remove(&format!("{name}={}", spec.fd_name()))?;
                spec.matches(&fd).then(|| ListenSocket {
                    spec: spec.clone(),
                    fd,
                })
            })
            .collect();
        if let Some(sockets) = from_store {
            info!(service = %name, count = sockets.len(), "recovered the listening sockets from systemd's fd store");
            return sockets;
        }
        let texts: Vec<String> = specs.iter().map(ListenSpec::text).collect();
        for (_, record) in live {
            if record.listen != texts {
                continue;
            }
            match crate::sockets::recover(record.pid, specs) {
                Ok(sockets) => {
                    info!(service = %name, pid = record.pid, count = sockets.len(), "recovered the listening sockets from the running service");
                    return sockets;
                }
                Err(e) => {
                    warn!(service = %name, error = %e, "cannot recover the listening sockets from the running service")
                }
            }
        }
        Vec::new()
    }
}

/// The descriptors systemd handed this agent from its fd store
/// (`LISTEN_FDS`, named `<service>=<fd name>` in `LISTEN_FDNAMES`).
pub(super) fn stored_fds() -> HashMap<String, OwnedFd> {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|n| n.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut out = HashMap::new();
    let mut fds = listenfd::ListenFd::from_env();
    for (i, name) in names.into_iter().enumerate() {
        let fd: Option<OwnedFd> = match fds.take_tcp_listener(i) {
            Ok(Some(l)) => Some(l.into()),
            _ => match fds.take_unix_listener(i) {
                Ok(Some(l)) => Some(l.into()),
                _ => None,
            },
        };
        if let Some(fd) = fd {
            out.insert(name, fd);
        }
    }
    out
}
