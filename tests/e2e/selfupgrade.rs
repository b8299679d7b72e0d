//! The agent upgrading itself through a rollout of an artifact of kind
//! `agent`: batch by batch, services untouched and serving throughout, and
//! a new agent that does not come back reverted to the one before.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use baton_tests::fleet::{Fleet, agent_pid_file};
use baton_tests::load::Load;
use baton_tests::{SOON, bin, wait_until};
use serde_json::Value;

const HOSTS: [&str; 3] = ["h1", "h2", "h3"];

/// Packs and pushes `baton-agent` `version`: the real binary, or `script`.
fn push_agent(fleet: &Fleet, version: &str, script: Option<&str>) {
    let dir = fleet.env.path(&format!("agent-src-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let binary = dir.join("baton-agent");
    match script {
        Some(text) => std::fs::write(&binary, text).unwrap(),
        None => {
            std::fs::copy(bin("baton-agent"), &binary).unwrap();
        }
    }
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = fleet.env.path(&format!("baton-agent-{version}.baton"));
    let key = fleet.env.path("release.key");
    let out = fleet.baton(&[
        "artifact",
        "pack",
        dir.to_str().unwrap(),
        "--kind",
        "agent",
        "--version",
        version,
        "--sign-key",
        key.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    fleet.push(&file);
}

fn plan(version: &str, deadline: &str) -> String {
    format!(
        "[[service]]\nname = \"baton-agent\"\nversion = \"{version}\"\nmax_parallel = 1\nmin_healthy_time = \"300ms\"\nhealthy_deadline = \"{deadline}\"\n"
    )
}

fn agent_versions(fleet: &Fleet) -> BTreeMap<String, (bool, String)> {
    fleet
        .env
        .hosts(&fleet.batond.url())
        .iter()
        .map(|h: &Value| {
            (
                h["host_id"].as_str().unwrap().to_owned(),
                (
                    h["connected"] == true,
                    h["agent_version"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

fn wait_agents_at(fleet: &Fleet, version: &str) {
    wait_until(&format!("every agent to run {version}"), SOON, || {
        agent_versions(fleet)
            .values()
            .all(|(c, v)| *c && v == version)
            .then_some(())
    });
}

fn agent_exe(pid: i32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap()
}

#[test]
fn the_agent_upgrades_itself_under_load_and_a_broken_one_is_reverted() {
    let fleet = Fleet::start(&HOSTS);
    fleet.install("1.0.0");
    let service_pids: BTreeMap<&str, Vec<i32>> =
        HOSTS.iter().map(|h| (*h, fleet.service_pids(h))).collect();
    let agent_pids: BTreeMap<&str, i32> = HOSTS
        .iter()
        .map(|h| (*h, fleet.agents[*h].pid().as_raw()))
        .collect();
    let loads: Vec<Load> = HOSTS
        .iter()
        .map(|h| Load::start(fleet.addr(h), 2))
        .collect();

    // A good new agent: same binary, packed as 9.0.0.
    push_agent(&fleet, "9.0.0", None);
    let id = fleet.start_rollout(&plan("9.0.0", "30s"));
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    assert_eq!(s["state"], "succeeded", "{s}");
    let hosts = Fleet::hosts_of(&s);
    for h in HOSTS {
        assert_eq!(hosts[h]["state"], "healthy", "{s}");
        assert_eq!(hosts[h]["from_version"], baton_common::VERSION, "{s}");
    }
    // One host at a time: each started after the one before finished.
    let mut spans: Vec<(String, String)> = hosts
        .values()
        .map(|h| {
            (
                h["started_at"].as_str().unwrap().to_owned(),
                h["finished_at"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    spans.sort();
    assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:?}");
    wait_agents_at(&fleet, "9.0.0");
    for h in HOSTS {
        // Re-executed in place: same pid, new binary; services untouched.
        assert_eq!(fleet.agents[h].pid().as_raw(), agent_pids[h]);
        let exe = agent_exe(agent_pids[h]);
        assert!(
            exe.ends_with("agent/baton-agent/releases/9.0.0/baton-agent"),
            "{h} runs {}",
            exe.display()
        );
        assert_eq!(
            fleet.service_pids(h),
            service_pids[h],
            "{h}'s service was restarted"
        );
    }
    // The new agents still run the services' upgrades.
    fleet.release("2.0.0", false);
    let s = fleet.roll("2.0.0", "min_healthy_time = \"200ms\"\n");
    assert_eq!(s["state"], "succeeded", "{s}");
    let service_pids: BTreeMap<&str, Vec<i32>> =
        HOSTS.iter().map(|h| (*h, fleet.service_pids(h))).collect();

    // A new agent that never comes back (it hangs) and one that dies at
    // once: each fails on the first host, is reverted there by the
    // watchdog, and the rollout rolls back.
    for (version, script, why) in [
        (
            "9.1.0",
            "#!/bin/sh\nexec sleep 600\n",
            "did not come back healthy within 3s",
        ),
        (
            "9.2.0",
            "#!/bin/sh\nexit 3\n",
            "exited before it came back healthy",
        ),
    ] {
        push_agent(&fleet, version, Some(script));
        let id = fleet.start_rollout(&plan(version, "3s"));
        let s = fleet.wait_done(&id, Duration::from_secs(120));
        assert_eq!(s["state"], "rolled_back", "{s}");
        // The host that tried it failed, and was rolled back (to the
        // agent it already runs again); the others never started.
        let failed: Vec<Value> = Fleet::hosts_of(&s)
            .into_values()
            .filter(|h| h["error"].is_string())
            .collect();
        assert_eq!(failed.len(), 1, "{s}");
        assert_eq!(failed[0]["state"], "rolled_back", "{s}");
        let error = failed[0]["error"].as_str().unwrap();
        assert!(
            error.contains(why) && error.contains("reverted to 9.0.0"),
            "{error}"
        );
        wait_agents_at(&fleet, "9.0.0");
        for h in HOSTS {
            assert_eq!(
                fleet.service_pids(h),
                service_pids[h],
                "{h}'s service was restarted"
            );
        }
    }
    // The reverted host runs 9.0.0 again, in a process the watchdog
    // started (its pid is in agent.pid).
    for h in HOSTS {
        let pid = agent_pid_file(&fleet.data_dir(h)).expect("a live agent");
        assert!(agent_exe(pid).ends_with("releases/9.0.0/baton-agent"));
    }
    for load in loads {
        let stats = load.finish();
        assert_eq!(
            (stats.failed, stats.refused),
            (0, 0),
            "requests failed while agents were replaced: {stats:?}"
        );
        assert!(stats.ok > 50, "too little load to mean anything: {stats:?}");
    }
}
