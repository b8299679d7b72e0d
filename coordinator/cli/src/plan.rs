//! `baton plan check`: a plan file checked offline, by the same code the
//! coordinator checks it with, before anyone starts it.

use std::path::PathBuf;
use std::process::ExitCode;

use baton_engine::plan::{Plan, Strategy};

use super::CliError;

/// `baton plan …`
#[derive(Debug, clap::Subcommand)]
pub enum PlanCommand {
    /// Check a plan file without a coordinator: its syntax, every key and
    /// value, the dependency graph (no cycle, no unknown service). Prints
    /// the services in the order they would go; exit 1 naming the first
    /// problem. (`baton rollout plan` asks the coordinator which hosts each
    /// batch would take.)
    #[command(
        after_help = "Examples:\n  baton plan check plan.toml\n  baton plan check plan.toml --json && baton rollout start plan.toml --watch"
    )]
    Check {
        /// The plan (TOML; every key is in docs/reference/plan.md).
        plan: PathBuf,
        /// Print one JSON document: `{"valid": true, "waves": [[...]], "services": [...]}`
        /// or `{"valid": false, "error": "..."}`.
        #[arg(long)]
        json: bool,
    },
}

fn strategy(s: Strategy) -> &'static str {
    match s {
        Strategy::Rolling => "rolling",
        Strategy::Canary => "canary",
        Strategy::AllAtOnce => "all-at-once",
    }
}

/// Runs a plan command.
pub fn run(cmd: &PlanCommand) -> Result<ExitCode, CliError> {
    let PlanCommand::Check { plan: path, json } = cmd;
    let meta = std::fs::metadata(path).map_err(|e| {
        CliError::new(format!("cannot read the plan {}: {e}", path.display()))
            .with_code(crate::exit::USAGE)
    })?;
    if meta.len() > baton_engine::plan::MAX_PLAN_BYTES as u64 {
        return Err(CliError::new(format!(
            "the plan {} is {} bytes, over the limit of {}",
            path.display(),
            meta.len(),
            baton_engine::plan::MAX_PLAN_BYTES
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(format!("cannot read the plan {}: {e}", path.display()))
            .with_code(crate::exit::USAGE)
    })?;
    let plan = match Plan::parse(&text) {
        Ok(plan) => plan,
        Err(e) => {
            if *json {
                println!("{}", serde_json::json!({ "valid": false, "error": e.0 }));
                return Ok(ExitCode::FAILURE);
            }
            return Err(CliError::new(format!("{}: {}", path.display(), e.0)));
        }
    };
    let waves = plan.waves();
    if *json {
        let services: Vec<_> = plan
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "version": s.version,
                    "hosts": s.hosts,
                    "strategy": strategy(s.strategy),
                    "max_parallel": s.max_parallel.to_string(),
                    "depends_on": s.depends_on,
                    "requires": s.requires,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "valid": true, "waves": waves, "services": services })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: valid: {} service{} in {} wave{}",
        path.display(),
        plan.services.len(),
        if plan.services.len() == 1 { "" } else { "s" },
        waves.len(),
        if waves.len() == 1 { "" } else { "s" }
    );
    for (i, wave) in waves.iter().enumerate() {
        for name in wave {
            let Some(s) = plan.services.iter().find(|s| &s.name == name) else {
                continue;
            };
            let hosts = match &s.hosts {
                Some(sel) if !sel.is_empty() => sel
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(","),
                _ => "the hosts running it".to_owned(),
            };
            println!(
                "  wave {}: {} → {}  {}, {} at once, on {hosts}",
                i + 1,
                s.name,
                s.version,
                strategy(s.strategy),
                s.max_parallel
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
