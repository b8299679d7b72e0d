//! `baton certs`: the development PKI.

use std::path::PathBuf;
use std::process::ExitCode;

use baton_common::host::HostId;
use clap::Subcommand;

use super::CliError;

/// Certificate commands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a CA, the coordinator's and an operator's certificates, and
    /// one certificate per agent (its host id inside). An existing CA in
    /// DIR is reused and existing files are kept, so running it again with
    /// more agents only adds theirs.
    Init {
        /// Where to write the files (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Host ids to issue agent certificates for, comma-separated.
        #[arg(long, value_name = "H1,H2,...", value_delimiter = ',')]
        agents: Vec<String>,
    },
}

/// Runs a certificate command.
pub fn run(cmd: CertsCommand) -> Result<ExitCode, CliError> {
    match cmd {
        CertsCommand::Init { out, agents } => {
            let ids = agents
                .iter()
                .map(|a| {
                    HostId::try_from(a.as_str())
                        .map_err(|e| CliError(format!("agent host id {}", e.reason)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let report = baton_common::pki::init(&out, &ids)?;
            for f in &report.written {
                println!("wrote {}", out.join(f).display());
            }
            for f in &report.kept {
                println!("kept  {}", out.join(f).display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
