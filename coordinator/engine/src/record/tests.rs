#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_common::command::{CommandUpdate, Outcome};

use super::*;
use crate::machine::{Event, apply};

fn t(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_764_000_000_000 + ms)
}

/// A rollout of `hosts` hosts through staging and into its first batch,
/// with a plan and a manifest of realistic size.
fn rollout(hosts: usize) -> Rollout {
    let plan = "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nmax_parallel = 100\n".to_owned();
    let mut r = crate::machine::tests_support::single("r-1764000000000-abcd", "web", hosts, plan);
    let _ = apply(&mut r, &[Event::Tick], t(1)).unwrap();
    // Every host staged: the first batch activates.
    let answers: Vec<Event> = r.services[0]
        .hosts
        .iter()
        .map(|(id, h)| {
            Event::Update(
                id.clone(),
                CommandUpdate::done(&h.outstanding.as_ref().unwrap().id, Outcome::Succeeded, ""),
            )
        })
        .collect();
    let _ = apply(&mut r, &answers, t(2)).unwrap();
    r.take_changed();
    r
}

fn load(r: &Rollout) -> Rollout {
    let records = all_records(r).unwrap();
    let header = decode_header(&records.last().unwrap().1).unwrap();
    let clock = decode_clock(&records[0].1).unwrap();
    let mut plan = Vec::new();
    let mut hosts = Vec::new();
    let mut manifests = BTreeMap::new();
    for (k, v) in records {
        if k.starts_with("rollout-plans/") {
            plan.push((k, v));
        } else if k.starts_with("rollout-hosts/") {
            hosts.push((k, v));
        } else if let Some(digest) = k.strip_prefix("manifests/") {
            manifests.insert(digest.to_owned(), decode_manifest(&v).unwrap());
        }
    }
    assemble(
        header,
        clock,
        plan_from_parts(plan).unwrap(),
        &manifests,
        hosts,
        vec![],
    )
    .unwrap()
    .rollout
}

#[test]
fn a_rollout_round_trips_through_its_records() {
    let r = rollout(250);
    let mut loaded = load(&r);
    loaded.set_connections(|_| true);
    let mut expected = r.clone();
    for s in &mut expected.services {
        for h in s.hosts.values_mut() {
            h.progress = 0;
            h.gone_since = None;
        }
    }
    expected.away.clear();
    assert_eq!(loaded, expected);
}

#[test]
fn stored_records_are_small_and_the_manifest_is_stored_once() {
    let r = rollout(1000);
    let records = all_records(&r).unwrap();
    let manifests = records
        .iter()
        .filter(|(k, _)| k.starts_with("manifests/"))
        .count();
    assert_eq!(manifests, 1);
    let largest_host = records
        .iter()
        .filter(|(k, _)| k.starts_with("rollout-hosts/"))
        .map(|(_, v)| v.len())
        .max()
        .unwrap();
    // An activating host with its command: a few hundred bytes, not the
    // manifest.
    assert!(largest_host < 400, "{largest_host} bytes");
    let header = &records.last().unwrap().1;
    assert!(header.len() < 800, "{} bytes", header.len());
    // What most steps write besides their hosts.
    assert!(records[0].1.len() < 100, "{} bytes", records[0].1.len());
}

#[test]
fn a_plan_of_the_largest_size_is_stored_in_parts_under_the_write_limit() {
    let plan = "# é\n".repeat(crate::plan::MAX_PLAN_BYTES / 5);
    let parts = plan_parts("r-1", &plan);
    assert!(parts.len() > 1);
    assert!(parts.iter().all(|(_, v)| v.len() <= PLAN_PART_BYTES));
    assert_eq!(plan_from_parts(parts).unwrap(), plan);
    assert_eq!(plan_from_parts(plan_parts("r-1", "")).unwrap(), "");
}

#[test]
fn a_record_of_a_newer_schema_is_refused_with_what_to_do() {
    let r = rollout(3);
    let mut header: serde_json::Value =
        serde_json::from_slice(&encode_header(&r).unwrap()).unwrap();
    header["schema"] = serde_json::json!(SCHEMA + 1);
    let err = decode_header(&serde_json::to_vec(&header).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("newer batond") && err.contains("run that version"),
        "{err}"
    );
}

#[test]
fn a_schema_1_record_as_batond_wrote_it_still_loads() {
    // Written by batond before schema 2 (one value, no `schema`): a
    // rollout of one service over two hosts, one staged, one staging.
    let v1 = include_bytes!("v1.json");
    assert_eq!(schema_of(v1).unwrap(), 1);
    let r = decode_v1(v1).unwrap();
    assert_eq!(r.services[0].hosts.len(), 2);
    let staging = &r.services[0].hosts[&HostId::try_from("h2").unwrap()];
    assert_eq!(staging.state, HostState::Staging);
    let cmd = staging.outstanding.as_ref().unwrap();
    // Converted, it loads back the same.
    let again = load(&r);
    assert_eq!(again, r);
    assert_eq!(
        again.services[0].hosts[&HostId::try_from("h2").unwrap()]
            .outstanding
            .as_ref(),
        Some(cmd)
    );
}

#[test]
fn a_host_record_that_got_ahead_of_its_header_never_reuses_a_command_id() {
    let r = rollout(3);
    let mut records = all_records(&r).unwrap();
    // The clock of an older state: next_seq behind the hosts' commands.
    let header = decode_header(&records.pop().unwrap().1).unwrap();
    let mut clock = decode_clock(&records[0].1).unwrap();
    let highest = clock.next_seq;
    clock.next_seq = 1;
    let hosts: Vec<_> = records
        .iter()
        .filter(|(k, _)| k.starts_with("rollout-hosts/"))
        .cloned()
        .collect();
    let mut manifests = BTreeMap::new();
    manifests.insert(
        manifest_id(&r.services[0].manifest, &r.services[0].signature),
        (
            r.services[0].manifest.clone(),
            r.services[0].signature.clone(),
        ),
    );
    let loaded = assemble(header, clock, r.plan.clone(), &manifests, hosts, vec![])
        .unwrap()
        .rollout;
    assert_eq!(loaded.next_seq, highest);
}

#[test]
fn two_manifests_of_one_payload_are_stored_apart() {
    // One payload pushed as two versions: one digest, two signed manifests.
    let mut r = rollout(2);
    let mut other = r.services[0].clone();
    other.name = "web-canary".into();
    other.manifest = vec![b'n'; 1024];
    r.services.push(other);
    let records = all_records(&r).unwrap();
    let manifests: Vec<&String> = records
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("manifests/"))
        .collect();
    assert_eq!(manifests.len(), 2, "{manifests:?}");
    let loaded = load(&r);
    assert_eq!(loaded.services[0].manifest, r.services[0].manifest);
    assert_eq!(loaded.services[1].manifest, r.services[1].manifest);
}

/// A step that only staged hosts stores marks, not host records; on load
/// a mark stages a host whose record still has that command outstanding,
/// and nothing else.
#[test]
fn staged_marks_stage_exactly_the_hosts_whose_command_they_name() {
    let plan = "[[service]]\nname = \"web\"\nversion = \"2.0.0\"\nmax_parallel = 100\n".to_owned();
    let mut r = crate::machine::tests_support::single("r-1764000000000-abcd", "web", 4, plan);
    let _ = apply(&mut r, &[Event::Tick], t(1)).unwrap();
    r.take_changed();
    // What is stored now: every host staging.
    let stored = all_records(&r).unwrap();
    let ids: Vec<HostId> = r.services[0].hosts.keys().cloned().collect();
    let answer = |r: &Rollout, i: usize, outcome: Outcome| {
        let h = &r.services[0].hosts[&ids[i]];
        Event::Update(
            ids[i].clone(),
            CommandUpdate::done(&h.outstanding.as_ref().unwrap().id, outcome, "no"),
        )
    };
    let events = [
        answer(&r, 0, Outcome::Succeeded),
        answer(&r, 1, Outcome::Succeeded),
        answer(&r, 2, Outcome::Failed),
    ];
    let _ = apply(&mut r, &events, t(2)).unwrap();
    let changed = r.take_changed();
    let mut marks = Vec::new();
    for (host, was) in &changed[0] {
        let now = &r.services[0].hosts[host];
        marks.extend(staged_only(0, host, was, now));
    }
    // A success is a mark; a failure changed more than that.
    assert_eq!(marks.len(), 2, "{marks:?}");
    assert!(marks.iter().all(|m| m.host != ids[2].to_string()));

    let header = decode_header(&stored.last().unwrap().1).unwrap();
    let clock = decode_clock(&stored[0].1).unwrap();
    let mut manifests = BTreeMap::new();
    manifests.insert(
        manifest_id(&r.services[0].manifest, &r.services[0].signature),
        (
            r.services[0].manifest.clone(),
            r.services[0].signature.clone(),
        ),
    );
    let hosts: Vec<(String, Vec<u8>)> = stored
        .iter()
        .filter(|(k, _)| k.starts_with("rollout-hosts/"))
        .cloned()
        .collect();
    // A mark for a command that is no longer the host's (one re-sent
    // since, say) changes nothing.
    let mut stale = marks.clone();
    stale.push(StagedMark {
        service: 0,
        host: ids[3].to_string(),
        command: 999,
    });
    let key = staged_key(&r.id, 7);
    let loaded = assemble(
        header,
        clock,
        r.plan.clone(),
        &manifests,
        hosts.clone(),
        vec![(key.clone(), serde_json::to_vec(&stale).unwrap())],
    )
    .unwrap();
    assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
    let loaded = loaded.rollout;
    let state = |i: usize| loaded.services[0].hosts[&ids[i]].state;
    assert_eq!(state(0), HostState::Staged);
    assert_eq!(state(1), HostState::Staged);
    assert!(loaded.services[0].hosts[&ids[0]].outstanding.is_none());
    // Host 2's failure was not marked (its record is written whole); host
    // 3's stale mark did nothing.
    assert_eq!(state(2), HostState::Staging);
    assert_eq!(state(3), HostState::Staging);
    assert!(loaded.services[0].hosts[&ids[3]].outstanding.is_some());
    // Marks that cannot apply (a host the rollout does not have, a record
    // that does not decode) are skipped and said; the rollout still loads,
    // its hosts still staging.
    let header = decode_header(&stored.last().unwrap().1).unwrap();
    let clock = decode_clock(&stored[0].1).unwrap();
    let bad = vec![StagedMark {
        service: 0,
        host: "nope".into(),
        command: 1,
    }];
    let loaded = assemble(
        header,
        clock,
        r.plan.clone(),
        &manifests,
        hosts,
        vec![
            (key, serde_json::to_vec(&bad).unwrap()),
            (staged_key(&r.id, 8), b"\x00{garbage".to_vec()),
        ],
    )
    .unwrap();
    assert_eq!(loaded.skipped.len(), 2, "{:?}", loaded.skipped);
    assert!(
        loaded.skipped[0].contains("no host nope"),
        "{:?}",
        loaded.skipped
    );
    assert_eq!(
        loaded.rollout.services[0].hosts[&ids[0]].state,
        HostState::Staging
    );
}

#[test]
fn a_bake_its_verdicts_and_the_checks_survive_a_reload() {
    let plan = "failure_budget = 3\n[[service]]\nname = \"web\"\nversion = \"2.0.0\"\napproval = true\n[[service.analysis]]\nname = \"errors\"\nkind = \"metrics\"\nurl = \"http://127.0.0.1:8080/metrics\"\nratio = [\"e\", \"r\"]\nmax = 0.01\n";
    let mut r =
        crate::machine::tests_support::single("r-1764000000000-abcd", "web", 3, plan.to_owned());
    let parsed = crate::plan::Plan::parse(plan).unwrap();
    r.failure_budget = parsed.failure_budget;
    r.started_by = "operator alice".into();
    let s = &mut r.services[0];
    s.analysis.clone_from(&parsed.services[0].analysis);
    s.approval = true;
    s.approved = true;
    s.judged = Some(0);
    s.bake = Some(crate::machine::Bake {
        step: 1,
        since: t(5),
    });
    s.verdicts = vec![crate::analysis::Verdict::new(
        &s.analysis[0],
        0,
        crate::analysis::Outcome::Pass,
        "0.001 within 0.01".into(),
        t(4),
    )];
    let loaded = load(&r);
    let (a, b) = (&loaded.services[0], &r.services[0]);
    assert_eq!(a.analysis, b.analysis, "the checks come back from the plan");
    assert_eq!(
        (a.bake, &a.verdicts, a.judged),
        (b.bake, &b.verdicts, Some(0))
    );
    assert!(a.approval && a.approved);
    assert_eq!(loaded.failure_budget, Some(3));
    assert_eq!(loaded.started_by, "operator alice");
    // A header with verdicts whose plan no longer parses is refused, not
    // half loaded.
    let mut broken = r.clone();
    broken.plan = "this is not a plan".into();
    let records = all_records(&broken).unwrap();
    let header = decode_header(&records.last().unwrap().1).unwrap();
    let clock = decode_clock(&records[0].1).unwrap();
    let manifests: BTreeMap<String, (Vec<u8>, Vec<u8>)> = records
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix("manifests/")?.to_owned(),
                decode_manifest(v).unwrap(),
            ))
        })
        .collect();
    let hosts: Vec<(String, Vec<u8>)> = records
        .iter()
        .filter(|(k, _)| k.starts_with("rollout-hosts/"))
        .cloned()
        .collect();
    let e = assemble(
        header,
        clock,
        broken.plan.clone(),
        &manifests,
        hosts,
        vec![],
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("does not parse"), "{e}");
}
