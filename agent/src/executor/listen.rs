//! The listening sockets a release declares (`listen`): bound once by the
//! agent, kept across activations (and in systemd's fd store), handed to
//! each new process, closed when no release declares them any more.

use super::*;

impl Executor {
    /// The sockets for `specs`: kept ones reused, new ones bound (and put
    /// in systemd's fd store when the agent runs under systemd).
    pub(super) fn sockets_for(
        &self,
        st: &mut SlotState,
        name: &str,
        specs: &[ListenSpec],
    ) -> Result<Arc<Vec<ListenSocket>>, String> {
        if specs.iter().eq(st.sockets.iter().map(|s| &s.spec)) {
            return Ok(st.sockets.clone());
        }
        let mut out = Vec::with_capacity(specs.len());
        let mut fresh = Vec::new();
        for spec in specs {
            let existing = st.sockets.iter().find(|s| &s.spec == spec);
            let fd = match existing {
                Some(s) => {
                    s.fd.try_clone()
                        .map_err(|e| format!("cannot duplicate {}: {e}", spec.text()))?
                }
                None => {
                    let fd = spec
                        .bind()
                        .map_err(|e| format!("cannot listen on {}: {e}", spec.text()))?;
                    info!(service = %name, listen = %spec.text(), "listening on behalf of the service");
                    fresh.push(spec.clone());
                    fd
                }
            };
            out.push(ListenSocket {
                spec: spec.clone(),
                fd,
            });
        }
        // Stored only once every socket is bound, so a failed bind leaves
        // nothing behind in systemd's store.
        for s in out.iter().filter(|s| fresh.contains(&s.spec)) {
            if let Err(e) = self
                .inner
                .notifier
                .store_fds(&format!("{name}={}", s.spec.fd_name()), &[s.fd.as_fd()])
            {
                warn!(service = %name, error = %e, "cannot put the socket in systemd's fd store");
            }
        }
        let sockets = Arc::new(out);
        st.sockets = sockets.clone();
        Ok(sockets)
    }

    /// Closes the sockets `specs` does not declare, and takes them out of
    /// systemd's fd store.
    pub(super) fn release_sockets(&self, st: &mut SlotState, name: &str, specs: &[ListenSpec]) {
        if st.sockets.iter().all(|s| specs.contains(&s.spec)) {
            return;
        }
        let mut left = Vec::new();
        for s in st.sockets.iter() {
            if specs.contains(&s.spec) {
                if let Ok(fd) = s.fd.try_clone() {
                    left.push(ListenSocket {
                        spec: s.spec.clone(),
                        fd,
                    });
                }
            } else {
                info!(service = %name, listen = %s.spec.text(), "closing a socket the service no longer declares");
                self.inner
                    .notifier
                    .remove_fds(&format!("{name}={}", s.spec.fd_name()));
            }
        }
        st.sockets = Arc::new(left);
    }
}

/// Parses a spec's `listen` entries.
pub(super) fn listen_specs(spec: &ServiceSpec) -> Result<Vec<ListenSpec>, String> {
    spec.listen.iter().map(|l| ListenSpec::parse(l)).collect()
}
