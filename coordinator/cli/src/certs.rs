//! `baton certs`: the development PKI.

use std::path::{Path, PathBuf};
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
    #[command(
        after_help = "Examples:\n  baton certs init --out /etc/baton/tls --coordinator-name coord.example.org\n  baton certs init --out ./tls --agents web-1,web-2     # a dev fleet with agent certificates"
    )]
    Init {
        /// Where to write the files (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Host ids to issue agent certificates for, comma-separated.
        #[arg(long, value_name = "H1,H2,...", value_delimiter = ',')]
        agents: Vec<String>,
        /// A DNS name or IP address agents and operators reach the
        /// coordinator by (besides localhost, 127.0.0.1 and ::1, always
        /// there); repeatable or comma-separated.
        #[arg(long, value_name = "NAME", value_delimiter = ',')]
        coordinator_name: Vec<String>,
    },
    /// Issue an operator certificate NAME.pem/NAME-key.pem signed by the CA
    /// in --tls-dir, carrying a role: viewer (reads), operator (artifacts
    /// and rollouts) or admin (everything). Use it with --cert/--key.
    #[command(
        after_help = "Example:\n  baton --tls-dir /etc/baton/tls certs issue-operator alice --role operator"
    )]
    IssueOperator {
        /// The operator's name (the identity in the audit log).
        name: String,
        /// What the certificate may do.
        #[arg(long, value_enum)]
        role: baton_common::tls::Role,
    },
}

/// Runs a certificate command.
pub fn run(tls_dir: Option<&Path>, cmd: CertsCommand) -> Result<ExitCode, CliError> {
    match cmd {
        CertsCommand::IssueOperator { name, role } => {
            let dir = tls_dir.ok_or_else(|| {
                CliError::new(
                    "no TLS directory (holding the CA): pass --tls-dir or set BATON_TLS_DIR",
                )
            })?;
            let (cert, key) = baton_common::pki::issue_operator(dir, &name, role)?;
            println!(
                "wrote {} and {} (role {role})",
                cert.display(),
                key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        CertsCommand::Init {
            out,
            agents,
            coordinator_name,
        } => {
            let ids = agents
                .iter()
                .map(|a| {
                    HostId::try_from(a.as_str())
                        .map_err(|e| CliError::new(format!("agent host id {}", e.reason)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let report = baton_common::pki::init_with_names(&out, &ids, &coordinator_name)?;
            if !coordinator_name.is_empty() && report.kept.iter().any(|f| f == "coordinator.pem") {
                eprintln!(
                    "note: {} exists already and was kept: it does not gain the names given (move it away and run this again)",
                    out.join("coordinator.pem").display()
                );
            }
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
