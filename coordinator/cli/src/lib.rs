//! The `baton` command line: argument parsing, the connection to the
//! Control API, and one module per command group. Errors end as one human
//! sentence on stderr and a non-zero exit; `--json` output is one document
//! on stdout and nothing else there.

//!
//! The crate links the daemons (`baton-coordinator`, `baton-agent`) only
//! for `baton demo`, behind the default feature `demo`; built without it
//! (`cargo build -p baton-cli --no-default-features`), `baton` is a slim
//! client of the Control API.

#![forbid(unsafe_code)]

pub mod artifact;
mod audit;
mod certs;
mod dashboard;
#[cfg(feature = "demo")]
mod demo;
mod demo_service;
mod enroll;
mod freeze;
pub(crate) mod hosts;
mod logs;
mod ping;
mod plan;
pub mod rollout;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use baton_common::error_chain;
use baton_common::tls::ClientTls;
use baton_proto::control::v1::control_service_client::ControlServiceClient;
use clap::{Parser, Subcommand};
use tonic::transport::{Channel, Endpoint};

/// The coordinator URL used when neither `--coordinator` nor
/// `BATON_COORDINATOR` is given.
pub const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7443";

/// `baton`: operate a Baton fleet.
///
/// Talks to `batond`'s Control API over mutual TLS with an operator
/// certificate. Start with `baton demo` to see the whole story on this
/// machine, or `baton certs init` to create the certificates a fleet needs.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version = baton_common::VERSION_LINE,
    about = "baton: operate a Baton fleet — hosts, signed artifacts, rollouts, enrollment, audit",
    long_about = "baton: operate a Baton fleet — hosts, signed artifacts, rollouts, enrollment, audit.\n\nTalks to batond's Control API over mutual TLS with an operator certificate (--tls-dir). Start with `baton demo` to see the whole story on this machine, or `baton certs init` to create the certificates a fleet needs. Exit codes: 0 success, 1 the operation failed, 2 usage error, 3 coordinator unreachable, 4 refused (docs/reference/exit-codes.md).",
    after_help = "Examples:\n  baton demo\n  export BATON_COORDINATOR=https://coord.example:7443 BATON_TLS_DIR=~/.baton\n  baton hosts\n  baton rollout start plan.toml --watch\n  baton rollout status latest"
)]
pub struct Cli {
    /// The coordinator's URL; with several coordinators (HA on etcd),
    /// comma-separated URLs: the CLI finds the leader.
    #[arg(long, global = true, env = "BATON_COORDINATOR", default_value = DEFAULT_COORDINATOR, value_name = "URL")]
    pub coordinator: String,

    /// Directory with `ca.pem`, `operator.pem` and `operator-key.pem`.
    #[arg(long, global = true, env = "BATON_TLS_DIR", value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// The operator certificate to use instead of `operator.pem` in the
    /// TLS directory (its role decides what may be called); needs --key.
    #[arg(
        long,
        global = true,
        env = "BATON_CERT",
        value_name = "FILE",
        requires = "key"
    )]
    pub cert: Option<PathBuf>,

    /// The key of --cert.
    #[arg(
        long,
        global = true,
        env = "BATON_KEY",
        value_name = "FILE",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Certificates for a fleet (a development PKI).
    #[command(subcommand)]
    Certs(certs::CertsCommand),
    /// List the fleet's hosts: connected or not, labels, services.
    #[command(
        after_help = "Examples:\n  baton hosts\n  baton hosts web-1 --history\n  baton hosts --json | jq -r '.[] | select(.connected | not) | .host_id'"
    )]
    Hosts(hosts::HostsArgs),
    /// Send a no-op through every connected agent's stream at once and
    /// time the answers: is the whole fleet listening? Exit 1 when a
    /// selected host did not answer (needs an operator certificate).
    #[command(after_help = "Examples:\n  baton ping\n  baton ping --label role=api --timeout 3s")]
    Ping(ping::PingArgs),
    /// Signed release artifacts: keys, packing, upload, listing.
    #[command(subcommand)]
    Artifact(artifact::ArtifactCommand),
    /// Roll a version out across the fleet and follow it.
    #[command(subcommand)]
    Rollout(rollout::RolloutCommand),
    /// A service's log on one host, through its agent: the last lines,
    /// and with --follow what it logs next (needs an operator
    /// certificate; every call is in the audit log).
    #[command(
        after_help = "Examples:\n  baton logs web-1 api\n  baton logs web-1 api --follow\n  baton logs web-1 api -n 1000 | grep ERROR"
    )]
    Logs(logs::LogsArgs),
    /// Hold every rollout until a time or until `baton unfreeze`: new
    /// rollouts wait in pending, running ones start no new host (those
    /// activating finish). Needs an operator certificate; audited.
    #[command(
        after_help = "Examples:\n  baton freeze --until 2h --reason \"incident 4711\"\n  baton freeze --until 2026-12-27T00:00:00Z --reason \"holidays\"\n  baton freeze --status\n\nbatond's --deploy-window and --freeze-period hold rollouts too; `--status` says what holds them now."
    )]
    Freeze(freeze::FreezeArgs),
    /// Lift an operator's freeze (the config's windows still apply).
    #[command(after_help = "Examples:\n  baton unfreeze\n  baton unfreeze --json")]
    Unfreeze(freeze::UnfreezeArgs),
    /// Plan files, checked offline.
    #[command(subcommand)]
    Plan(plan::PlanCommand),
    /// The audit log: every change and every refused call, newest first
    /// (needs an admin certificate).
    #[command(
        after_help = "Examples:\n  baton audit\n  baton audit --limit 1000 --json | jq '.[] | select(.result == \"denied\")'"
    )]
    Audit(audit::AuditArgs),
    /// Enroll new hosts with join tokens (needs an admin certificate).
    #[command(subcommand)]
    Enroll(enroll::EnrollCommand),
    /// Sign-in tokens for the web dashboard (`batond --http-listen`).
    #[command(subcommand)]
    Dashboard(dashboard::DashboardCommand),
    /// Run a coordinator and three agents on this machine and show them
    /// at work; needs nothing but this binary.
    #[command(
        after_help = "Examples:\n  baton demo\n  baton demo --keep-running     # then try `baton hosts` from another terminal"
    )]
    Demo(DemoArgs),
    /// The tiny HTTP service `baton demo` rolls out (used by the demo and
    /// the tests).
    #[command(hide = true)]
    DemoService(demo_service::DemoServiceArgs),
}

/// Arguments of `baton demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the fleet running after the story until Ctrl-C, e.g. to try
    /// `baton hosts` or `baton rollout list` against it from another
    /// terminal.
    #[arg(long)]
    pub keep_running: bool,
}

/// `baton demo` in a build without the daemons.
#[cfg(not(feature = "demo"))]
mod demo {
    use std::process::ExitCode;

    use super::{CliError, DemoArgs};

    pub async fn run(_: DemoArgs) -> Result<ExitCode, CliError> {
        Err(CliError::new(
            "this baton was built without the demo (the cargo feature `demo` of baton-cli, on by default); \
             run `cargo run --release --bin baton -- demo` from the source tree"
                .to_owned(),
        ))
    }
}

/// A CLI failure: one sentence for stderr.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong.
    pub message: String,
    /// The process's exit code (see [`exit`]).
    pub code: u8,
}

/// `baton`'s exit codes; the daemons use the same for a usage error.
pub mod exit {
    pub use baton_common::exit::*;
}

impl CliError {
    /// The operation failed (exit code 1).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: exit::FAILED,
        }
    }

    /// No coordinator could be reached, or it refused this client's
    /// certificate (exit code 3).
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: exit::UNREACHABLE,
        }
    }

    /// The same failure with another exit code.
    pub fn with_code(self, code: u8) -> Self {
        Self { code, ..self }
    }
}

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        Self::new(e.to_string())
    }
}

/// Parses the command line and runs the command; the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    baton_common::process::init_logging(match cli.command {
        Command::Demo(_) => "error",
        _ => "warn",
    });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("baton: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Certs(cmd) => certs::run(cli.tls_dir.as_deref(), cmd),
        Command::Hosts(ref args) => hosts::run(&cli, args).await,
        Command::Ping(ref args) => ping::run(&cli, args).await,
        Command::Artifact(ref cmd) => artifact::run(&cli, cmd).await,
        Command::Rollout(ref cmd) => rollout::run(&cli, cmd).await,
        Command::Plan(ref cmd) => plan::run(cmd),
        Command::Logs(ref args) => logs::run(&cli, args).await,
        Command::Freeze(ref args) => freeze::freeze(&cli, args).await,
        Command::Unfreeze(ref args) => freeze::unfreeze(&cli, args).await,
        Command::Audit(ref args) => audit::run(&cli, args).await,
        Command::Enroll(ref cmd) => enroll::run(&cli, cmd).await,
        Command::Dashboard(ref cmd) => dashboard::run(&cli, cmd).await,
        Command::Demo(args) => demo::run(args).await,
        Command::DemoService(args) => demo_service::run(args).await,
    }
}

impl Cli {
    /// Connects to the Control API with the operator certificate.
    pub async fn control(&self) -> Result<ControlServiceClient<Channel>, CliError> {
        connect_control(&self.coordinator, &self.tls()?).await
    }

    /// The CA from the TLS directory and the operator certificate: `--cert`
    /// and `--key` when given, else `operator.pem` there.
    fn tls(&self) -> Result<ClientTls, CliError> {
        // A missing or unreadable certificate is the command line's
        // mistake (exit 2), like a bad flag.
        self.read_tls().map_err(|e| e.with_code(exit::USAGE))
    }

    fn read_tls(&self) -> Result<ClientTls, CliError> {
        let dir = self.tls_dir.as_ref().ok_or_else(|| {
            CliError::new("no TLS directory: pass --tls-dir or set BATON_TLS_DIR")
        })?;
        let (tls, path) = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => (
                ClientTls {
                    ca_pem: baton_common::tls::read_ca(&dir.join("ca.pem"))?,
                    identity: baton_common::tls::read_keyed_cert(cert, key)?,
                },
                cert.clone(),
            ),
            _ => (ClientTls::load(dir, "operator")?, dir.join("operator.pem")),
        };
        // The coordinator would only close the connection; say why here.
        if let Some((_, not_after)) = baton_common::tls::cert_validity(&tls.identity.cert_pem)
            && not_after < std::time::SystemTime::now()
        {
            return Err(CliError::new(format!(
                "the certificate {} expired at {}; issue a new one (baton certs issue-operator NAME --role ROLE)",
                path.display(),
                baton_common::time::rfc3339(not_after)
            )));
        }
        Ok(tls)
    }

    /// Like [`Cli::control`] without the per-call timeout, for uploads
    /// that take as long as they take.
    pub async fn control_without_timeout(&self) -> Result<ControlServiceClient<Channel>, CliError> {
        connect_control_with(&self.coordinator, &self.tls()?, None).await
    }
}

/// Opens a Control API connection to `url` with `tls`.
pub async fn connect_control(
    url: &str,
    tls: &ClientTls,
) -> Result<ControlServiceClient<Channel>, CliError> {
    connect_control_with(url, tls, Some(Duration::from_secs(30))).await
}

/// How long the CLI waits for coordinators to elect a leader.
const ELECTION_WAIT: Duration = Duration::from_secs(30);

/// How long connecting (TCP and TLS) and the role probe may take: a
/// coordinator that is paused accepts TCP but never finishes TLS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a coordinator says of its role.
enum Role {
    /// It leads (or has no notion of leading): use it.
    Leads,
    /// It follows; the leader, if one is elected.
    Follows(Option<String>),
    /// It did not answer in time, or the connection broke (and why).
    Silent(Option<String>),
}

/// Asks a coordinator's health service whether it serves the Control API;
/// a follower answers not serving, naming the leader in a header.
async fn role(channel: Channel) -> Role {
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = client.check(tonic_health::pb::HealthCheckRequest {
        service: "baton.control.v1.ControlService".into(),
    });
    let Ok(check) = tokio::time::timeout(CONNECT_TIMEOUT, check).await else {
        return Role::Silent(None);
    };
    match check {
        Ok(r) if r.get_ref().status == ServingStatus::NotServing as i32 => Role::Follows(
            r.metadata()
                .get("baton-leader")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        ),
        Ok(_) => Role::Leads,
        // A coordinator without a health service has no notion of leading.
        Err(s) if s.code() == tonic::Code::Unimplemented => Role::Leads,
        // A connection that broke (a coordinator switching from following
        // to leading closes them): try again. It may also be the TLS
        // layer refusing this client's certificate: say so.
        Err(s) => Role::Silent(Some(baton_common::error_chain(&s))),
    }
}

/// Opens a Control API connection with an optional per-call timeout
/// (streams are not cut by it once their response has begun). `urls` may
/// name several coordinators, comma-separated: the leader is found (a
/// follower names it), waiting up to 30 s while none is elected.
pub async fn connect_control_with(
    urls: &str,
    tls: &ClientTls,
    timeout: Option<Duration>,
) -> Result<ControlServiceClient<Channel>, CliError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let deadline = std::time::Instant::now() + ELECTION_WAIT;
    // Connection failures are retried briefly (a coordinator that just
    // took the lead restarts its connections); a pending election longer.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let mut last = None;
        let mut electing = false;
        for url in &list {
            let channel = match connect_one(url, tls, timeout).await {
                Ok(c) => c,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            match role(channel.clone()).await {
                Role::Leads => return Ok(ControlServiceClient::new(channel)),
                Role::Silent(why) => {
                    last = Some(CliError::new(match why {
                        Some(why) if why.contains("Certificate") || why.contains("certificate") => {
                            format!(
                                "the coordinator at {url} refused this client's certificate: {why}"
                            )
                        }
                        Some(why) => format!("the coordinator at {url} does not answer: {why}"),
                        None => format!("the coordinator at {url} does not answer"),
                    }));
                }
                Role::Follows(Some(leader)) if leader.starts_with("https://") => {
                    match connect_one(&leader, tls, timeout).await {
                        Ok(c) if matches!(role(c.clone()).await, Role::Leads) => {
                            return Ok(ControlServiceClient::new(c));
                        }
                        Ok(_) => electing = true,
                        // A leader that died keeps its key until its
                        // lease ends; then another is elected.
                        Err(e) => {
                            electing = true;
                            last = Some(e);
                        }
                    }
                }
                Role::Follows(_) => electing = true,
            }
        }
        if (!electing && attempts >= 3) || std::time::Instant::now() >= deadline {
            let last = last.unwrap_or_else(|| {
                CliError::new(format!(
                    "no coordinator among {urls} leads (they are electing one, or etcd is unreachable)"
                ))
            });
            return Err(last.with_code(exit::UNREACHABLE));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn connect_one(
    url: &str,
    tls: &ClientTls,
    timeout: Option<Duration>,
) -> Result<Channel, CliError> {
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| {
            CliError::new(format!(
                "coordinator URL {url:?} is invalid: {}",
                error_chain(&e)
            ))
        })?
        .tls_config(tls.to_tonic())
        .map_err(|e| CliError::new(format!("cannot set up TLS: {}", error_chain(&e))))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(t) = timeout {
        endpoint = endpoint.timeout(t);
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(CliError::new(format!(
            "cannot reach the coordinator at {url}: {}",
            error_chain(&e)
        ))),
        Err(_) => Err(CliError::new(format!(
            "cannot reach the coordinator at {url}: no TLS handshake within {}s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}

/// A timestamp from the Control API as RFC 3339 (empty when unset).
pub fn timestamp_text(t: Option<&prost_types::Timestamp>) -> String {
    t.and_then(baton_common::time::from_timestamp)
        .map(baton_common::time::rfc3339)
        .unwrap_or_default()
}

/// Turns a failed call into a sentence that says what the coordinator said.
pub fn call_failed(what: &str, status: tonic::Status) -> CliError {
    let detail = match std::error::Error::source(&status) {
        Some(source) if status.message().is_empty() || status.message() == "transport error" => {
            error_chain(source)
        }
        _ => status.message().to_owned(),
    };
    let code = match status.code() {
        tonic::Code::PermissionDenied => "permission denied",
        tonic::Code::Unauthenticated => "not authenticated",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::NotFound => "not found",
        tonic::Code::Unavailable => "coordinator unavailable",
        tonic::Code::FailedPrecondition => "failed precondition",
        _ => "failed",
    };
    let exit = match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unauthenticated | tonic::Code::DeadlineExceeded => {
            exit::UNREACHABLE
        }
        tonic::Code::PermissionDenied
        | tonic::Code::FailedPrecondition
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists
        | tonic::Code::ResourceExhausted => exit::REFUSED,
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => exit::USAGE,
        _ => exit::FAILED,
    };
    CliError::new(format!("{what}: {code}: {detail}")).with_code(exit)
}
