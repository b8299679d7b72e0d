//! `baton rollout start | status | watch | list | pause | resume | abort |
//! rollback`: run and follow rollouts.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

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
    #[command(long_about = START_HELP)]
    Start {
        /// The plan (TOML; see the README for every key).
        plan: PathBuf,
        /// Print `{"id": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// Show what a plan would do — the waves of services, the batches of
    /// hosts per service — without changing anything.
    Plan {
        /// The plan (TOML).
        plan: PathBuf,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Where a rollout and each of its hosts are.
    Status {
        /// The rollout id.
        id: String,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Follow a rollout live until it ends; exit 0 only if it succeeded.
    Watch {
        /// The rollout id.
        id: String,
    },
    /// Every rollout, newest first.
    List {
        /// Print one JSON document (an array).
        #[arg(long)]
        json: bool,
    },
    /// Start no new host; hosts already activating finish.
    Pause {
        /// The rollout id.
        id: String,
    },
    /// Continue a paused rollout.
    Resume {
        /// The rollout id.
        id: String,
    },
    /// Stop for good and leave every host as it is.
    Abort {
        /// The rollout id.
        id: String,
    },
    /// Return every host the rollout touched to its previous version.
    Rollback {
        /// The rollout id.
        id: String,
    },
    /// Continue a rollout that awaits promotion after its canary step.
    Promote {
        /// The rollout id.
        id: String,
    },
    /// A rollout's history, oldest first: its start and who started it,
    /// every change of its state, of a service and of a host, and every
    /// operator action with who took it.
    Events {
        /// The rollout id.
        id: String,
        /// Print one JSON document (an array of events).
        #[arg(long)]
        json: bool,
    },
}

/// Runs a rollout command.
pub async fn run(cli: &Cli, cmd: &RolloutCommand) -> Result<ExitCode, CliError> {
    let mut client = cli.control().await?;
    let control = |id: &String, action: RolloutAction| ControlRolloutRequest {
        id: id.clone(),
        action: action.into(),
    };
    let request = match cmd {
        RolloutCommand::Start { plan, json } => {
            let text = std::fs::read_to_string(plan)
                .map_err(|e| CliError(format!("cannot read the plan {}: {e}", plan.display())))?;
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
            return Ok(ExitCode::SUCCESS);
        }
        RolloutCommand::Plan { plan, json } => {
            let text = std::fs::read_to_string(plan)
                .map_err(|e| CliError(format!("cannot read the plan {}: {e}", plan.display())))?;
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
        RolloutCommand::Status { id, json } => {
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
        RolloutCommand::Watch { id } => return watch(&mut client, id).await,
        RolloutCommand::Events { id, json } => {
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
        RolloutCommand::Pause { id } => control(id, RolloutAction::Pause),
        RolloutCommand::Resume { id } => control(id, RolloutAction::Resume),
        RolloutCommand::Abort { id } => control(id, RolloutAction::Abort),
        RolloutCommand::Rollback { id } => control(id, RolloutAction::Rollback),
        RolloutCommand::Promote { id } => control(id, RolloutAction::Promote),
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
        "services": r.services.iter().map(|s| serde_json::json!({
            "name": s.name,
            "version": s.version,
            "state": s.state,
            "step": s.step,
            "steps": s.steps,
            "depends_on": s.depends_on,
            "digest": s.digest,
            "hosts": s.hosts.iter().map(|h| serde_json::json!({
                "host_id": h.host_id,
                "state": h.state,
                "from_version": empty_null(&h.from_version),
                "to_version": h.to_version,
                "started_at": time_text(h.started_at.as_ref()),
                "finished_at": time_text(h.finished_at.as_ref()),
                "error": empty_null(&h.error),
                "failure": failure(h),
                "connected": h.connected,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn bar(state: &str, progress: u32) -> String {
    const WIDTH: usize = 20;
    let filled = match state {
        "pending" => 0,
        "staging" => progress as usize * WIDTH / 100 / 4,
        "staged" => WIDTH / 4,
        "activating" => WIDTH / 2,
        _ => WIDTH,
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
        }
    }
    if !r.error.is_empty() {
        out.push_str(&format!("  {}\n", r.error));
    }
    out
}

/// Follows a rollout over `WatchRollout` until it ends.
pub async fn watch(
    client: &mut baton_proto::control::v1::control_service_client::ControlServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
) -> Result<ExitCode, CliError> {
    let mut stream = client
        .watch_rollout(GetRolloutRequest { id: id.to_owned() })
        .await
        .map_err(|s| call_failed("watching the rollout failed", s))?
        .into_inner();
    let tty = std::io::stdout().is_terminal();
    let mut drawn_lines = 0usize;
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<Rollout> = None;
    while let Some(r) = stream.next().await {
        let r = r.map_err(|s| call_failed("the rollout watch broke", s))?;
        let mut out = std::io::stdout().lock();
        if tty {
            // Redraw the block in place.
            let text = render(&r, true);
            if drawn_lines > 0 {
                write!(out, "\x1b[{drawn_lines}A\x1b[J")?;
            }
            write!(out, "{text}")?;
            drawn_lines = text.lines().count();
        } else {
            // One line per change, for logs and pipes.
            let now = baton_common::time::rfc3339(std::time::SystemTime::now());
            let rollout_changed = seen.get("") != Some(&r.state);
            if rollout_changed && !baton_engine::is_terminal(&r.state) {
                writeln!(out, "{now} rollout {} {}", r.id, r.state)?;
            }
            for s in &r.services {
                let skey = format!("service {}", s.name);
                if seen.get(&skey) != Some(&s.state) {
                    writeln!(out, "{now} service {} {}", s.name, s.state)?;
                    seen.insert(skey, s.state.clone());
                }
                for h in &s.hosts {
                    let key = format!("{}/{}", s.name, h.host_id);
                    if seen.get(&key) != Some(&h.state) {
                        let error = match (h.error.is_empty(), failure(h)) {
                            (true, _) => String::new(),
                            (false, Some(kind)) => format!(" ({kind}): {}", h.error),
                            (false, None) => format!(": {}", h.error),
                        };
                        writeln!(out, "{now} {} {} {}{error}", h.host_id, h.state, s.name)?;
                        seen.insert(key, h.state.clone());
                    }
                }
            }
            // A terminal state is printed after the hosts that led to it.
            if rollout_changed && baton_engine::is_terminal(&r.state) {
                writeln!(out, "{now} rollout {} {}", r.id, r.state)?;
            }
            seen.insert(String::new(), r.state.clone());
        }
        out.flush()?;
        last = Some(r);
    }
    let Some(r) = last else {
        return Err(CliError("the watch ended without news".into()));
    };
    if !baton_engine::is_terminal(&r.state) {
        return Err(CliError(format!(
            "the watch ended while the rollout was still {} (the coordinator stopped?)",
            r.state
        )));
    }
    if !tty && !r.error.is_empty() {
        println!("{}", r.error);
    }
    Ok(if r.state == "succeeded" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
    line.trim_end().to_owned()
}
