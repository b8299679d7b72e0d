//! The stored form of a rollout: its own versioned records, converted
//! explicitly to and from the in-memory [`Rollout`], so the two can change
//! apart and a step writes only what it changed.
//!
//! Schema 2 (this one), one rollout in several keys:
//!
//! | key | value |
//! |---|---|
//! | `rollouts/<id>` | [`Header`]: the rollout and its services, no hosts (JSON) |
//! | `rollout-clocks/<id>` | [`Clock`]: what moves on most steps (JSON) |
//! | `rollout-plans/<id>/<n>` | the plan as submitted, raw text in parts of 256 KiB |
//! | `rollout-hosts/<id>/<service index>/<host>` | [`HostRecord`] (JSON) |
//! | `manifests/<id>` | [`ManifestRecord`]: a signed manifest, once per [`manifest_id`] |
//! | `events/<id>/<first seq>` | a list of events (see [`super::events`]) |
//! | `rollout-staged/<id>/<first seq>` | [`StagedMark`]s: hosts a step staged (JSON) |
//!
//! A host whose stage command succeeded is not rewritten: the step that
//! took the answer stores a [`StagedMark`] (service, host, command number)
//! in one record for all of them, with the step's events, so staging
//! 10,000 hosts is a handful of transactions, not 80. On load a mark
//! applies to a host whose record still has that very command outstanding
//! (any later change rewrote the host's record whole). A `batond` that
//! does not know marks sees the hosts still staging and sends the stage
//! command again; the agent answers it from its journal.
//!
//! A host's outstanding command is stored as its number, kind and deadline:
//! everything else (service, version, gate, manifest) is the service's and
//! is filled in on load, so a `Stage` command in flight on 10,000 hosts
//! stores its manifest once.
//!
//! Schema 1 (`batond` before this schema) stored the whole rollout as one
//! JSON value at `rollouts/<id>`, without a `schema` field; such a record is
//! converted on load ([`decode_v1`]) and rewritten in schema 2. A record of
//! a newer schema is refused with a message that says which `batond` wrote
//! it.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use baton_common::command::{Command, CommandKind, FailureDetail, FailureKind, HealthGate};
use baton_common::host::HostId;
use serde::{Deserialize, Serialize};

use crate::analysis::Verdict;
use crate::machine::{Bake, HostRun, HostState, Rollout, ServiceRun, ServiceState, State};

#[cfg(test)]
mod tests;

/// The schema this `batond` writes.
pub const SCHEMA: u32 = 2;

/// The key of a rollout's header.
pub fn header_key(id: &str) -> String {
    format!("rollouts/{id}")
}

/// The key of a rollout's [`Clock`].
pub fn clock_key(id: &str) -> String {
    format!("rollout-clocks/{id}")
}

/// The prefix of every rollout's clock: one small record per rollout.
pub const CLOCKS_PREFIX: &str = "rollout-clocks/";

/// The prefix of a rollout's plan text, stored in parts of at most
/// [`PLAN_PART_BYTES`] (a plan may be as long as a write may be large).
pub fn plan_prefix(id: &str) -> String {
    format!("rollout-plans/{id}/")
}

/// The most bytes of one part of a plan's text.
pub const PLAN_PART_BYTES: usize = 256 * 1024;

/// The plan's text in parts, each at most [`PLAN_PART_BYTES`] and cut at
/// a character boundary.
pub fn plan_parts(id: &str, plan: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = plan;
    while !rest.is_empty() || out.is_empty() {
        let mut cut = rest.len().min(PLAN_PART_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (part, tail) = rest.split_at(cut);
        out.push((
            format!("{}{:04}", plan_prefix(id), out.len()),
            part.as_bytes().to_vec(),
        ));
        rest = tail;
    }
    out
}

/// The plan's text from its parts (in key order).
pub fn plan_from_parts(parts: Vec<(String, Vec<u8>)>) -> Result<String, RecordError> {
    let mut bytes = Vec::new();
    for (_, part) in parts {
        bytes.extend(part);
    }
    String::from_utf8(bytes)
        .map_err(|_| RecordError::Inconsistent("the plan text is not UTF-8".into()))
}

/// The prefix of a rollout's host records.
pub fn hosts_prefix(id: &str) -> String {
    format!("rollout-hosts/{id}/")
}

/// The prefix of a rollout's staged marks.
pub fn staged_prefix(id: &str) -> String {
    format!("rollout-staged/{id}/")
}

/// The key of one step's staged marks, by the sequence number of the
/// step's first event (unique: every staged host has its event).
pub fn staged_key(id: &str, first_seq: u64) -> String {
    format!("rollout-staged/{id}/{first_seq:012}")
}

/// A host of service `service` whose stage command number `command`
/// succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedMark {
    /// The service's index.
    #[serde(rename = "s")]
    pub service: usize,
    /// The host.
    #[serde(rename = "h")]
    pub host: String,
    /// The command's number (its id is `<rollout>/<command>`).
    #[serde(rename = "c")]
    pub command: u64,
}

/// A command's number: its id is `<rollout>/<seq>`.
fn command_seq(c: &Command) -> Option<u64> {
    c.id.rsplit_once('/').and_then(|(_, n)| n.parse().ok())
}

/// When `before` → `after` is exactly a stage command that succeeded
/// (staging with stage command n outstanding → staged with nothing
/// outstanding, nothing else changed): its mark.
pub fn staged_only(
    service: usize,
    host: &HostId,
    before: &HostRun,
    after: &HostRun,
) -> Option<StagedMark> {
    let c = before.outstanding.as_ref()?;
    if before.state != HostState::Staging
        || !matches!(c.kind, CommandKind::Stage { .. })
        || after.state != HostState::Staged
        || after.outstanding.is_some()
    {
        return None;
    }
    let mut expected = before.clone();
    expected.state = HostState::Staged;
    expected.outstanding = None;
    if self::host(&expected) != self::host(after) {
        return None;
    }
    Some(StagedMark {
        service,
        host: host.to_string(),
        command: command_seq(c)?,
    })
}

/// Applies stored staged marks to the hosts of a rollout being assembled:
/// a host whose record still has the marked command outstanding is staged.
/// A mark that cannot apply (a record that does not decode, a host the
/// rollout does not have) is skipped and said: without it the host is
/// still staging, and its stage command is sent again, which is safe. The
/// rollout loads either way.
fn apply_staged(
    by_service: &mut [BTreeMap<HostId, HostRun>],
    marks: Vec<(String, Vec<u8>)>,
) -> Vec<String> {
    let mut skipped = Vec::new();
    for (key, value) in marks {
        let marks: Vec<StagedMark> = match serde_json::from_slice(&value) {
            Ok(m) => m,
            Err(e) => {
                skipped.push(format!("{key}: {e}"));
                continue;
            }
        };
        for m in marks {
            let Ok(host) = HostId::try_from(m.host.as_str()) else {
                skipped.push(format!(
                    "{key}: {} is not a host id",
                    baton_common::text::quote(&m.host)
                ));
                continue;
            };
            let Some(h) = by_service.get_mut(m.service).and_then(|s| s.get_mut(&host)) else {
                skipped.push(format!("{key}: no host {host} in service {}", m.service));
                continue;
            };
            let marked = h.state == HostState::Staging
                && h.outstanding.as_ref().is_some_and(|c| {
                    matches!(c.kind, CommandKind::Stage { .. }) && command_seq(c) == Some(m.command)
                });
            if marked {
                h.state = HostState::Staged;
                h.outstanding = None;
            }
        }
    }
    skipped
}

/// A rollout assembled from its records, and the staged marks that could
/// not apply (see [`apply_staged`]), for the log.
#[derive(Debug)]
pub struct Assembled {
    /// The rollout.
    pub rollout: Rollout,
    /// Each mark skipped, and why.
    pub skipped: Vec<String>,
}

/// The key of one host's record in service `si` of a rollout.
pub fn host_key(id: &str, si: usize, host: &HostId) -> String {
    format!("rollout-hosts/{id}/{si:03}/{host}")
}

/// The key of a signed manifest, by its [`manifest_id`].
pub fn manifest_key(id: &str) -> String {
    format!("manifests/{id}")
}

/// What names a signed manifest in the store: the SHA-256 of the manifest
/// and its signature. (Not the payload's digest: one payload may be pushed
/// under several names or versions, each with its own manifest.)
pub fn manifest_id(manifest: &[u8], signature: &[u8]) -> String {
    let mut bytes = Vec::with_capacity(manifest.len() + signature.len() + 8);
    bytes.extend_from_slice(&(manifest.len() as u64).to_be_bytes());
    bytes.extend_from_slice(manifest);
    bytes.extend_from_slice(signature);
    baton_common::hex::sha256_hex(&bytes)
}

/// A record that cannot be turned into a rollout.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not JSON of the expected shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Written by a newer `batond`.
    #[error(
        "written by a newer batond (record schema {0}, this batond reads up to {SCHEMA}): run that version or a newer one"
    )]
    Newer(u32),
    /// A part is missing or does not fit the rest.
    #[error("{0}")]
    Inconsistent(String),
}

/// Times as nanoseconds since the Unix epoch: exact, and a number.
mod nanos {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn to(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok())
            .unwrap_or(0)
    }

    pub fn from(n: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(n)
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(to(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from)
    }

    pub mod option {
        use std::time::SystemTime;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_some(&super::to(*t)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Option<SystemTime>, D::Error> {
            Ok(Option::<u64>::deserialize(d)?.map(super::from))
        }
    }
}

/// `rollouts/<id>`: everything but the plan text and the hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// [`SCHEMA`].
    pub schema: u32,
    /// The rollout's id.
    pub id: String,
    /// Where it is.
    pub state: State,
    /// The state a paused rollout resumes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_to: Option<State>,
    /// Undo everything on failure.
    pub auto_rollback: bool,
    /// Fail when no host turns healthy for this long.
    #[serde(with = "humantime_serde")]
    pub progress_deadline: Duration,
    /// How many services may progress at once.
    pub max_parallel_services: usize,
    /// The services, in topological order.
    pub services: Vec<ServiceHeader>,
    /// When it was started.
    #[serde(with = "nanos")]
    pub created_at: SystemTime,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Host failures tolerated across the rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_budget: Option<u32>,
    /// Who started it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_by: String,
    /// Why it was held when last stepped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<String>,
}

/// `rollout-clocks/<id>`: the fields most steps move, apart from the
/// header so that a step that moves only them writes a few dozen bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clock {
    /// The last change.
    #[serde(with = "nanos")]
    pub updated_at: SystemTime,
    /// Deadlines count from here.
    #[serde(with = "nanos")]
    pub progress_at: SystemTime,
    /// The last command's sequence number.
    pub next_seq: u64,
}

/// One service in a [`Header`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceHeader {
    /// The service.
    pub name: String,
    /// The target version.
    pub version: String,
    /// The target artifact's payload digest.
    pub digest: String,
    /// Its signed manifest's [`manifest_id`]: the manifest is at
    /// `manifests/<id>`.
    pub manifest: String,
    /// Services of the plan that must succeed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// Version requirements on other services.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub requires: BTreeMap<String, String>,
    /// Versions of required services outside the plan.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outside: BTreeMap<String, Vec<String>>,
    /// Hosts replaced at once.
    pub max_parallel: usize,
    /// Hosts that must stay in service.
    pub min_healthy: usize,
    /// Failures tolerated.
    pub max_failures: u32,
    /// The health gate.
    pub gate: HealthGate,
    /// Cumulative host counts per step.
    pub steps: Vec<usize>,
    /// The current step.
    pub step: usize,
    /// Canary: wait for `promote` after each step but the last.
    pub promote: bool,
    /// Wait this long between steps.
    #[serde(
        with = "humantime_serde",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub pause: Option<Duration>,
    /// When the current step completed.
    #[serde(
        with = "nanos::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub step_done_at: Option<SystemTime>,
    /// Failures so far.
    pub failures: u32,
    /// Where it is.
    pub state: ServiceState,
    /// The plan allows a lower version.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_downgrade: bool,
    /// How many host records it has (checked on load).
    pub hosts: usize,
    /// The bake in progress (its checks are the plan's, read again from
    /// the plan's text on load).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bake: Option<Bake>,
    /// The verdicts reached (the last [`crate::analysis::MAX_VERDICTS`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdicts: Vec<Verdict>,
    /// The last step judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judged: Option<usize>,
    /// It needs an approval before its first host.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
    /// It was approved.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approved: bool,
}

/// `rollout-hosts/<id>/<si>/<host>`: one host of one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Where it is.
    pub state: HostState,
    /// The version it ran before (absent: a first install).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// When its activation began.
    #[serde(
        with = "nanos::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub started: Option<SystemTime>,
    /// When its activation (or rollback) ended.
    #[serde(
        with = "nanos::option",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub finished: Option<SystemTime>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The kind of its failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// A failed activation's probe answer and log tail (bounded: at most
    /// 512 characters and 4 KiB).
    #[serde(default, skip_serializing_if = "FailureDetail::is_empty")]
    pub detail: FailureDetail,
    /// This rollout swapped it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub touched: bool,
    /// The command in flight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandRecord>,
    /// Connections its commands had to cut.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cut: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A command in flight: the rest follows from its service and host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRecord {
    /// Its number: the id is `<rollout>/<seq>`.
    pub seq: u64,
    /// `stage`, `activate`, `rollback`, `remove`, `cancel` or `noop`.
    pub kind: String,
    /// When it must have finished.
    #[serde(with = "nanos")]
    pub deadline: SystemTime,
}

/// `manifests/<id>`: a signed manifest, in hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// The manifest exactly as signed.
    pub manifest: String,
    /// Its signature.
    pub signature: String,
}

/// The header of `r`.
pub fn header(r: &Rollout) -> Header {
    Header {
        schema: SCHEMA,
        id: r.id.clone(),
        state: r.state,
        resume_to: r.resume_to,
        auto_rollback: r.auto_rollback,
        progress_deadline: r.progress_deadline,
        max_parallel_services: r.max_parallel_services,
        services: r
            .services
            .iter()
            .map(|s| ServiceHeader {
                name: s.name.clone(),
                version: s.version.clone(),
                digest: s.digest.clone(),
                manifest: manifest_id(&s.manifest, &s.signature),
                depends_on: s.depends_on.clone(),
                requires: s.requires.clone(),
                outside: s.outside.clone(),
                max_parallel: s.max_parallel,
                min_healthy: s.min_healthy,
                max_failures: s.max_failures,
                gate: s.gate,
                steps: s.steps.clone(),
                step: s.step,
                promote: s.promote,
                pause: s.pause,
                step_done_at: s.step_done_at,
                failures: s.failures,
                state: s.state,
                allow_downgrade: s.allow_downgrade,
                hosts: s.hosts.len(),
                bake: s.bake,
                verdicts: s.verdicts.clone(),
                judged: s.judged,
                approval: s.approval,
                approved: s.approved,
            })
            .collect(),
        created_at: r.created_at,
        error: r.error.clone(),
        failure_budget: r.failure_budget,
        started_by: r.started_by.clone(),
        held: r.held.clone(),
    }
}

/// The encoded clock of `r`.
pub fn encode_clock(r: &Rollout) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&Clock {
        updated_at: r.updated_at,
        progress_at: r.progress_at,
        next_seq: r.next_seq,
    })
}

/// Decodes a clock.
pub fn decode_clock(bytes: &[u8]) -> Result<Clock, RecordError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// The encoded header of `r`.
pub fn encode_header(r: &Rollout) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&header(r))
}

/// The record of one host of a rollout.
pub fn host(h: &HostRun) -> HostRecord {
    HostRecord {
        state: h.state,
        from: h.from_version.clone(),
        started: h.started_at,
        finished: h.finished_at,
        error: h.error.clone(),
        failure: h.failure,
        detail: h.detail.clone(),
        touched: h.touched,
        command: h.outstanding.as_ref().map(|c| CommandRecord {
            seq: c
                .id
                .rsplit_once('/')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0),
            kind: c.kind.name().to_owned(),
            deadline: c.deadline,
        }),
        cut: h.connections_cut,
    }
}

/// The encoded record of one host.
pub fn encode_host(h: &HostRun) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&host(h))
}

/// The encoded record of a service's signed manifest.
pub fn encode_manifest(s: &ServiceRun) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&ManifestRecord {
        manifest: baton_common::hex::encode(&s.manifest),
        signature: baton_common::hex::encode(&s.signature),
    })
}

/// The schema of a record at `rollouts/<id>`: 1 when it has none.
pub fn schema_of(bytes: &[u8]) -> Result<u32, RecordError> {
    #[derive(Deserialize)]
    struct Probe {
        schema: Option<u32>,
    }
    let probe: Probe = serde_json::from_slice(bytes)?;
    Ok(probe.schema.unwrap_or(1))
}

/// Decodes the header at `rollouts/<id>` (schema 2; a newer one is
/// refused).
pub fn decode_header(bytes: &[u8]) -> Result<Header, RecordError> {
    match schema_of(bytes)? {
        SCHEMA => Ok(serde_json::from_slice(bytes)?),
        n if n > SCHEMA => Err(RecordError::Newer(n)),
        n => Err(RecordError::Inconsistent(format!(
            "schema {n} is not a header"
        ))),
    }
}

/// Decodes a schema-1 record: the whole rollout in one value (its hosts'
/// `Stage` commands each carried the manifest; now their service does).
pub fn decode_v1(bytes: &[u8]) -> Result<Rollout, RecordError> {
    let mut r: Rollout = serde_json::from_slice(bytes)?;
    for s in &mut r.services {
        for h in s.hosts.values_mut() {
            if let Some(Command {
                kind:
                    CommandKind::Stage {
                        manifest,
                        signature,
                        ..
                    },
                ..
            }) = &mut h.outstanding
            {
                manifest.clear();
                signature.clear();
            }
        }
    }
    Ok(r)
}

/// Decodes a manifest record.
pub fn decode_manifest(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), RecordError> {
    let m: ManifestRecord = serde_json::from_slice(bytes)?;
    let manifest = baton_common::hex::decode(&m.manifest)
        .ok_or_else(|| RecordError::Inconsistent("the manifest is not hex".into()))?;
    let signature = baton_common::hex::decode(&m.signature)
        .ok_or_else(|| RecordError::Inconsistent("the signature is not hex".into()))?;
    Ok((manifest, signature))
}

/// Builds the rollout from its parts: the header, the plan text, each
/// service's signed manifest (by [`manifest_id`]) and the host records (key,
/// value; keys as [`host_key`] makes them).
pub fn assemble(
    header: Header,
    clock: Clock,
    plan: String,
    manifests: &BTreeMap<String, (Vec<u8>, Vec<u8>)>,
    hosts: Vec<(String, Vec<u8>)>,
    staged: Vec<(String, Vec<u8>)>,
) -> Result<Assembled, RecordError> {
    let id = header.id.clone();
    let prefix = hosts_prefix(&id);
    let mut by_service: Vec<BTreeMap<HostId, HostRun>> =
        vec![BTreeMap::new(); header.services.len()];
    for (key, value) in hosts {
        let rest = key.strip_prefix(&prefix).ok_or_else(|| {
            RecordError::Inconsistent(format!("{key} is not a host of rollout {id}"))
        })?;
        let (si, host) = rest
            .split_once('/')
            .ok_or_else(|| RecordError::Inconsistent(format!("{key} is not a host key")))?;
        let si: usize = si
            .parse()
            .map_err(|_| RecordError::Inconsistent(format!("{key} is not a host key")))?;
        let host =
            HostId::try_from(host).map_err(|e| RecordError::Inconsistent(format!("{key}: {e}")))?;
        let s = header.services.get(si).ok_or_else(|| {
            RecordError::Inconsistent(format!("{key}: the rollout has no service {si}"))
        })?;
        let record: HostRecord = serde_json::from_slice(&value)
            .map_err(|e| RecordError::Inconsistent(format!("{key}: {e}")))?;
        let run = host_run(&id, s, record)
            .map_err(|e| RecordError::Inconsistent(format!("{key}: {e}")))?;
        if let Some(services) = by_service.get_mut(si) {
            services.insert(host, run);
        }
    }
    let skipped = apply_staged(&mut by_service, staged);
    // The checks are the plan's: read again from its text, not stored
    // twice.
    // So is the balancer.
    type FromPlan = (
        Vec<crate::analysis::Check>,
        Option<baton_common::traffic::Traffic>,
    );
    let from_plan: BTreeMap<String, FromPlan> = if header
        .services
        .iter()
        .any(|s| s.bake.is_some() || !s.verdicts.is_empty())
        || plan.contains("analysis")
        || plan.contains("traffic")
    {
        crate::plan::Plan::parse(&plan)
            .map_err(|e| RecordError::Inconsistent(format!("the stored plan does not parse: {e}")))?
            .services
            .into_iter()
            .map(|s| (s.name, (s.analysis, s.traffic)))
            .collect()
    } else {
        BTreeMap::new()
    };
    let mut services = Vec::with_capacity(header.services.len());
    let mut next_seq = clock.next_seq;
    for (s, hosts) in header.services.into_iter().zip(by_service) {
        if hosts.len() != s.hosts {
            return Err(RecordError::Inconsistent(format!(
                "service {} has {} host records, its header says {}",
                s.name,
                hosts.len(),
                s.hosts
            )));
        }
        // A step written in parts never reuses a command id, even if a
        // host's record got ahead of the header.
        for h in hosts.values() {
            if let Some(seq) = h
                .outstanding
                .as_ref()
                .and_then(|c| c.id.rsplit_once('/'))
                .and_then(|(_, n)| n.parse::<u64>().ok())
            {
                next_seq = next_seq.max(seq);
            }
        }
        let (manifest, signature) = manifests.get(&s.manifest).cloned().ok_or_else(|| {
            RecordError::Inconsistent(format!(
                "the signed manifest of {} {} ({}) is missing",
                s.name, s.version, s.manifest
            ))
        })?;
        let (analysis, traffic) = from_plan.get(&s.name).cloned().unwrap_or_default();
        services.push(ServiceRun {
            name: s.name,
            version: s.version,
            digest: s.digest,
            manifest,
            signature,
            depends_on: s.depends_on,
            requires: s.requires,
            outside: s.outside,
            max_parallel: s.max_parallel,
            min_healthy: s.min_healthy,
            max_failures: s.max_failures,
            gate: s.gate,
            steps: s.steps,
            step: s.step,
            promote: s.promote,
            pause: s.pause,
            step_done_at: s.step_done_at,
            failures: s.failures,
            state: s.state,
            hosts,
            allow_downgrade: s.allow_downgrade,
            analysis,
            bake: s.bake,
            verdicts: s.verdicts,
            judged: s.judged,
            approval: s.approval,
            approved: s.approved,
            traffic,
            changed: Default::default(),
        });
    }
    let rollout = Rollout {
        id: header.id,
        plan,
        state: header.state,
        resume_to: header.resume_to,
        auto_rollback: header.auto_rollback,
        progress_deadline: header.progress_deadline,
        max_parallel_services: header.max_parallel_services,
        services,
        created_at: header.created_at,
        updated_at: clock.updated_at,
        progress_at: clock.progress_at,
        error: header.error,
        next_seq,
        away: Default::default(),
        failure_budget: header.failure_budget,
        started_by: header.started_by,
        held: header.held,
    };
    Ok(Assembled { rollout, skipped })
}

/// One host's in-memory state from its record.
fn host_run(id: &str, s: &ServiceHeader, r: HostRecord) -> Result<HostRun, String> {
    let outstanding = match r.command {
        None => None,
        Some(c) => {
            let service = s.name.clone();
            let kind = match c.kind.as_str() {
                "noop" => CommandKind::Noop,
                // The manifest is the service's, filled in when sent.
                "stage" => CommandKind::Stage {
                    service,
                    version: s.version.clone(),
                    manifest: Vec::new(),
                    signature: Vec::new(),
                },
                "activate" => CommandKind::Activate {
                    service,
                    version: s.version.clone(),
                    gate: s.gate,
                    allow_downgrade: s.allow_downgrade,
                },
                "rollback" => CommandKind::Rollback {
                    service,
                    version: r
                        .from
                        .clone()
                        .ok_or("a rollback command on a host with no version before")?,
                    gate: s.gate,
                },
                "remove" => CommandKind::Remove { service },
                "cancel" => CommandKind::Cancel { service },
                other => {
                    return Err(format!(
                        "unknown command kind {}",
                        baton_common::text::quote(other)
                    ));
                }
            };
            Some(Command {
                id: format!("{id}/{}", c.seq),
                deadline: c.deadline,
                kind,
                traffic: None,
            })
        }
    };
    Ok(HostRun {
        state: r.state,
        from_version: r.from,
        to_version: s.version.clone(),
        started_at: r.started,
        finished_at: r.finished,
        error: r.error,
        failure: r.failure,
        // Bounded again: a record is read back from a store anyone with
        // access to it may have written.
        detail: FailureDetail::new(&r.detail.probe, &r.detail.log_tail),
        touched: r.touched,
        outstanding,
        connections_cut: r.cut,
        connected: false,
        progress: 0,
        gone_since: None,
    })
}

/// Every record of `r` (clock, plan, manifests, hosts, header): what a
/// rollout converted from schema 1, or a new one, writes. The clock comes
/// first and the header last: a clock without a header is a start that
/// did not finish ([`super::driver`] removes it on load).
pub fn all_records(r: &Rollout) -> Result<Vec<(String, Vec<u8>)>, serde_json::Error> {
    let mut out = vec![(clock_key(&r.id), encode_clock(r)?)];
    let mut digests = std::collections::BTreeSet::new();
    for s in &r.services {
        let id = manifest_id(&s.manifest, &s.signature);
        if digests.insert(id.clone()) {
            out.push((manifest_key(&id), encode_manifest(s)?));
        }
    }
    for (si, s) in r.services.iter().enumerate() {
        for (id, h) in &s.hosts {
            out.push((host_key(&r.id, si, id), encode_host(h)?));
        }
    }
    out.extend(plan_parts(&r.id, &r.plan));
    // The header last: a reader that finds it finds the rest.
    out.push((header_key(&r.id), encode_header(r)?));
    Ok(out)
}
