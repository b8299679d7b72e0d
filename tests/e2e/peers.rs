//! Peer-to-peer staging: agents started with `--peer-listen` serve what
//! they stage to each other over mutual TLS, `batond` names the sources
//! and sends about one copy, and every piece is checked against the
//! signed manifest, so a corrupt or dead peer costs time, never a host.

use std::time::Duration;

use baton_tests::fleet::Fleet;
use baton_tests::{SOON, wait_until};
use serde_json::Value;

const ROLLOUT: Duration = Duration::from_secs(120);

/// Every agent serves its peers, on a port of its own on 127.0.0.2: the
/// kernel picks it, and on 127.0.0.1 it could be one a test picked for a
/// service before that service binds it.
const PEER: &[&str] = &["--peer-listen", "127.0.0.2:0"];

/// A release of the demo service carrying `mib` MiB that do not compress;
/// its digest, the payload's size and the noise.
fn noisy_release(fleet: &Fleet, version: &str, mib: usize) -> (String, u64, Vec<u8>) {
    let dir = fleet.release_dir(version, false);
    let mut noise = vec![0u8; mib << 20];
    fastrand::Rng::with_seed(mib as u64).fill(&mut noise);
    std::fs::write(dir.join("noise.bin"), &noise).unwrap();
    let file = fleet.pack_with(&dir, version, &fleet.env.path("release.key"));
    let digest = fleet.push(&file);
    let size = std::fs::metadata(blob(fleet, &digest)).unwrap().len();
    (digest, size, noise)
}

fn blob(fleet: &Fleet, digest: &str) -> std::path::PathBuf {
    fleet
        .env
        .path("batond/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn metric(fleet: &Fleet, name: &str) -> f64 {
    let doc = baton_tests::http::scrape(fleet.batond.metrics.unwrap());
    baton_common::metrics::sample(&doc, name).unwrap_or_else(|| panic!("no {name} in\n{doc}"))
}

/// Rolls `version` out to the hosts labelled `selector` (`key = "value"`),
/// all at once, and waits for the end.
fn roll(fleet: &Fleet, version: &str, selector: &str) -> Value {
    let id = fleet.start_rollout(&format!(
        "[[service]]\nname = \"demo\"\nversion = \"{version}\"\nhosts = {{ {selector} }}\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n"
    ));
    fleet.wait_done(&id, ROLLOUT)
}

fn assert_all_healthy(s: &Value, hosts: usize) {
    assert_eq!(s["state"], "succeeded", "{s}");
    let all = Fleet::hosts_of(s);
    assert_eq!(all.len(), hosts, "{s}");
    for (host, h) in all {
        assert_eq!(h["state"], "healthy", "{host}: {s}");
    }
}

/// What host `host` staged of `version` is the noise, byte for byte.
fn assert_staged(fleet: &Fleet, host: &str, version: &str, noise: &[u8]) {
    let staged = fleet
        .data_dir(host)
        .join(format!("services/demo/releases/{version}/noise.bin"));
    assert!(
        std::fs::read(&staged).unwrap() == noise,
        "{host} staged other bytes"
    );
}

#[test]
fn a_rollout_over_twenty_agents_takes_at_most_two_copies_from_the_coordinator() {
    let names: Vec<String> = (1..=20).map(|i| format!("h{i:02}")).collect();
    let labels: Vec<[&str; 2]> = (1..=20)
        .map(|i| ["role=web", if i <= 10 { "zone=a" } else { "zone=b" }])
        .collect();
    let hosts: Vec<(&str, &[&str])> = names
        .iter()
        .zip(&labels)
        .map(|(h, l)| (h.as_str(), &l[..]))
        .collect();
    let fleet = Fleet::start_with(&hosts, &[], &["--metrics-listen", "127.0.0.1:0"], PEER);
    let (_, size, noise) = noisy_release(&fleet, "1.0.0", 24);
    let before = metric(&fleet, "baton_artifact_sent_bytes_total");
    let s = roll(&fleet, "1.0.0", "role = \"web\"");
    assert_all_healthy(&s, 20);
    let sent = metric(&fleet, "baton_artifact_sent_bytes_total") - before;
    eprintln!(
        "batond sent {:.2} copies of the payload to 20 agents",
        sent / size as f64
    );
    assert!(
        sent <= 2.0 * size as f64,
        "batond sent {sent} bytes for a payload of {size} to 20 agents"
    );
    // The rest came from peers, and every host has every byte.
    let peers = metric(&fleet, "baton_artifact_sources_total{source=\"peer\"}");
    assert!(peers >= 10.0, "only {peers} downloads from peers");
    for host in &names {
        assert_staged(&fleet, host, "1.0.0", &noise);
    }
}

/// h1 staged first; then its copy goes bad on disk (or h1 turns
/// malicious). The next host sent to it catches the first bad piece,
/// reports it, and `batond` never names h1 again: no host fails.
#[test]
fn a_peer_serving_corrupt_pieces_is_caught_and_avoided_and_no_host_fails() {
    let seed: &[&str] = &["role=web", "tier=seed"];
    let rest: &[&str] = &["role=web", "tier=rest"];
    let late: &[&str] = &["role=web", "tier=late"];
    let fleet = Fleet::start_with(
        &[
            ("h1", seed),
            ("h2", rest),
            ("h3", rest),
            ("h4", rest),
            ("h5", late),
        ],
        &[],
        &[],
        PEER,
    );
    let (digest, _, noise) = noisy_release(&fleet, "1.0.0", 12);
    assert_all_healthy(&roll(&fleet, "1.0.0", "tier = \"seed\""), 1);
    // h1 keeps the payload for its peers; one byte of its second piece
    // flips.
    let kept = fleet.data_dir("h1").join(format!(
        "downloads/{}.seed",
        digest.trim_start_matches("sha256:")
    ));
    let mut bytes = std::fs::read(&kept).unwrap();
    bytes[(4 << 20) + 1234] ^= 0x40;
    std::fs::write(&kept, bytes).unwrap();

    let s = roll(&fleet, "1.0.0", "tier = \"rest\"");
    assert_all_healthy(&s, 3);
    for host in ["h2", "h3", "h4"] {
        assert_staged(&fleet, host, "1.0.0", &noise);
    }
    let reports = || {
        let log = fleet.batond.proc.log_text();
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains("a peer served a piece that does not match its signed hash"))
            .map(str::to_owned)
            .collect();
        (lines, log)
    };
    let (first, log) = reports();
    assert!(
        !first.is_empty() && first.iter().all(|l| l.contains("peer=h1")),
        "no report of h1's bad piece:\n{log}"
    );
    // h1 is never named again: h5, staging later, would be sent to it
    // first (it finished first, and sorts first) and report it again.
    let s = roll(&fleet, "1.0.0", "tier = \"late\"");
    assert_all_healthy(&s, 1);
    assert_staged(&fleet, "h5", "1.0.0", &noise);
    let (after, log) = reports();
    assert_eq!(after.len(), first.len(), "h1 was named again:\n{log}");
}

/// h2 and h3 fetch from h1, which serves 1 MiB/s; h1 is killed with
/// SIGKILL mid-transfer, and they finish from elsewhere. Then h4 stages
/// while every peer that holds the payload is gone: it finishes from the
/// coordinator.
#[test]
fn a_peer_killed_mid_transfer_is_replaced_and_a_host_without_peers_finishes_from_the_coordinator() {
    let label = |tier: &'static str| -> Vec<&'static str> { vec!["role=web", tier] };
    let (seed, rest, late) = (label("tier=seed"), label("tier=rest"), label("tier=late"));
    let mut fleet = Fleet::start_with(
        &[("h1", &seed), ("h2", &rest), ("h3", &rest), ("h4", &late)],
        &[],
        &["--metrics-listen", "127.0.0.1:0"],
        &[
            "--peer-listen",
            "127.0.0.2:0",
            "--peer-upload-rate",
            "1048576",
        ],
    );
    let (digest, size, noise) = noisy_release(&fleet, "1.0.0", 16);
    assert_all_healthy(&roll(&fleet, "1.0.0", "tier = \"seed\""), 1);

    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"1.0.0\"\nhosts = { tier = \"rest\" }\nstrategy = \"all-at-once\"\nmin_healthy_time = \"200ms\"\n",
    );
    // Both fetch from h1 (done, so first in line); once 1 MiB has arrived
    // somewhere, h1 dies.
    let partial = |host: &str| {
        fleet.data_dir(host).join(format!(
            "downloads/{}.partial",
            digest.trim_start_matches("sha256:")
        ))
    };
    wait_until("a download from h1 to be under way", SOON, || {
        ["h2", "h3"]
            .iter()
            .any(|h| std::fs::metadata(partial(h)).is_ok_and(|m| m.len() >= 1 << 20))
            .then_some(())
    });
    fleet.agents.get_mut("h1").unwrap().kill();
    let s = fleet.wait_done(&id, ROLLOUT);
    assert_all_healthy(&s, 2);
    for host in ["h2", "h3"] {
        assert_staged(&fleet, host, "1.0.0", &noise);
    }
    let log = fleet.batond.proc.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("a download from a peer failed") && l.contains("peer=h1")),
        "no report of h1's failure:\n{log}"
    );

    // Every agent that holds the payload is gone.
    for host in ["h2", "h3"] {
        fleet.agents.get_mut(host).unwrap().kill();
    }
    let before = metric(&fleet, "baton_artifact_sent_bytes_total");
    assert_all_healthy(&roll(&fleet, "1.0.0", "tier = \"late\""), 1);
    assert_staged(&fleet, "h4", "1.0.0", &noise);
    let sent = metric(&fleet, "baton_artifact_sent_bytes_total") - before;
    assert!(
        sent >= size as f64,
        "h4 took only {sent} of {size} bytes from the coordinator"
    );
}

/// The artifact file sits on a web server (an S3 bucket would do):
/// `batond` stores only its manifest, every agent fetches the payload
/// from there with range requests (or from peers that did), checking
/// every piece, and `batond` sends none of it. An origin serving bad bytes
/// fails staging and changes nothing; a bad origin URL is refused.
#[test]
fn a_payload_at_an_external_origin_is_staged_from_there_and_batond_sends_none() {
    let fleet = Fleet::start_with(
        &[
            ("h1", &["role=web"]),
            ("h2", &["role=web"]),
            ("h3", &["role=web"]),
        ],
        &[],
        &["--metrics-listen", "127.0.0.1:0"],
        PEER,
    );
    let dir = fleet.release_dir("1.0.0", false);
    let mut noise = vec![0u8; 10 << 20];
    fastrand::Rng::with_seed(5).fill(&mut noise);
    std::fs::write(dir.join("noise.bin"), &noise).unwrap();
    let file = fleet.pack_with(&dir, "1.0.0", &fleet.env.path("release.key"));
    let origin = baton_tests::origin::Origin::start(file.clone());
    let url = origin.url(file.file_name().unwrap().to_str().unwrap());

    // Bad origins are refused precisely, and nothing is stored.
    for (bad, why) in [
        (
            "ftp://example/x.baton",
            "must start with http://, https:// or s3://",
        ),
        ("https:///x.baton", "names no host"),
        ("s3://Bucket_Name/x", "is not s3://BUCKET/KEY"),
    ] {
        let out = fleet.baton(&["artifact", "push", file.to_str().unwrap(), "--origin", bad]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{bad}: {stderr}"
        );
    }
    let list = fleet.baton(&["artifact", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");

    let out = fleet.baton(&[
        "artifact",
        "push",
        file.to_str().unwrap(),
        "--origin",
        &url,
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(pushed["origin"], url.as_str(), "{pushed}");
    let digest = pushed["digest"].as_str().unwrap().to_owned();
    assert!(!blob(&fleet, &digest).exists(), "batond stored the payload");

    let before = metric(&fleet, "baton_artifact_sent_bytes_total");
    let s = roll(&fleet, "1.0.0", "role = \"web\"");
    assert_all_healthy(&s, 3);
    for host in ["h1", "h2", "h3"] {
        assert_staged(&fleet, host, "1.0.0", &noise);
    }
    assert_eq!(metric(&fleet, "baton_artifact_sent_bytes_total"), before);
    let size = pushed["size"].as_u64().unwrap();
    assert!(
        origin.sent() >= size,
        "the origin sent {} of {size}",
        origin.sent()
    );
    assert!(metric(&fleet, "baton_artifact_sources_total{source=\"origin\"}") >= 1.0);

    // An origin that serves bad bytes: staging fails, saying so, and the
    // hosts keep what they run.
    let dir = fleet.release_dir("2.0.0", false);
    std::fs::write(dir.join("noise.bin"), &noise[..1 << 20]).unwrap();
    let file = fleet.pack_with(&dir, "2.0.0", &fleet.env.path("release.key"));
    let bad = baton_tests::origin::Origin::start(file.clone());
    bad.corrupt();
    let url = bad.url(file.file_name().unwrap().to_str().unwrap());
    let out = fleet.baton(&["artifact", "push", file.to_str().unwrap(), "--origin", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = roll(&fleet, "2.0.0", "role = \"web\"");
    assert_eq!(s["state"], "failed", "{s}");
    let error = Fleet::hosts_of(&s)
        .values()
        .find_map(|h| h["error"].as_str().map(str::to_owned))
        .unwrap();
    assert!(
        error.contains("at its origin") && error.contains("is corrupt"),
        "{error}"
    );
    for host in ["h1", "h2", "h3"] {
        assert_eq!(fleet.get(host).as_deref(), Some("demo-service 1.0.0"));
    }
}
