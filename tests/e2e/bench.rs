//! The benchmark harness as a smoke test: every scenario of `baton-bench`
//! runs at a small size against the real binaries and reports every
//! figure. Whether the figures meet their targets is for the benchmark on
//! a quiet machine (`BENCHMARKS.md`), not for a test on a shared one.

use std::process::Command;

use baton_tests::bin;
use serde_json::Value;

/// Every figure a scenario must report.
const FIGURES: &[(&str, &[&str])] = &[
    (
        "memory",
        &["bytes_per_agent", "rss_idle_mb", "rss_loaded_mb"],
    ),
    ("fanout", &["p50_ms", "p100_ms"]),
    ("reconnect", &["all_back_ms", "gave_up"]),
    ("rollout", &["overhead_ratio", "ideal_s"]),
    (
        "artifact",
        &[
            "verify_mb_per_s",
            "coordinator_egress_ratio",
            "sha256_mb_per_s",
            "aes_256_gcm_mb_per_s",
            "disk_write_mb_per_s",
            "cpu_bound_mb_per_s",
            "batond_cpu_ns_per_byte",
            "agent_cpu_ns_per_byte",
            "lean_tls_mb_per_s",
            "lean_tls_cpu_ns_per_byte",
        ],
    ),
    ("agent-idle", &["rss_mb", "cpu_percent"]),
    (
        "swarm-sim",
        &[
            "staged_seconds",
            "coordinator_egress_ratio",
            "scheduler_us_per_ask",
        ],
    ),
    (
        "analysis",
        &[
            "detected_within_3m",
            "false_abort_rate",
            "bake_10000_hosts_ms",
        ],
    ),
];

#[test]
fn every_scenario_runs_small_and_reports_every_figure() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("BENCHMARKS.md");
    let out = Command::new(bin("baton-bench"))
        .args([
            "all",
            "--simulated-only",
            "--agents",
            "200",
            "--hosts",
            "20",
            "--size-mb",
            "8",
            "--settle",
            "1s",
            "--idle-seconds",
            "2",
            "--markdown",
        ])
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "baton-bench all failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).expect("one JSON document on stdout");
    assert!(doc["machine"]["cores"].as_u64().unwrap() >= 1);
    let results = doc["results"].as_array().unwrap();
    for (scenario, figures) in FIGURES {
        let r = results
            .iter()
            .find(|r| r["scenario"] == *scenario)
            .unwrap_or_else(|| panic!("no {scenario} result in {doc}"));
        for figure in *figures {
            let v = r["figures"][figure]
                .as_f64()
                .unwrap_or_else(|| panic!("{scenario} lacks {figure}: {r}"));
            assert!(v.is_finite() && v >= 0.0, "{scenario} {figure} = {v}");
        }
        assert!(r["met"].is_boolean(), "{r}");
        assert!(
            r["command"]
                .as_str()
                .unwrap()
                .starts_with(&format!("baton-bench {scenario}")),
            "{r}"
        );
    }
    // Small fleets, but every host connected, answered and came back.
    let get = |s: &str, f: &str| {
        results.iter().find(|r| r["scenario"] == s).unwrap()["figures"][f]
            .as_f64()
            .unwrap()
    };
    assert_eq!(get("reconnect", "gave_up"), 0.0);
    assert!(get("rollout", "overhead_ratio") >= 1.0);
    assert!(get("artifact", "coordinator_egress_ratio") >= 1.0);

    let text = std::fs::read_to_string(&report).unwrap();
    // The report renders again from the JSON alone, identically.
    let json = dir.path().join("all.json");
    std::fs::write(&json, &out.stdout).unwrap();
    let again = dir.path().join("again.md");
    let rendered = Command::new(bin("baton-bench"))
        .args(["render", "--json"])
        .arg(&json)
        .arg("--markdown")
        .arg(&again)
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{rendered:?}");
    assert_eq!(std::fs::read_to_string(&again).unwrap(), text);
    for heading in [
        "## Summary",
        "## Coordinator memory per agent",
        "## Fan-out",
        "## Reconnect storm",
        "## Rollout overhead over simulated hosts",
        "## Artifact staging",
        "## An idle agent",
    ] {
        assert!(text.contains(heading), "the report lacks {heading:?}");
    }
    assert!(text.contains("baton-bench fanout --agents 200"), "{text}");
}

#[test]
fn a_scenario_alone_prints_one_json_document() {
    let out = Command::new(bin("baton-bench"))
        .args(["fanout", "--agents", "50", "--runs", "1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["scenario"], "fanout");
    assert_eq!(doc["parameters"]["agents"], 50);
    assert!(doc["figures"]["p100_ms"].as_f64().unwrap() > 0.0);
    assert!(doc["targets"]["p100_ms"]["max"].is_number());
}

/// `baton-sim` with its own prefix, labels and failure rate against
/// `url`; killed on drop.
fn simulate(
    env: &baton_tests::TestEnv,
    url: &str,
    prefix: &str,
    role: &str,
    failure: &str,
) -> baton_tests::Proc {
    let mut cmd = Command::new(bin("baton-sim"));
    cmd.args(["--coordinator", url, "--tls-dir"])
        .arg(env.tls())
        .args(["--agents", "10", "--prefix", prefix, "--label"])
        .arg(format!("role={role}"))
        .args(["--failure-rate", failure, "--activation-delay", "10ms"])
        .stdout(std::process::Stdio::null());
    let log = env.path(&format!("sim-{prefix}.log"));
    cmd.stderr(std::fs::File::create(&log).unwrap());
    baton_tests::Proc {
        name: format!("baton-sim {prefix}"),
        child: cmd.spawn().unwrap(),
        log,
    }
}

#[test]
fn simulated_hosts_take_a_rollout_and_failing_ones_are_rolled_back() {
    let env = baton_tests::TestEnv::new(&[]);
    let batond = baton_tests::Batond::start(&env, "batond", &[]);
    let url = batond.url();
    let _good = simulate(&env, &url, "good-", "good", "0");
    let _bad = simulate(&env, &url, "bad-", "bad", "1");
    baton_tests::wait_until("20 simulated hosts", baton_tests::SOON, || {
        let hosts = env.hosts(&url);
        (hosts.iter().filter(|h| h["connected"] == true).count() == 20).then_some(())
    });
    let ok = |out: std::process::Output| {
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let key = env.path("release");
    ok(env.baton(
        &url,
        &env.tls(),
        &["artifact", "keygen", "--out", key.to_str().unwrap()],
    ));
    let src = env.path("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("service.toml"), "command = \"bin/demo\"\n").unwrap();
    let file = env.path("demo.baton");
    ok(env.baton(
        &url,
        &env.tls(),
        &[
            "artifact",
            "pack",
            src.to_str().unwrap(),
            "--name",
            "demo",
            "--version",
            "2.0.0",
            "--sign-key",
            env.path("release.key").to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
        ],
    ));
    ok(env.baton(
        &url,
        &env.tls(),
        &["artifact", "push", file.to_str().unwrap()],
    ));

    let roll = |role: &str| -> Value {
        let plan = env.path(&format!("plan-{role}.toml"));
        std::fs::write(
            &plan,
            format!(
                "auto_rollback = true\n[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nhosts = {{ role = \"{role}\" }}\nmax_parallel = 5\nmin_healthy_time = \"50ms\"\n"
            ),
        )
        .unwrap();
        let started: Value = serde_json::from_str(&ok(env.baton(
            &url,
            &env.tls(),
            &["rollout", "start", plan.to_str().unwrap(), "--json"],
        )))
        .unwrap();
        let id = started["id"].as_str().unwrap().to_owned();
        let _ = env.baton(&url, &env.tls(), &["rollout", "watch", &id]);
        serde_json::from_str(&ok(env.baton(
            &url,
            &env.tls(),
            &["rollout", "status", &id, "--json"],
        )))
        .unwrap()
    };
    let good = roll("good");
    assert_eq!(good["state"], "succeeded", "{good}");
    let bad = roll("bad");
    assert_eq!(bad["state"], "rolled_back", "{bad}");
    let failed: Vec<&Value> = bad["services"][0]["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| {
            h["error"]
                .as_str()
                .unwrap_or("")
                .contains("simulated failure")
        })
        .collect();
    assert!(!failed.is_empty(), "{bad}");

    // The inventory follows: good hosts run 2.0.0, bad ones still 1.0.0.
    for h in env.hosts(&url) {
        let version = h["services"][0]["version"].as_str().unwrap().to_owned();
        let id = h["host_id"].as_str().unwrap();
        let want = if id.starts_with("good-") {
            "2.0.0"
        } else {
            "1.0.0"
        };
        assert_eq!(version, want, "{h}");
    }
}
