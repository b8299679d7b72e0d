//! The web dashboard in a real browser (Debian's `chromium`, headless,
//! driven over the DevTools protocol) during a real rollout: host rows and
//! versions appear, the filter narrows them, the rollout's page shows its
//! service graph and hosts progressing live (counted by state, a health
//! gate's countdown, dates and durations), a mouse click on Pause by a
//! signed-in operator pauses the rollout, the host page reads a service's
//! log through its agent, and a host that goes away is drawn as such. Set `BATON_SCREENSHOT=FILE` to
//! keep a screenshot of the paused rollout (the README's).

use std::time::Duration;

use baton_tests::cdp::{self, Browser};
use baton_tests::fleet::Fleet;

/// How many fleet rows show version `v` of the demo service.
fn rows_on(version: &str) -> String {
    format!(
        "document.querySelectorAll('#fleet tbody tr[data-host] td[data-service=\"demo\"][data-version=\"{version}\"]').length"
    )
}

#[test]
fn the_dashboard_follows_a_rollout_live_and_pauses_it_for_a_signed_in_operator() {
    let Some(chromium) = cdp::find() else {
        assert!(
            std::env::var_os("BATON_REQUIRE_CHROMIUM").is_none(),
            "BATON_REQUIRE_CHROMIUM is set but no chromium is on the PATH"
        );
        eprintln!(
            "SKIPPED: no chromium on the PATH (bash .ci/run installs Debian's; or set BATON_CHROMIUM)"
        );
        return;
    };
    let fleet = Fleet::start_full(
        &[
            ("h1", &["role=web", "zone=a"]),
            ("h2", &["role=web", "zone=b"]),
            ("h3", &["role=web", "zone=b"]),
        ],
        &[],
        &["--http-listen", "127.0.0.1:0"],
    );
    let web = fleet.batond.dashboard.unwrap();
    fleet.install("1.0.0");
    fleet.release("2.0.0", false);

    let mut page = Browser::launch(&chromium, &fleet.env.path("chromium"));
    page.navigate(&format!("http://{web}/#/fleet"));
    page.wait_for(
        "three host rows on 1.0.0",
        &format!("{} === 3", rows_on("1.0.0")),
    );
    page.wait_for(
        "the live stream",
        "document.getElementById('live').className === 'live on'",
    );
    let labels = page.eval("document.querySelector('#fleet tr[data-host=\"h2\"]').innerText");
    assert!(labels.as_str().unwrap().contains("zone=b"), "{labels}");
    // The label filter narrows the table.
    page.type_into("#filter", "zone=b");
    page.wait_for(
        "the filter to keep h2 and h3",
        "[...document.querySelectorAll('#fleet tbody tr[data-host]')].map(r => r.dataset.host).join() === 'h2,h3'",
    );
    // A reload starts unfiltered.
    page.call("Page.reload", serde_json::json!({}));
    page.wait_for(
        "all three rows again",
        &format!("{} === 3", rows_on("1.0.0")),
    );

    // One host at a time, each held 3 s in its health gate.
    let id = fleet.start_rollout(
        "[[service]]\nname = \"demo\"\nversion = \"2.0.0\"\nmax_parallel = 1\nmin_healthy_time = \"3s\"\nhealthy_deadline = \"60s\"\n",
    );
    page.navigate(&format!("http://{web}/#/rollouts"));
    page.wait_for(
        "the rollout in the list",
        &format!("!!document.querySelector('#rollouts tr[data-rollout=\"{id}\"]')"),
    );
    page.click(&format!("#rollouts tr[data-rollout=\"{id}\"] a"));
    page.wait_for(
        "the rollout's page with its service graph",
        "!!document.querySelector('#graph .svc[data-service=\"demo\"]') && document.querySelectorAll('section[data-service=\"demo\"] tr[data-host]').length === 3",
    );
    page.wait_for(
        "the rollout to progress",
        "document.querySelector('#rollout-state').dataset.state === 'progressing'",
    );
    // A host in its health gate shows how long it has left; the service
    // shows its hosts counted by state; the rollout its start and age.
    page.wait_for(
        "a health gate's countdown",
        "[...document.querySelectorAll('section[data-service=\"demo\"] tr[data-state=\"activating\"] .countdown')].some(c => /health gate: \\d+s left/.test(c.textContent))",
    );
    page.wait_for(
        "the hosts counted by state",
        "!!document.querySelector('section[data-service=\"demo\"] [data-count=\"activating\"]')",
    );
    let times = page.eval("document.getElementById('rollout-times').textContent");
    assert!(times.as_str().unwrap().contains("running for"), "{times}");
    assert!(
        page.eval("document.querySelector('button[data-action=\"pause\"]').disabled") == true,
        "the buttons are inert until an operator signs in"
    );

    // Sign in as an operator (while the first host activates).
    let out = fleet.baton(&["dashboard", "token", "--role", "operator"]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    page.type_into("#token", &token);
    page.click("#sign-in");
    page.wait_for(
        "the signed-in operator",
        "document.getElementById('who').textContent.includes('operator')",
    );
    // Hosts change under our eyes (server-sent events, no reload); then
    // Pause is pressed with the mouse.
    page.wait_for(
        "a host to turn healthy on 2.0.0",
        "document.querySelectorAll('section[data-service=\"demo\"] tr[data-host][data-state=\"healthy\"]').length >= 1",
    );
    page.click("button[data-action=\"pause\"]");
    page.wait_for(
        "the page to show the rollout paused",
        "document.querySelector('#rollout-state').dataset.state === 'paused'",
    );
    let status = fleet.status(&id);
    assert_eq!(status["state"], "paused", "{status}");
    page.wait_for(
        "the pause in the event list, by the dashboard user",
        "[...document.querySelectorAll('#events tr')].some(r => r.innerText.includes('pause') && r.innerText.includes('(dashboard)'))",
    );
    // Let the host that was activating finish, then keep the picture.
    fleet.wait_status(&id, "the activating host to finish", |s| {
        Fleet::hosts_of(s)
            .values()
            .all(|h| h["state"] != "activating" && h["state"] != "staging")
    });
    page.wait_for(
        "no host activating on the page",
        "!document.querySelector('section[data-service=\"demo\"] tr[data-state=\"activating\"]')",
    );
    // Progress bars are drawn (the page's policy forbids style attributes,
    // so this fails if a width is set through one).
    let bars = page.eval(
        "[...document.querySelectorAll('section[data-service=\"demo\"] tr[data-host]')].map(r => r.dataset.state + '=' + r.querySelector('.bar > span').style.width)",
    );
    let bars: Vec<&str> = bars
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert!(bars.contains(&"healthy=100%"), "{bars:?}");
    assert!(
        bars.iter()
            .all(|b| *b == "healthy=100%" || b.ends_with("=0%")),
        "{bars:?}"
    );
    let png = page.screenshot();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Some(path) = std::env::var_os("BATON_SCREENSHOT") {
        std::fs::write(&path, &png).unwrap();
    }

    // The history pages from its end: the events before #5 are 0..=4.
    let older = page.eval(&format!(
        "fetch('/api/rollouts/{id}?before=5').then(r => r.json()).then(j => j.events.map(e => e.seq).join())"
    ));
    assert_eq!(older, "0,1,2,3,4");

    // The host page: labels, services, and (signed in as an operator)
    // the service's recent log, read through its agent.
    page.navigate(&format!("http://{web}/#/hosts/h1"));
    page.wait_for(
        "h1's services",
        "!!document.querySelector('#host-services tr[data-service=\"demo\"]')",
    );
    page.click("button[data-show-log=\"demo\"]");
    page.wait_for(
        "h1's demo log",
        "document.querySelector('pre[data-log=\"demo\"]').textContent.includes('demo-service')",
    );
    page.navigate(&format!("http://{web}/#/rollouts/{id}"));
    page.wait_for(
        "the rollout's page again",
        "document.querySelector('#rollout-state') && document.querySelector('#rollout-state').dataset.state === 'paused'",
    );

    // Resume from the page; the fleet view ends with every host on 2.0.0.
    page.click("button[data-action=\"resume\"]");
    let done = fleet.wait_done(&id, Duration::from_secs(90));
    assert_eq!(done["state"], "succeeded", "{done}");
    page.navigate(&format!("http://{web}/#/fleet"));
    page.wait_for(
        "every host on 2.0.0",
        &format!("{} === 3", rows_on("2.0.0")),
    );
    // A host that goes away is not drawn as running: its service's state
    // is unknown, and the page says when it was last seen.
    let mut fleet = fleet;
    let mut h3 = fleet.agents.remove("h3").unwrap();
    h3.terminate();
    page.wait_for(
        "h3 drawn as disconnected",
        "document.querySelector('#fleet tr[data-host=\"h3\"] td[data-service=\"demo\"]').dataset.state === 'unknown' && /last seen \\d+s ago/.test(document.querySelector('#fleet tr[data-host=\"h3\"] [data-last-seen]').textContent)",
    );
}

#[test]
fn the_dashboard_shows_each_verdict_with_its_numbers_and_a_chart() {
    let Some(chromium) = cdp::find() else {
        assert!(
            std::env::var_os("BATON_REQUIRE_CHROMIUM").is_none(),
            "BATON_REQUIRE_CHROMIUM is set but no chromium is on the PATH"
        );
        eprintln!("SKIPPED: no chromium on the PATH");
        return;
    };
    let fleet = Fleet::start_full(
        &[
            ("h1", &["role=web"]),
            ("h2", &["role=web"]),
            ("h3", &["role=web"]),
        ],
        &[],
        &["--http-listen", "127.0.0.1:0"],
    );
    let web = fleet.batond.dashboard.unwrap();
    crate::analysis::install(&fleet, "1.0.0", 0.0);
    crate::analysis::release(&fleet, "2.0.0", 0.05);
    let traffic = crate::analysis::Traffic::start(&fleet);
    let id = fleet.start_rollout(
        &crate::analysis::plan("2.0.0", crate::analysis::BASELINE)
            .replace("max_parallel = 2", "max_parallel = 1"),
    );
    let s = fleet.wait_done(&id, Duration::from_secs(120));
    drop(traffic);
    assert_eq!(s["state"], "rolled_back", "{s:#}");
    let mut page = Browser::launch(&chromium, &fleet.env.path("chromium"));
    page.navigate(&format!("http://{web}/#/rollouts/{id}"));
    page.wait_for(
        "the failed verdict's row",
        "!!document.querySelector('section[data-service=\"demo\"] tr[data-verdict=\"fail\"][data-check=\"errors\"]')",
    );
    let row = page.eval("document.querySelector('tr[data-verdict=\"fail\"]').innerText");
    assert!(row.as_str().unwrap().contains("Mann-Whitney"), "{row}");
    // The chart draws both sides: the new version's samples and the
    // baseline's.
    page.wait_for(
        "the check's chart",
        "document.querySelectorAll('svg[data-chart=\"errors\"] polyline.new, svg[data-chart=\"errors\"] polyline.base').length === 2",
    );
    let events = page.eval("document.getElementById('events').innerText");
    assert!(
        events.as_str().unwrap().contains("analysis demo"),
        "{events}"
    );
}
