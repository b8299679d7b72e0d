//! `baton-agent`: the Baton host agent. See `baton-agent --help`.

use std::process::ExitCode;

use baton_agent::{Agent, AgentArgs, AgentConfig, selfupgrade};
use baton_common::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

/// The agent's async worker threads.
const AGENT_WORKERS: usize = 2;

fn main() -> ExitCode {
    let args = match baton_common::process::parse_args::<AgentArgs>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    baton_common::process::init_logging("info");
    if let Some(baton_agent::config::AgentCommand::Enroll(join)) = &args.command {
        return enroll(join);
    }
    if args.upgrade_watchdog {
        return match &args.data_dir {
            Some(dir) => baton_agent::selfupgrade::watchdog(dir),
            None => {
                eprintln!("baton-agent: --upgrade-watchdog needs --data-dir");
                ExitCode::from(EXIT_CONFIG as u8)
            }
        };
    }
    // Two workers whatever the host: the agent's work is waiting (on its
    // stream, processes and health checks); downloads hash and write on
    // threads of their own. A worker per core would make the agent's
    // memory grow with the host it runs on.
    let runtime = match baton_common::process::runtime_with("baton-agent", Some(AGENT_WORKERS)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Inside the runtime: the agent's lazily connected download channel
    // registers with it.
    let (agent, metrics) = match runtime.block_on(async {
        // A renewal a crash interrupted is finished before anything reads
        // the TLS files.
        if let Some((dir, host)) = AgentConfig::tls_files(&args) {
            baton_agent::enroll::finish_renewal(&dir, &host)
                .map_err(|e| vec![format!("cannot finish a certificate renewal: {e}")])?;
        }
        // A new host: get a certificate with the one-time token first.
        if let Some(target) = AgentConfig::enrollment(&args).map_err(|e| e.0)? {
            let host = target.host_id.clone();
            let mut waiting = || {
                tracing::warn!(%host, "waiting for an operator to accept this host (baton enroll accept {host})");
            };
            baton_agent::enroll::enroll(&target, &mut waiting, None)
                .await
                .map_err(|e| vec![e])?;
        }
        let config = AgentConfig::resolve(args).map_err(|e| e.0)?;
        // Bound before anything runs, so a taken port is a start-up error.
        let metrics = match config.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| vec![format!("cannot serve metrics on {addr}: {e}")])?,
            ),
            None => None,
        };
        // Before anything else: settle an upgrade of this agent, or run
        // the release the host is on.
        let me = match selfupgrade::boot(&config.data_dir).map_err(|e| vec![e])? {
            selfupgrade::Boot::Run(me) => me,
            selfupgrade::Boot::Exec(mut cmd) => {
                use std::os::unix::process::CommandExt;
                let program = cmd.get_program().to_owned();
                let e = cmd.exec();
                return Err(vec![format!("cannot execute {}: {e}", program.display())]);
            }
        };
        // Which process is this host's agent: after an upgrade that was
        // reverted outside systemd it is not the one first started.
        let pidfile = config.data_dir.join("agent.pid");
        std::fs::write(&pidfile, format!("{}\n", std::process::id()))
            .map_err(|e| vec![format!("cannot write {}: {e}", pidfile.display())])?;
        let agent = Agent::upgradable(config, me).map_err(|e| vec![e])?;
        Ok((agent, metrics))
    }) {
        Ok(started) => started,
        Err(errors) => {
            for e in errors {
                eprintln!("baton-agent: {e}");
            }
            return ExitCode::from(EXIT_CONFIG as u8);
        }
    };
    runtime.block_on(async move {
        let shutdown = CancellationToken::new();
        let signals = match baton_common::process::cancel_on_signal(shutdown.clone()) {
            Ok(wait) => tokio::spawn(wait),
            Err(e) => {
                eprintln!("baton-agent: cannot install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(listener) = metrics {
            let addr = listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string());
            tracing::info!(%addr, "serving metrics at /metrics");
            let connected = agent.connected();
            let services = agent.services();
            let render = move || {
                let up = *connected.borrow();
                let services: Vec<_> = services.borrow().values().cloned().collect();
                async move { baton_agent::metrics::render(up, &services) }
            };
            tokio::spawn(baton_common::metrics::serve(
                listener,
                render,
                shutdown.clone(),
            ));
        }
        agent.run(shutdown).await;
        signals.abort();
        ExitCode::SUCCESS
    })
}

/// `baton-agent enroll`: sets the host up, says what it did on stderr.
fn enroll(args: &baton_agent::join::JoinArgs) -> ExitCode {
    let runtime = match baton_common::process::runtime_with("baton-agent", Some(1)) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let mut say = |line: &str| eprintln!("baton-agent: {line}");
    let result = runtime.block_on(baton_agent::join::run(args, &mut say));
    match result.and_then(|joined| {
        let labels: Vec<String> = joined
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        say(&format!(
            "enrolled as host {} (labels: {}); wrote {}",
            joined.host,
            if labels.is_empty() {
                "none".into()
            } else {
                labels.join(", ")
            },
            joined.config.display()
        ));
        baton_agent::join::start(args, &mut say)
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-agent: {e}");
            ExitCode::FAILURE
        }
    }
}
