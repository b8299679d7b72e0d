//! `baton rollout start | status | watch | list | pause | resume | abort |
//! rollback`: run and follow rollouts.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use baton_common::time::{from_timestamp, rfc3339_millis};
use baton_proto::control::v1::{
    ControlRolloutRequest, GetRolloutRequest, ListRolloutEventsRequest, ListRolloutsRequest,
    Rollout, RolloutAction, RolloutEvent, StartRolloutRequest,
};
use tokio_stream::StreamExt;

use super::{Cli, CliError, call_failed};

/// The long help of `baton rollout start`: an example plan. (A string,
/// not a doc comment, so rustdoc does not take the plan for Rust code.)
const START_HELP: &str = "Validate a plan file and start it; prints the rollout id.

A plan names the service, the version (pushed with `baton artifact push`), the
hosts and how carefully to proceed:

    auto_rollback = true          # undo every touched host on failure
    progress_deadline = \"10m\"

    [[service]]
    name = \"api\"
    version = \"2.0.0\"
    hosts = { role = \"api\" }      # absent: the hosts already running api
    max_parallel = 2              # or \"25%\"
    min_healthy = \"75%\"           # floor of healthy hosts, never crossed
    min_healthy_time = \"2s\"
    healthy_deadline = \"30s\"
    max_failures = 0

Several [[service]] tables make a system: depends_on, requires, canary and
steps are explained in the README. A plan with a mistake is refused as a
whole, with the reason, and nothing is started. `baton rollout plan PLAN`
shows what it would do; follow a rollout with `baton rollout watch ID`.";

/// `baton rollout …`
#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Validate a plan file and start it; prints the rollout id.
    #[command(
        long_about = START_HELP,
        after_help = "Examples:\n  baton rollout start plan.toml\n  baton rollout start plan.toml --watch     # follow it; exit 0 only if it succeeds\n  baton plan check plan.toml                # check it first, offline"
    )]
    Start {
        /// The plan (TOML; every key is in docs/reference/plan.md).
        plan: PathBuf,
        /// Follow the rollout until it ends, as `baton rollout watch`
        /// does; exit 0 only if it succeeds.
        #[arg(long)]
        watch: bool,
        /// Print `{"id": ...}` (with --watch: then the events as NDJSON).
        #[arg(long)]
        json: bool,
    },
    /// Show what a plan would do — the waves of services, the batches of
    /// hosts per service — without changing anything (asks the
    /// coordinator, which knows the hosts; `baton plan check` needs none).
    #[command(after_help = "Example:\n  baton rollout plan plan.toml")]
    Plan {
        /// The plan (TOML).
        plan: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Where a rollout and each of its hosts are.
    #[command(
        after_help = "Examples:\n  baton rollout status latest\n  baton rollout status 7f3a --json"
    )]
    Status {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Follow a rollout until it ends, event by event with each event's
    /// own time (a finished rollout: its whole history); exit 0 only if it
    /// succeeded. On a terminal, a progress bar per service stays below
    /// the events.
    #[command(
        after_help = "Examples:\n  baton rollout watch latest\n  baton rollout watch latest --json | jq -r .kind     # NDJSON, one event a line"
    )]
    Watch {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
        /// One JSON event per line (NDJSON), the shape of `rollout events --json`.
        #[arg(long)]
        json: bool,
    },
    /// Every rollout, newest first.
    #[command(after_help = "Example:\n  baton rollout list")]
    List {
        /// Print one JSON document (an array).
        #[arg(long)]
        json: bool,
    },
    /// Start no new host; hosts already activating finish. With --all,
    /// every running rollout at once (stop the line).
    #[command(after_help = "Examples:\n  baton rollout pause latest\n  baton rollout pause --all")]
    Pause {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Pause every running rollout (stop the line); audited.
        #[arg(long)]
        all: bool,
    },
    /// Continue a paused rollout.
    #[command(after_help = "Example:\n  baton rollout resume latest")]
    Resume {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
    },
    /// Stop for good and leave every host as it is.
    #[command(after_help = "Example:\n  baton rollout abort latest")]
    Abort {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
    },
    /// Return every host the rollout touched to its previous version.
    #[command(after_help = "Example:\n  baton rollout rollback latest")]
    Rollback {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
    },
    /// Continue a rollout that awaits promotion after its canary step.
    #[command(after_help = "Example:\n  baton rollout promote latest")]
    Promote {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
    },
    /// A rollout's history, oldest first: its start and who started it,
    /// every change of its state, of a service and of a host, and every
    /// operator action with who took it.
    #[command(
        after_help = "Examples:\n  baton rollout events latest\n  baton rollout events latest --json"
    )]
    Events {
        /// The rollout: its id, a unique prefix of it, or `latest` (the newest).
        id: String,
        /// Print one JSON document (an array of events).
        #[arg(long)]
        json: bool,
    },
}

type Client = baton_proto::control::v1::control_service_client::ControlServiceClient<
    tonic::transport::Channel,
>;

/// The rollout `id` names: `latest`, a whole id, or a unique prefix.
pub async fn resolve_id(client: &mut Client, id: &str) -> Result<String, CliError> {
    if id.is_empty() {
        return Err(CliError::new("no rollout id given").with_code(crate::exit::USAGE));
    }
    if id != "latest" {
        match client
            .get_rollout(GetRolloutRequest { id: id.to_owned() })
            .await
        {
            Ok(r) => return Ok(r.into_inner().id),
            Err(s)
                if s.code() == tonic::Code::NotFound
                    || s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => return Err(call_failed("getting the rollout failed", s)),
        }
    }
    let all = client
        .list_rollouts(ListRolloutsRequest {})
        .await
        .map_err(|s| call_failed("listing rollouts failed", s))?
        .into_inner()
        .rollouts;
    if id == "latest" {
        return all
            .into_iter()
            .max_by_key(|r| r.created_at.as_ref().map(|t| (t.seconds, t.nanos)))
            .map(|r| r.id)
            .ok_or_else(|| {
                CliError::new("there is no rollout yet").with_code(crate::exit::REFUSED)
            });
    }
    let matches: Vec<String> = all
        .into_iter()
        .map(|r| r.id)
        .filter(|r| r.starts_with(id))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(CliError::new(format!(
            "no rollout has an id starting with {}",
            baton_common::text::quote(id)
        ))
        .with_code(crate::exit::REFUSED)),
        many => Err(CliError::new(format!(
            "{} rollouts have ids starting with {}: {}; give more of the id",
            many.len(),
            baton_common::text::quote(id),
            many.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        ))
        .with_code(crate::exit::USAGE)),
    }
}

/// Runs a rollout command.
pub async fn run(cli: &Cli, cmd: &RolloutCommand) -> Result<ExitCode, CliError> {
    let mut client = cli.control().await?;
    if let RolloutCommand::Pause { all: true, .. } = cmd {
        let paused = client
            .stop_the_line(baton_proto::control::v1::StopTheLineRequest {})
            .await
            .map_err(|s| call_failed("stopping the line failed", s))?
            .into_inner()
            .paused;
        if paused.is_empty() {
            println!("no running rollout to pause");
        }
        for id in paused {
            println!("rollout {id} is paused");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = match cmd {
        RolloutCommand::Status { id, .. }
        | RolloutCommand::Watch { id, .. }
        | RolloutCommand::Pause { id: Some(id), .. }
        | RolloutCommand::Resume { id }
        | RolloutCommand::Abort { id }
        | RolloutCommand::Rollback { id }
        | RolloutCommand::Promote { id }
        | RolloutCommand::Events { id, .. } => resolve_id(&mut client, id).await?,
        _ => String::new(),
    };
    let control = |action: RolloutAction| ControlRolloutRequest {
        id: id.clone(),
        action: action.into(),
    };
    let request = match cmd {
        RolloutCommand::Start {
            plan,
            watch: follow,
            json,
        } => {
            let text = std::fs::read_to_string(plan).map_err(|e| {
                CliError::new(format!("cannot read the plan {}: {e}", plan.display()))
            })?;
            let id = client
                .start_rollout(StartRolloutRequest { plan: text })
                .await
                .map_err(|s| call_failed(&format!("plan {} refused", plan.display()), s))?
                .into_inner()
                .id;
            if *json {
                println!("{}", serde_json::json!({ "id": id }));
            } else {
                println!("{id}");
            }
            if *follow {
                return watch(&mut client, &id, *json).await;
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Plan { plan, json } => {
            let text = std::fs::read_to_string(plan).map_err(|e| {
                CliError::new(format!("cannot read the plan {}: {e}", plan.display()))
            })?;
            let p = client
                .plan_rollout(StartRolloutRequest { plan: text })
                .await
                .map_err(|s| call_failed(&format!("plan {} refused", plan.display()), s))?
                .into_inner();
            if *json {
                println!("{}", serde_json::to_string_pretty(&plan_json(&p))?);
            } else {
                print!("{}", plan_text(&p));
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Status { json, .. } => {
            let r = client
                .get_rollout(GetRolloutRequest { id: id.clone() })
                .await
                .map_err(|s| call_failed("getting the rollout failed", s))?
                .into_inner();
            if *json {
                println!("{}", serde_json::to_string_pretty(&to_json(&r))?);
            } else {
                print!("{}", render(&r, false));
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::List { json } => {
            let all = client
                .list_rollouts(ListRolloutsRequest {})
                .await
                .map_err(|s| call_failed("listing rollouts failed", s))?
                .into_inner()
                .rollouts;
            if *json {
                let doc: Vec<_> = all.iter().map(to_json).collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else if all.is_empty() {
                println!("no rollouts yet (start one with `baton rollout start PLAN`)");
            } else {
                let mut table =
                    crate::table::Table::new(["ID", "STATE", "SERVICE", "VERSION", "CREATED"]);
                for r in &all {
                    let s = r.services.first();
                    table.row([
                        r.id.clone(),
                        r.state.clone(),
                        s.map_or_else(String::new, |s| s.name.clone()),
                        s.map_or_else(String::new, |s| s.version.clone()),
                        time_text(r.created_at.as_ref()).unwrap_or_default(),
                    ]);
                }
                print!("{table}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Watch { json, .. } => return watch(&mut client, &id, *json).await,
        RolloutCommand::Events { json, .. } => {
            let mut events = Vec::new();
            loop {
                let page = client
                    .list_rollout_events(ListRolloutEventsRequest {
                        id: id.clone(),
                        since: events.last().map_or(0, |e: &RolloutEvent| e.seq + 1),
                        limit: 0,
                    })
                    .await
                    .map_err(|s| call_failed("getting the rollout's events failed", s))?
                    .into_inner();
                events.extend(page.events);
                if !page.more {
                    break;
                }
            }
            if *json {
                let doc: Vec<_> = events.iter().map(event_json).collect();
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                for e in &events {
                    println!("{}", event_line(e));
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Pause { .. } => control(RolloutAction::Pause),
        RolloutCommand::Resume { .. } => control(RolloutAction::Resume),
        RolloutCommand::Abort { .. } => control(RolloutAction::Abort),
        RolloutCommand::Rollback { .. } => control(RolloutAction::Rollback),
        RolloutCommand::Promote { .. } => control(RolloutAction::Promote),
    };
    let r = client
        .control_rollout(request)
        .await
        .map_err(|s| call_failed("the rollout refused", s))?
        .into_inner();
    println!("rollout {} is {}", r.id, r.state);
    Ok(ExitCode::SUCCESS)
}

fn time_text(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.and_then(from_timestamp).map(rfc3339_millis)
}

fn empty_null(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::Value::String(s.to_owned())
    }
}

fn plan_json(p: &baton_proto::control::v1::RolloutPlan) -> serde_json::Value {
    serde_json::json!({
        "waves": p.waves.iter().map(|w| w.services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "version": s.version,
            "max_parallel": s.max_parallel,
            "min_healthy": s.min_healthy,
            "depends_on": s.depends_on,
            "requires": s.requires,
            "unchanged_hosts": s.unchanged_hosts,
            "batches": s.batches.iter().map(|b| serde_json::json!({
                "hosts": b.hosts,
                "step": b.step,
                "then_promote": b.then_promote,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()).collect::<Vec<_>>(),
    })
}

fn plan_text(p: &baton_proto::control::v1::RolloutPlan) -> String {
    let mut out = String::new();
    for (i, w) in p.waves.iter().enumerate() {
        out.push_str(&format!("wave {}:\n", i + 1));
        for s in &w.services {
            out.push_str(&format!(
                "  {} → {}  (max_parallel {}, min_healthy {})",
                s.name, s.version, s.max_parallel, s.min_healthy
            ));
            if !s.depends_on.is_empty() {
                out.push_str(&format!("  after {}", s.depends_on.join(", ")));
            }
            for (dep, req) in &s.requires {
                out.push_str(&format!("  requires {dep} {req}"));
            }
            out.push('\n');
            for (j, b) in s.batches.iter().enumerate() {
                out.push_str(&format!(
                    "    batch {} (step {}): {}{}\n",
                    j + 1,
                    b.step,
                    b.hosts.join(", "),
                    if b.then_promote {
                        "  — then waits for `baton rollout promote`"
                    } else {
                        ""
                    }
                ));
            }
            if !s.unchanged_hosts.is_empty() {
                out.push_str(&format!(
                    "    already on {}: {}\n",
                    s.version,
                    s.unchanged_hosts.join(", ")
                ));
            }
        }
    }
    out.push_str("nothing was changed (a dry run)\n");
    out
}

/// The kind of a host's failure, by its name (`not_healthy`).
fn failure(h: &baton_proto::control::v1::HostRollout) -> Option<&'static str> {
    baton_common::command::failure_kind(h.failure).map(|k| k.as_str())
}

/// A rollout in the contract's JSON shape.
pub fn to_json(r: &Rollout) -> serde_json::Value {
    serde_json::json!({
        "id": r.id,
        "state": r.state,
        "error": empty_null(&r.error),
        "created_at": time_text(r.created_at.as_ref()),
        "updated_at": time_text(r.updated_at.as_ref()),
        "started_by": empty_null(&r.started_by),
        "held": empty_null(&r.held),
        "services": r.services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "version": s.version,
            "state": s.state,
            "step": s.step,
            "steps": s.steps,
            "depends_on": s.depends_on,
            "digest": s.digest,
            "approval": s.approval,
            "baking": s.baking_since.as_ref().map(|t| serde_json::json!({
                "since": time_text(Some(t)),
                "step": s.baking_step,
            })),
            "analysis": s.analysis.iter().map(verdict_json).collect::<Vec<_>>(),
            "hosts": s.hosts.iter().map(|h| serde_json::json!({
                "host_id": h.host_id,
                "state": h.state,
                "from_version": empty_null(&h.from_version),
                "to_version": h.to_version,
                "started_at": time_text(h.started_at.as_ref()),
                "finished_at": time_text(h.finished_at.as_ref()),
                "error": empty_null(&h.error),
                "failure": failure(h),
                "probe": empty_null(&h.probe),
                "log_tail": empty_null(&h.log_tail),
                "connected": h.connected,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A verdict in `status --json` (`analysis[]`).
fn verdict_json(v: &baton_proto::control::v1::Verdict) -> serde_json::Value {
    serde_json::json!({
        "name": v.name,
        "kind": v.kind,
        "step": v.step,
        "verdict": v.verdict,
        "reason": v.reason,
        "value": v.value,
        "baseline": v.baseline,
        "threshold": v.threshold,
        "statistic": v.statistic,
        "p_value": v.p_value,
        "samples": v.samples,
        "baseline_samples": v.baseline_samples,
        "at": time_text(v.at.as_ref()),
    })
}

/// A service's analysis as lines: the bake in progress, then each verdict.
fn analysis_lines(s: &baton_proto::control::v1::ServiceRollout) -> String {
    let mut out = String::new();
    if s.approval && s.state == "awaiting_promotion" {
        out.push_str(
            "  needs approval: `baton rollout promote` by an operator other than its starter\n",
        );
    }
    if let Some(since) = s.baking_since.as_ref().and_then(from_timestamp) {
        let secs = SystemTime::now()
            .duration_since(since)
            .unwrap_or_default()
            .as_secs();
        out.push_str(&format!(
            "  analysing step {} for {}\n",
            s.baking_step,
            humantime::format_duration(std::time::Duration::from_secs(secs))
        ));
    }
    for v in &s.analysis {
        out.push_str(&format!(
            "  analysis {} (step {}): {}  {}\n",
            v.name,
            v.step,
            v.verdict.to_uppercase(),
            v.reason
        ));
    }
    out
}

fn bar(state: &str, progress: u32) -> String {
    const WIDTH: usize = 20;
    let filled = match state {
        "pending" => 0,
        "staging" => progress as usize * WIDTH / 100 / 4,
        "staged" => WIDTH / 4,
        "activating" => WIDTH / 2,
        "healthy" | "succeeded" => WIDTH,
        // Rolled back, failed, skipped: not done, whatever it got to.
        _ => 0,
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(WIDTH - filled))
}

/// The rollout as text: a header and one line per host (with progress bars
/// when `bars`).
pub fn render(r: &Rollout, bars: bool) -> String {
    let mut out = String::new();
    for s in &r.services {
        out.push_str(&format!(
            "rollout {}  {} → {}  {}  [{}{}]\n",
            r.id,
            s.name,
            s.version,
            r.state,
            s.state,
            if s.steps.len() > 1 {
                format!(", step {}/{}", s.step, s.steps.len())
            } else {
                String::new()
            }
        ));
        for h in &s.hosts {
            let from = if h.from_version.is_empty() {
                "-"
            } else {
                &h.from_version
            };
            let mut line = format!(
                "  {:<16} {:<13} {from} → {}",
                h.host_id, h.state, h.to_version
            );
            if bars {
                line = format!(
                    "  {:<16} {} {:<13} {from} → {}",
                    h.host_id,
                    bar(&h.state, h.progress_percent),
                    h.state,
                    h.to_version
                );
            }
            if !h.connected {
                line.push_str("  (disconnected)");
            }
            if !h.error.is_empty() {
                match failure(h) {
                    Some(kind) => line.push_str(&format!("  error ({kind}): {}", h.error)),
                    None => line.push_str(&format!("  error: {}", h.error)),
                }
            }
            out.push_str(&line);
            out.push('\n');
            out.push_str(&failure_detail(&h.probe, &h.log_tail, "      "));
        }
        out.push_str(&analysis_lines(s));
    }
    if !r.held.is_empty() {
        out.push_str(&format!("  held: {}\n", r.held));
    }
    if !r.error.is_empty() {
        out.push_str(&format!("  {}\n", r.error));
    }
    out
}

/// Follows a rollout until it ends. Its events are printed as they are
/// recorded, each with its own time and in the order the coordinator
/// recorded them (a finished rollout prints its whole history); with
/// `json`, one event a line (NDJSON). On a terminal a progress bar per
/// service (indicatif) stays below the events. Exit 0 only if it
/// succeeded.
pub async fn watch(client: &mut Client, id: &str, json: bool) -> Result<ExitCode, CliError> {
    let mut stream = client
        .watch_rollout(GetRolloutRequest { id: id.to_owned() })
        .await
        .map_err(|s| call_failed("watching the rollout failed", s))?
        .into_inner();
    let tty = !json && std::io::stdout().is_terminal();
    let bars = Bars::new(tty);
    let mut next = 0u64;
    let mut last: Option<Rollout> = None;
    while let Some(r) = stream.next().await {
        let r = r.map_err(|s| call_failed("the rollout watch broke", s))?;
        next = print_events(client, &r.id, next, json, &bars).await?;
        bars.update(&r);
        last = Some(r);
    }
    let Some(r) = last else {
        return Err(CliError::new("the watch ended without news"));
    };
    // What was recorded after the last snapshot.
    print_events(client, &r.id, next, json, &bars).await?;
    bars.finish();
    if !baton_engine::is_terminal(&r.state) {
        return Err(CliError::new(format!(
            "the watch ended while the rollout was still {} (the coordinator stopped?)",
            r.state
        )));
    }
    if !json {
        println!("rollout {} {}", r.id, r.state);
        if !r.error.is_empty() {
            println!("{}", r.error);
        }
    }
    Ok(if r.state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Prints the events of rollout `id` from `since` on; the next to print.
async fn print_events(
    client: &mut Client,
    id: &str,
    mut since: u64,
    json: bool,
    bars: &Bars,
) -> Result<u64, CliError> {
    loop {
        let page = client
            .list_rollout_events(ListRolloutEventsRequest {
                id: id.to_owned(),
                since,
                limit: 0,
            })
            .await
            .map_err(|s| call_failed("getting the rollout's events failed", s))?
            .into_inner();
        for e in &page.events {
            since = e.seq + 1;
            if json {
                bars.println(&event_json(e).to_string());
            } else {
                bars.println(&event_line(e));
            }
        }
        if !page.more || page.events.is_empty() {
            return Ok(since);
        }
    }
}

/// The progress bars of a watch on a terminal: one per service, below the
/// events (indicatif keeps them to the terminal's width and height).
struct Bars {
    multi: Option<indicatif::MultiProgress>,
    services: std::cell::RefCell<BTreeMap<String, indicatif::ProgressBar>>,
}

impl Bars {
    fn new(tty: bool) -> Self {
        Self {
            multi: tty.then(indicatif::MultiProgress::new),
            services: std::cell::RefCell::default(),
        }
    }

    fn println(&self, line: &str) {
        match &self.multi {
            Some(m) if !self.services.borrow().is_empty() => {
                let _ = m.println(line);
            }
            _ => println!("{line}"),
        }
    }

    fn update(&self, r: &Rollout) {
        let Some(multi) = &self.multi else {
            return;
        };
        let style = indicatif::ProgressStyle::with_template(
            "{prefix:.bold} [{bar:30}] {pos}/{len} {wide_msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("#>-");
        let mut services = self.services.borrow_mut();
        for s in &r.services {
            let bar = services.entry(s.name.clone()).or_insert_with(|| {
                let bar = multi.add(indicatif::ProgressBar::new(0));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{} → {}", s.name, s.version));
                bar
            });
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for h in &s.hosts {
                *counts.entry(h.state.as_str()).or_default() += 1;
            }
            let done = counts.get("healthy").copied().unwrap_or(0);
            bar.set_length(s.hosts.len() as u64);
            bar.set_position(done as u64);
            let summary: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            bar.set_message(format!("{}: {}", s.state, summary.join(", ")));
        }
    }

    fn finish(&self) {
        for bar in self.services.borrow().values() {
            bar.finish();
        }
    }
}

/// A failure's probe answer and log tail as indented lines (empty when
/// there are none).
fn failure_detail(probe: &str, log_tail: &str, indent: &str) -> String {
    let mut out = String::new();
    if !probe.is_empty() {
        out.push_str(&format!("{indent}probe: {probe}\n"));
    }
    if !log_tail.is_empty() {
        out.push_str(&format!("{indent}log:\n"));
        for line in log_tail.lines() {
            out.push_str(&format!("{indent}  | {line}\n"));
        }
    }
    out
}

/// One event in the contract's JSON shape.
fn event_json(e: &RolloutEvent) -> serde_json::Value {
    serde_json::json!({
        "seq": e.seq,
        "at": time_text(e.at.as_ref()),
        "kind": e.kind,
        "service": e.service,
        "host": e.host,
        "from": e.from,
        "to": e.to,
        "who": e.who,
        "message": e.message,
        "failure": baton_common::command::failure_kind(e.failure).map(|k| k.as_str()),
        "probe": empty_null(&e.probe),
        "log_tail": empty_null(&e.log_tail),
    })
}

/// One event as a line: `seq time what change (who) details`.
fn event_line(e: &RolloutEvent) -> String {
    let what = [e.kind.as_str(), e.service.as_str(), e.host.as_str()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ");
    let change = match (e.from.is_empty(), e.to.is_empty()) {
        (false, false) => format!("{} -> {}", e.from, e.to),
        (true, false) => e.to.clone(),
        _ => String::new(),
    };
    let mut line = format!(
        "{:>4}  {}  {what:<24} {change}",
        e.seq,
        time_text(e.at.as_ref()).unwrap_or_default()
    );
    if !e.who.is_empty() {
        line.push_str(&format!("  by {}", e.who));
    }
    if let Some(kind) = baton_common::command::failure_kind(e.failure) {
        line.push_str(&format!("  ({kind})"));
    }
    if !e.message.is_empty() {
        line.push_str(&format!("  {}", e.message));
    }
    let mut line = line.trim_end().to_owned();
    let detail = failure_detail(&e.probe, &e.log_tail, "        ");
    if !detail.is_empty() {
        line.push('\n');
        line.push_str(detail.trim_end());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_healthy_host_is_drawn_done() {
        assert_eq!(bar("healthy", 0), format!("[{}]", "#".repeat(20)));
        for state in ["rolled_back", "failed", "pending"] {
            assert_eq!(bar(state, 100), format!("[{}]", "-".repeat(20)), "{state}");
        }
    }
}
