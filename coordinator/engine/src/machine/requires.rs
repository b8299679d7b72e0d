//! Version requirements between services: `requires = { db = ">=2" }`.

use super::{HostState, Rollout};
pub use baton_common::version::satisfies;

/// The first host (and version) that breaks one of service `si`'s
/// requirements now, counting the versions this rollout installed.
pub(super) fn unmet_requirement(r: &Rollout, si: usize) -> Option<String> {
    let s = &r.services[si];
    for (dep, req) in &s.requires {
        if let Some(d) = r.services.iter().find(|o| &o.name == dep) {
            for (host, h) in &d.hosts {
                if matches!(h.state, HostState::Failed | HostState::RolledBack) {
                    continue; // a tolerated failure does not block dependents
                }
                let running = if h.state == HostState::Healthy {
                    Some(h.to_version.as_str())
                } else {
                    h.from_version.as_deref()
                };
                if let Some(v) = running
                    && !satisfies(v, req)
                {
                    return Some(format!(
                        "{} requires {dep} {req}, but {host} runs {dep} {v}",
                        s.name
                    ));
                }
            }
        } else if let Some(bad) = s
            .outside
            .get(dep)
            .into_iter()
            .flatten()
            .find(|v| !satisfies(v, req))
        {
            return Some(format!(
                "{} requires {dep} {req}, but a host runs {dep} {bad}",
                s.name
            ));
        }
    }
    None
}
