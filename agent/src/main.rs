//! `baton-agent`: the Baton host agent. See `baton-agent --help`.

use std::process::ExitCode;

use baton_agent::{Agent, AgentArgs, AgentConfig};
use baton_common::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let args = match baton_common::process::parse_args::<AgentArgs>() {
        Ok(args) => args,
        Err(code) => return code,
    };
    baton_common::process::init_logging("info");
    let runtime = match baton_common::process::runtime("baton-agent") {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    // Inside the runtime: the agent's lazily connected download channel
    // registers with it.
    let agent = match runtime.block_on(async {
        AgentConfig::resolve(args)
            .map_err(|e| e.0)
            .and_then(|c| Agent::new(c).map_err(|e| vec![e]))
    }) {
        Ok(agent) => agent,
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
        agent.run(shutdown).await;
        signals.abort();
        ExitCode::SUCCESS
    })
}
