//! The table of limits in docs/reference/limits.md is made from the
//! constants that enforce them: this test builds it and fails, printing
//! the table to paste, when the page's differs.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use baton_agent::service as svc;
use baton_common::{command, host};
use baton_coordinator::rollout::{driver, plan, resolve};
use baton_coordinator::{audit, config, control_api, fleet, limits, listener, web};
use baton_engine::analysis;

fn count(n: usize) -> String {
    // 1,000,000 as written in prose.
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 30 && n.is_multiple_of(1 << 30) => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{} KiB", n >> 10),
        n => format!("{n} bytes"),
    }
}

fn time(d: Duration) -> String {
    // Whole days as days (humantime would write 3650 days in years,
    // months and hours).
    match d.as_secs() {
        s if s >= 86_400 && s.is_multiple_of(86_400) && s > 86_400 => format!("{}days", s / 86_400),
        _ => humantime::format_duration(d).to_string(),
    }
}

fn table() -> String {
    let rows: Vec<(&str, String)> = vec![
        ("a plan's text", bytes(limits::MAX_PLAN_BYTES)),
        ("services in a plan", count(plan::MAX_SERVICES)),
        (
            "`depends_on` and `requires` entries in a plan",
            count(plan::MAX_EDGES),
        ),
        (
            "labels in a `hosts` selector",
            count(plan::MAX_SELECTOR_LABELS),
        ),
        ("`steps` of a service", count(plan::MAX_STEPS)),
        (
            "a version requirement",
            format!("{} characters", plan::MAX_REQUIREMENT_CHARS),
        ),
        ("`progress_deadline`", time(plan::MAX_PROGRESS_DEADLINE)),
        (
            "`healthy_deadline`, `min_healthy_time`",
            time(plan::MAX_HEALTHY_DEADLINE),
        ),
        ("`pause`", time(plan::MAX_PAUSE)),
        ("`max_failures`", count(plan::MAX_FAILURES as usize)),
        ("`failure_budget`", count(plan::MAX_FAILURES as usize)),
        ("analysis checks of a service", count(analysis::MAX_CHECKS)),
        (
            "an analysis `interval`",
            format!(
                "{} (at least {})",
                time(analysis::MAX_INTERVAL),
                time(analysis::MIN_INTERVAL)
            ),
        ),
        ("an analysis `duration`", time(analysis::MAX_DURATION)),
        (
            "samples per host in one bake (`duration / interval`, `count`)",
            count(analysis::MAX_SAMPLES as usize),
        ),
        (
            "an analysis `url`",
            format!("{} characters", analysis::MAX_URL_CHARS),
        ),
        (
            "an analysis `query`",
            format!("{} characters", analysis::MAX_QUERY_CHARS),
        ),
        (
            "a metric name in an analysis",
            format!("{} characters", analysis::MAX_METRIC_CHARS),
        ),
        (
            "a `success` or `failure` condition",
            format!(
                "{} characters",
                baton_engine::analysis::Condition::MAX_CHARS
            ),
        ),
        (
            "verdicts kept in a rollout's record per service",
            count(analysis::MAX_VERDICTS),
        ),
        (
            "samples judged per group in one bake (the latest)",
            count(baton_coordinator::analysis::MAX_JUDGED),
        ),
        (
            "hosts sampled per group (new, baseline) in one bake",
            count(baton_coordinator::analysis::MAX_SAMPLED_HOSTS),
        ),
        (
            "samples kept per group with a verdict",
            count(baton_coordinator::analysis::MAX_KEPT),
        ),
        (
            "a `traffic` `drain_timeout`",
            time(baton_common::traffic::MAX_DRAIN_TIMEOUT),
        ),
        (
            "a `traffic` `socket`",
            format!("{} characters", baton_common::traffic::MAX_SOCKET_CHARS),
        ),
        (
            "a `traffic` `backend` or `server`, before and after `${…}`",
            format!("{} characters", baton_common::traffic::MAX_NAME_CHARS),
        ),
        (
            "arguments of a `traffic` `exec` command",
            format!(
                "{} of {} characters",
                baton_common::traffic::MAX_ARGS,
                count(baton_common::traffic::MAX_ARG_CHARS)
            ),
        ),
        (
            "one balancer exchange (runtime API, `exec` command)",
            format!(
                "{}, {}",
                time(baton_common::traffic::balancer::API_TIMEOUT),
                time(baton_common::traffic::balancer::EXEC_TIMEOUT)
            ),
        ),
        (
            "a runtime-API answer read, an `exec` command's output read",
            format!(
                "{}, {}",
                bytes(baton_common::traffic::balancer::MAX_ANSWER_BYTES as usize),
                bytes(baton_common::traffic::balancer::MAX_EXEC_OUTPUT as usize)
            ),
        ),
        (
            "balancers allowed in `batond`'s or an agent's `balancer`",
            count(baton_common::traffic::MAX_ALLOWED),
        ),
        (
            "connections one update may say were cut",
            count(baton_common::command::MAX_CONNECTIONS_CUT as usize),
        ),
        (
            "a metrics endpoint's answer read by an agent",
            bytes(baton_agent::sample::MAX_BODY),
        ),
        (
            "metric families in one sample request",
            count(baton_agent::sample::MAX_FAMILIES),
        ),
        (
            "series in one sample answer",
            count(baton_agent::sample::MAX_SERIES),
        ),
        (
            "sample requests answered at once by an agent",
            count(baton_agent::sample::MAX_IN_FLIGHT),
        ),
        (
            "a freeze's reason",
            format!("{} characters", baton_coordinator::freeze::MAX_REASON_CHARS),
        ),
        (
            "how far ahead a freeze may end",
            time(baton_coordinator::freeze::MAX_AHEAD),
        ),
        (
            "deployment windows and freeze periods in batond's config",
            count(baton_coordinator::freeze::MAX_ENTRIES),
        ),
        (
            "(service, host) pairs in a rollout",
            count(resolve::MAX_HOST_RUNS),
        ),
        ("a `service.toml`", bytes(svc::MAX_SERVICE_FILE as usize)),
        ("`stop_timeout` (service.toml)", time(svc::MAX_STOP_TIMEOUT)),
        (
            "a hook's timeout (service.toml)",
            time(svc::MAX_HOOK_TIMEOUT),
        ),
        (
            "`health.interval`, `health.timeout` (service.toml)",
            time(svc::MAX_CHECK_PERIOD),
        ),
        (
            "names: hosts, services, label keys",
            format!("{} characters", host::MAX_NAME_LEN),
        ),
        ("a label's value", bytes(host::MAX_LABEL_VALUE_LEN)),
        ("labels of a host", count(host::MAX_LABELS)),
        (
            "services a host reports",
            count(host::MAX_SERVICES_PER_HOST),
        ),
        (
            "a command id",
            format!("{} characters", command::MAX_COMMAND_ID_LEN),
        ),
        (
            "an update's error text (longer is cut)",
            format!("{} characters", count(command::MAX_UPDATE_ERROR_CHARS)),
        ),
        (
            "a health gate on the wire",
            time(command::MAX_HEALTHY_DEADLINE),
        ),
        (
            "a rollout id",
            format!("{} characters", driver::MAX_ID_CHARS),
        ),
        ("a gRPC message", bytes(limits::MAX_MESSAGE)),
        (
            "an artifact fetch request",
            bytes(limits::MAX_FETCH_REQUEST),
        ),
        (
            "pieces listed in a manifest (bigger payloads get bigger pieces)",
            format!(
                "{} of {} to {}",
                count(baton_common::artifact::MAX_PIECES as usize),
                bytes(baton_common::artifact::DEFAULT_PIECE as usize),
                bytes(baton_common::artifact::MAX_PIECE as usize)
            ),
        ),
        (
            "an artifact's origin URL (`baton artifact push --origin`)",
            format!(
                "{} characters",
                count(baton_coordinator::artifacts::MAX_ORIGIN_CHARS)
            ),
        ),
        (
            "payloads batond shares out between peers at once (the least recently asked about goes)",
            count(baton_coordinator::swarm::MAX_SWARMS),
        ),
        (
            "`batond --artifact-uploads`",
            count(baton_coordinator::swarm::MAX_COORDINATOR_SLOTS as usize),
        ),
        (
            "`baton-agent --peer-uploads`",
            count(baton_agent::peers::MAX_UPLOADS as usize),
        ),
        (
            "`baton-agent --peer-serve-for`",
            time(baton_agent::peers::MAX_SERVE_FOR),
        ),
        (
            "`baton-agent --peer-upload-rate` (bytes per second, at least)",
            bytes(baton_agent::peers::MIN_UPLOAD_RATE as usize),
        ),
        (
            "streams per connection",
            count(limits::MAX_STREAMS_PER_CONNECTION as usize),
        ),
        (
            "a request's headers",
            bytes(limits::MAX_HEADER_LIST as usize),
        ),
        (
            "streams reset before acceptance (then the connection closes)",
            count(limits::MAX_PENDING_RESETS),
        ),
        (
            "a status message (longer is cut)",
            bytes(limits::MAX_STATUS_MESSAGE),
        ),
        (
            "events in a `ListRolloutEvents` page",
            count(control_api::MAX_EVENTS_PAGE),
        ),
        ("entries in a `ListAudit` answer", count(audit::MAX_LIMIT)),
        ("a ping's timeout", time(control_api::MAX_PING_TIMEOUT)),
        (
            "TLS handshakes at once (more wait)",
            count(listener::MAX_HANDSHAKES),
        ),
        (
            "TLS handshakes at once from one address",
            count(listener::MAX_HANDSHAKES_PER_ADDRESS),
        ),
        (
            "a TLS handshake once it has its turn",
            time(listener::HANDSHAKE_TURN),
        ),
        (
            "a TLS handshake, waiting included",
            time(baton_common::tls::TLS_HANDSHAKE_TIMEOUT),
        ),
        (
            "connections without a certificate",
            count(listener::MAX_ANONYMOUS),
        ),
        (
            "connections without a certificate from one address",
            count(listener::MAX_ANONYMOUS_PER_ADDRESS),
        ),
        (
            "a connection without a certificate lives",
            time(listener::ANONYMOUS_LIFETIME),
        ),
        ("its streams", count(limits::ANONYMOUS_STREAMS as usize)),
        ("its messages", bytes(limits::MAX_ANONYMOUS_MESSAGE)),
        (
            "its headers",
            bytes(limits::MAX_ANONYMOUS_HEADER_LIST as usize),
        ),
        (
            "its flow-control windows",
            bytes(limits::ANONYMOUS_WINDOW as usize),
        ),
        ("its calls", time(limits::ANONYMOUS_REQUEST_TIMEOUT)),
        ("live dashboards signed in", count(web::MAX_LIVE)),
        (
            "live dashboards not signed in",
            count(web::MAX_ANONYMOUS_LIVE),
        ),
        (
            "live dashboards not signed in, from one address",
            count(web::MAX_ANONYMOUS_LIVE_PER_ADDRESS),
        ),
        (
            "refusals of one caller recorded one by one",
            format!(
                "{} per {}",
                audit::REFUSALS_RECORDED,
                time(audit::REFUSAL_WINDOW)
            ),
        ),
        (
            "refusals kept in the audit log",
            count(audit::MAX_REFUSED_ENTRIES),
        ),
        (
            "changes kept in the audit log",
            format!(
                "`--audit-max-entries`, at most {}",
                count(audit::MAX_RETENTION_ENTRIES)
            ),
        ),
        (
            "takeovers of a host's agent stream",
            format!(
                "{} per {}",
                fleet::MAX_TAKEOVERS,
                time(fleet::TAKEOVER_WINDOW)
            ),
        ),
        (
            "an artifact's validity (`--expires-in`)",
            time(baton_common::artifact::MAX_EXPIRY),
        ),
        (
            "an artifact's payload",
            format!(
                "`--max-artifact-size`, at most {}",
                bytes(config::MAX_ARTIFACT_SIZE_LIMIT as usize)
            ),
        ),
    ];
    let mut out = String::from("| what | at most |\n|---|---|\n");
    for (what, max) in rows {
        out.push_str(&format!("| {what} | {max} |\n"));
    }
    out
}

#[test]
fn the_readme_lists_every_limit_as_enforced() {
    let readme = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/reference/limits.md"
    ))
    .unwrap();
    let start = "<!-- limits: generated by coordinator/tests/limits_doc.rs -->\n";
    let end = "<!-- /limits -->";
    let from = readme.find(start).map(|i| i + start.len());
    let to = readme.find(end);
    let documented = match (from, to) {
        (Some(a), Some(b)) if a <= b => &readme[a..b],
        _ => "",
    };
    let expected = table();
    assert!(
        documented == expected,
        "docs/reference/limits.md's limits differ from the code; put this between the markers:\n{start}{expected}{end}"
    );
}
