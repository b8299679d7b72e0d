//! The driver's side of the stored rollout: loading (and converting
//! schema-1 records), removing starts a crash interrupted, and preparing
//! the writes of a step.

use std::collections::BTreeMap;

use baton_common::host::HostId;
use tracing::{info, warn};

use super::{corrupt, events, key, scope};
use crate::rollout::machine::{HostRun, Rollout};
use crate::rollout::record;
use crate::store::{Op, Store, StoreError, batch};

/// Loads a rollout from its header record at `k` (and the rest of its
/// records). The flag says it was a schema-1 record, to be rewritten.
pub(super) async fn load_record(
    store: &dyn Store,
    k: &str,
    v: &[u8],
) -> Result<(Rollout, bool), StoreError> {
    match record::schema_of(v).map_err(|e| corrupt(k, e))? {
        1 => Ok((record::decode_v1(v).map_err(|e| corrupt(k, e))?, true)),
        _ => {
            let header = record::decode_header(v).map_err(|e| corrupt(k, e))?;
            let id = header.id.clone();
            let plan = record::plan_from_parts(store.list(&record::plan_prefix(&id)).await?)
                .map_err(|e| corrupt(k, e))?;
            let mut manifests = BTreeMap::new();
            for s in &header.services {
                if manifests.contains_key(&s.manifest) {
                    continue;
                }
                let mk = record::manifest_key(&s.manifest);
                if let Some(m) = store.get(&mk).await? {
                    let m = record::decode_manifest(&m).map_err(|e| corrupt(&mk, e))?;
                    manifests.insert(s.manifest.clone(), m);
                }
            }
            let ck = record::clock_key(&id);
            let clock = store
                .get(&ck)
                .await?
                .ok_or_else(|| corrupt(&ck, "missing"))?;
            let clock = record::decode_clock(&clock).map_err(|e| corrupt(&ck, e))?;
            let hosts = store.list(&record::hosts_prefix(&id)).await?;
            let staged = store.list(&record::staged_prefix(&id)).await?;
            let assembled = record::assemble(header, clock, plan, &manifests, hosts, staged)
                .map_err(|e| corrupt(k, e))?;
            for why in &assembled.skipped {
                warn!(rollout = %id, %why, "skipping a staged mark; the host's stage command is sent again");
            }
            Ok((assembled.rollout, false))
        }
    }
}

/// Rewrites a schema-1 rollout in the current schema, atomically.
pub(super) async fn convert(store: &dyn Store, r: &Rollout) -> Result<bool, StoreError> {
    let records = record::all_records(r).map_err(|e| corrupt(&key(&r.id), e))?;
    let ops = records.into_iter().map(|(k, v)| Op::Put(k, v)).collect();
    let written = batch::write_atomic(store, &scope(&r.id), ops).await?;
    info!(rollout = %r.id, schema = record::SCHEMA, "converted a stored rollout from schema 1");
    Ok(written.pending)
}

/// Removes the records of starts a crash interrupted: a clock without a
/// header (see [`record::all_records`]). Manifests are shared by id
/// and stay.
pub(super) async fn remove_unfinished_starts(store: &dyn Store) -> Result<(), StoreError> {
    for (k, _) in store.list(record::CLOCKS_PREFIX).await? {
        let Some(id) = k.strip_prefix(record::CLOCKS_PREFIX) else {
            continue;
        };
        if store.get(&key(id)).await?.is_some() {
            continue;
        }
        let mut ops = Vec::new();
        for prefix in [
            record::hosts_prefix(id),
            record::staged_prefix(id),
            record::plan_prefix(id),
            events::prefix(id),
        ] {
            ops.extend(
                store
                    .list(&prefix)
                    .await?
                    .into_iter()
                    .map(|(k, _)| Op::Delete(k)),
            );
        }
        // The clock last: until it goes, a restart finds the rest again.
        ops.push(Op::Delete(k.clone()));
        batch::write_groups(store, batch::groups(ops)?).await?;
        info!(rollout = %id, "removed a rollout whose start a crash interrupted");
    }
    Ok(())
}

/// A rollout's header and clock as stored (encoded).
type Stored = (Vec<u8>, Vec<u8>);

/// The writes of a step: the hosts it changed whose stored record changed
/// (those whose stage command only succeeded as one record of
/// [`record::StagedMark`]s), its events, and the header if it changed
/// (last). Returns them with the new header.
pub(super) fn prepare(
    id: &str,
    r: &Rollout,
    (stored_header, stored_clock): (&[u8], &[u8]),
    changed: &[BTreeMap<HostId, HostRun>],
    history: &[events::RolloutEvent],
) -> Result<(Vec<Op>, Stored), StoreError> {
    let mut ops = Vec::new();
    // Marks are keyed by the step's first event; every staged host has one.
    let first_event = history.first().map(|e| e.seq);
    let mut marks = Vec::new();
    for (si, hosts) in changed.iter().enumerate() {
        let Some(s) = r.services.get(si) else {
            continue;
        };
        for (host, was) in hosts {
            let Some(h) = s.hosts.get(host) else { continue };
            if first_event.is_some()
                && let Some(mark) = record::staged_only(si, host, was, h)
            {
                marks.push(mark);
                continue;
            }
            let k = record::host_key(id, si, host);
            let now = record::encode_host(h).map_err(|e| corrupt(&k, e))?;
            if now != record::encode_host(was).map_err(|e| corrupt(&k, e))? {
                ops.push(Op::Put(k, now));
            }
        }
    }
    if let (Some(first), false) = (first_event, marks.is_empty()) {
        let k = record::staged_key(id, first);
        let v = serde_json::to_vec(&marks).map_err(|e| corrupt(&k, e))?;
        ops.push(Op::Put(k, v));
    }
    for (k, v) in events::records(id, history).map_err(|e| corrupt(&key(id), e))? {
        ops.push(Op::Put(k, v));
    }
    let clock = record::encode_clock(r).map_err(|e| corrupt(&record::clock_key(id), e))?;
    if clock != stored_clock {
        ops.push(Op::Put(record::clock_key(id), clock.clone()));
    }
    let header = record::encode_header(r).map_err(|e| corrupt(&key(id), e))?;
    if header != stored_header {
        ops.push(Op::Put(key(id), header.clone()));
    }
    Ok((ops, (header, clock)))
}
