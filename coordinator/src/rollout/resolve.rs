//! Resolving a plan at the edge: [`gather`] reads the fleet and the
//! artifacts the plan names, and the engine's pure
//! [`baton_engine::resolve::resolve`] turns the plan and those facts into
//! a rollout. Both run in the API handler's task, not in the driver, so a
//! large plan or fleet costs the request that brought it, never the
//! rollouts already running.

use std::time::SystemTime;

pub use baton_engine::resolve::{Facts, MAX_HOST_RUNS, Pushed, resolve, running_version};

use super::RolloutError;
use super::plan::Plan;
use crate::artifacts::{ArtifactRecord, Artifacts};
use crate::fleet::FleetHandle;
use crate::store::StoreError;

/// What a rollout carries of a pushed artifact.
pub fn pushed(a: &ArtifactRecord) -> Result<Pushed, RolloutError> {
    Ok(Pushed {
        digest: a.digest.clone(),
        manifest: a.manifest.clone().into_bytes(),
        signature: baton_common::hex::decode(&a.signature).ok_or_else(|| {
            RolloutError::Store(StoreError::Corrupt {
                key: format!("artifacts/{}/{}", a.name, a.version),
                reason: "its signature is not hex".to_owned(),
            })
        })?,
    })
}

pub(super) fn artifact_error(e: crate::artifacts::ArtifactStoreError) -> RolloutError {
    match e {
        crate::artifacts::ArtifactStoreError::Store(e) => RolloutError::Store(e),
        other => RolloutError::Store(StoreError::Backend {
            op: "artifact lookup",
            reason: other.to_string(),
        }),
    }
}

/// Reads what [`resolve`] needs for `plan`: the fleet and the artifacts it
/// names (the list of all artifacts only when one is missing).
pub async fn gather(
    plan: &Plan,
    fleet: &FleetHandle,
    artifacts: &Artifacts,
) -> Result<Facts, RolloutError> {
    let mut facts = Facts {
        fleet: fleet.list().await.map_err(|_| RolloutError::Stopped)?,
        ..Facts::default()
    };
    let mut missing = false;
    for svc in &plan.services {
        match artifacts
            .get(&svc.name, &svc.version)
            .await
            .map_err(artifact_error)?
        {
            Some(a) => {
                facts
                    .artifacts
                    .insert((svc.name.clone(), svc.version.clone()), pushed(&a)?);
            }
            None => missing = true,
        }
    }
    if missing {
        for a in artifacts.list().await.map_err(artifact_error)? {
            if plan.services.iter().any(|s| s.name == a.name) {
                facts.pushed.entry(a.name).or_default().push(a.version);
            }
        }
    }
    Ok(facts)
}

/// A new rollout id: creation time, then a random tail.
pub fn new_id(now: SystemTime) -> String {
    format!(
        "r-{}-{:04x}",
        baton_common::time::unix_millis(now),
        fastrand::u16(..)
    )
}
