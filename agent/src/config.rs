//! `baton-agent`'s configuration: flags over an optional TOML file with the
//! same keys, fully checked (TLS files included) before anything connects.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use baton_common::artifact::{PublicKey, read_public_key};
use baton_common::host::{HostId, Labels, parse_key_value, validate_labels};
pub use baton_common::process::ConfigErrors;
use baton_common::tls::ClientTls;
use clap::Parser;

/// Releases kept per service by default (the current one included).
pub const DEFAULT_KEEP_RELEASES: usize = 3;

/// The default cap on the delay between reconnect attempts.
pub const DEFAULT_RECONNECT_MAX: Duration = Duration::from_secs(5);
/// The longest `--reconnect-max`.
pub const MAX_RECONNECT_MAX: Duration = Duration::from_secs(600);
/// The most releases `--keep-releases` may keep per service.
pub const MAX_KEEP_RELEASES: usize = 1000;

/// `baton-agent`: the Baton host agent.
///
/// Holds one mutual-TLS gRPC stream to the coordinator, reports the host's
/// labels and services, and executes the coordinator's commands. It
/// reconnects with capped, jittered exponential backoff and never gives up.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "baton-agent",
    version = baton_common::VERSION_LINE,
    about = "baton-agent: the Baton host agent — holds one stream to the coordinator and runs its commands on this host",
    long_about = None,
    after_help = "Examples:\n  baton-agent enroll --coordinator https://coord.example:7443 --token TOKEN   # set this host up\n  baton-agent --config /etc/baton/agent.toml                                 # as baton-agent.service runs it\n\nExit codes: 0 clean shutdown, 1 a failure at run time, 2 a bad flag, config file or certificate."
)]
pub struct AgentArgs {
    /// A TOML file with any of the keys below (`coordinator`, `host-id`,
    /// `data-dir`, `tls-dir`, `labels`, `vars`, `trusted-keys`,
    /// `reconnect-max`, `keep-releases`, `metrics-listen`, `download-stall-timeout`,
    /// `peer-listen`, `peer-uploads`, `peer-upload-rate`, `peer-serve-for`); flags win over it (labels and vars are merged).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// The coordinator's URL, e.g. https://127.0.0.1:7443. With several
    /// coordinators (HA on etcd), repeat the flag or separate URLs with
    /// commas: the agent finds the leader.
    #[arg(long, value_name = "URL", value_delimiter = ',')]
    pub coordinator: Vec<String>,

    /// This host's id; must match the host id in the agent certificate
    /// [default: the hostname, or /etc/machine-id when the hostname is not
    /// a valid host id].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,

    /// Directory for the agent's state, releases under `services/` (mode 0700).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Directory with `ca.pem`, `agent-<ID>.pem` and `agent-<ID>-key.pem`.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// A label for plan selectors, e.g. `--label role=api`; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// A variable for `${NAME}` in service.toml; repeatable.
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_key_value)]
    pub vars: Vec<(String, String)>,

    /// A load balancer on this host that plans may drain it from
    /// (`run_on = "agent"`): an HAProxy runtime-API socket (a unix path or
    /// tcp://IP:PORT) or the program of an `exec` balancer's commands,
    /// exactly as the plan names it; repeatable (at most 64). None: plans
    /// cannot use a local balancer.
    #[arg(long = "balancer", value_name = "SOCKET|PROGRAM")]
    pub balancers: Vec<String>,

    /// A public key (from `baton artifact keygen`) whose signatures this
    /// host accepts; repeatable.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,

    /// The longest wait between reconnect attempts [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub reconnect_max: Option<Duration>,

    /// Releases kept per service for instant rollback, the current one
    /// included [default: 3].
    #[arg(long, value_name = "N")]
    pub keep_releases: Option<usize>,

    /// A one-time token from `baton enroll create`: when the TLS directory
    /// holds `ca.pem` but no certificate for this host yet, the agent
    /// generates its key and gets its certificate with it.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BATON_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub enroll_token: Option<String>,

    /// Serve the agent's Prometheus metrics at http://ADDR/metrics:
    /// IP:PORT, or a port alone for 127.0.0.1:PORT (plain HTTP: keep it on
    /// loopback or a private network). Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// A download below 16 KiB/s for this long (or silent) has stalled: it
    /// is resumed, and after three stalls in a row staging fails — within
    /// three times this of the source turning slow [default: 30s; 1s to
    /// 10m].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub download_stall_timeout: Option<Duration>,

    /// Serve staged payloads to other agents of the fleet at ADDR (IP:PORT;
    /// 0.0.0.0:PORT serves on every address and the coordinator tells
    /// peers the one it sees this agent at). Mutual TLS with the agent's
    /// certificate, agents only, payloads of current rollouts only, each
    /// piece checked by the receiver. Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,

    /// Downloads served to peers at once; more are sent elsewhere
    /// [default: 4; 1 to 256].
    #[arg(long, value_name = "N")]
    pub peer_uploads: Option<u32>,

    /// The most bytes per second served to peers, all uploads together
    /// (at least 1048576, and 262144 for each of --peer-uploads)
    /// [default: no limit].
    #[arg(long, value_name = "BYTES")]
    pub peer_upload_rate: Option<u64>,

    /// How long a staged payload is still served to peers [default: 30m;
    /// at most 7days].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub peer_serve_for: Option<Duration>,

    /// The systemctl that drives services run by systemd (`supervisor =
    /// "systemd"` in service.toml) [default: systemctl on the PATH].
    #[arg(long, value_name = "PROGRAM", env = "BATON_SYSTEMCTL")]
    pub systemctl: Option<PathBuf>,

    /// Internal: watch an upgrade of this agent (started by the agent
    /// itself, with --data-dir only).
    #[arg(long, hide = true)]
    pub upgrade_watchdog: bool,

    /// Run the agent (no command), or set a new host up.
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
}

/// `baton-agent`'s commands besides running.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum AgentCommand {
    /// Set this host up with a join token: learn and check the fleet CA,
    /// generate the host's key, get its certificate, copy trusted release
    /// keys, write agent.toml and start the agent under systemd.
    Enroll(JoinArgs),
}

/// Where `baton-agent enroll` writes unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/baton/agent.toml";
/// The agent's state directory by default (the unit's `StateDirectory`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/baton-agent";
/// Where trusted release keys are copied by default.
pub const DEFAULT_KEYS_DIR: &str = "/etc/baton/keys";

/// `baton-agent enroll`.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  # On the coordinator (admin): one token for up to 500 hosts, a week.
  baton enroll create --uses 500 --ttl 7d --label role=api

  # On each new host, as root: enroll, write /etc/baton/agent.toml, start.
  baton-agent enroll --coordinator https://coord.example:7443 \\
      --token bt1-…  --trusted-key release.pub")]
pub struct JoinArgs {
    /// The coordinator's URL, e.g. https://coord.example:7443; repeat the
    /// flag (or separate with commas) for several coordinators.
    #[arg(long, value_name = "URL", value_delimiter = ',', required = true)]
    pub coordinator: Vec<String>,

    /// The join token `baton enroll create` printed (`TOKEN.FINGERPRINT`).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "BATON_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub token: String,

    /// This host's id [default: the hostname, or /etc/machine-id when the
    /// hostname is not a valid host id].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,

    /// A label for plan selectors, added to the ones the token grants (the
    /// token's win); repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub labels: Vec<(String, String)>,

    /// A public release key (from `baton artifact keygen`) to trust; copied
    /// into --keys-dir; repeatable.
    #[arg(long = "trusted-key", value_name = "FILE")]
    pub trusted_keys: Vec<PathBuf>,

    /// The fleet's `ca.pem`, for a token without a CA fingerprint.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// The configuration file to write.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,

    /// The agent's state directory.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Where the key and certificates go [default: DATA-DIR/tls].
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Where trusted release keys are copied.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_KEYS_DIR)]
    pub keys_dir: PathBuf,

    /// How long to wait for an operator to accept this host, when the token
    /// needs that [at most 7days].
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub wait: Duration,

    /// Replace an existing configuration file.
    #[arg(long)]
    pub force: bool,

    /// Do not run `systemctl enable --now baton-agent` afterwards.
    #[arg(long)]
    pub no_start: bool,

    /// The systemctl to start the agent with [default: systemctl on the PATH].
    #[arg(long, value_name = "PROGRAM", env = "BATON_SYSTEMCTL")]
    pub systemctl: Option<PathBuf>,
}

/// The longest `--wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    coordinator: Option<Urls>,
    host_id: Option<String>,
    data_dir: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    vars: BTreeMap<String, String>,
    #[serde(default)]
    balancer: Vec<String>,
    #[serde(default)]
    trusted_keys: Vec<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    reconnect_max: Option<Duration>,
    keep_releases: Option<usize>,
    metrics_listen: Option<String>,
    #[serde(default, with = "humantime_serde")]
    download_stall_timeout: Option<Duration>,
    systemctl: Option<PathBuf>,
    peer_listen: Option<String>,
    peer_uploads: Option<u32>,
    peer_upload_rate: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    peer_serve_for: Option<Duration>,
}

/// `coordinator` in the file: one URL, comma-separated URLs, or a list.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum Urls {
    One(String),
    Many(Vec<String>),
}

impl Urls {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => s.split(',').map(|u| u.trim().to_owned()).collect(),
            Self::Many(v) => v,
        }
    }
}

/// Every key an `agent.toml` may hold, as its reader accepts them (the
/// generated reference lists them with the flag of the same name).
pub fn file_keys() -> Vec<String> {
    baton_common::process::toml_keys::<FileConfig>("__probe = 1")
}

/// A complete, checked agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The coordinators' URLs (one, or every one sharing an etcd store).
    pub coordinators: Vec<String>,
    /// This host's id.
    pub host_id: HostId,
    /// The agent's state directory.
    pub data_dir: PathBuf,
    /// The agent's TLS material.
    pub tls: ClientTls,
    /// Where it came from, and where a renewed certificate goes (`None`:
    /// no renewal, for agents run inside another program).
    pub tls_dir: Option<PathBuf>,
    /// The host's labels.
    pub labels: Labels,
    /// Variables for service.toml.
    pub vars: BTreeMap<String, String>,
    /// The local balancers plans may use.
    pub balancers: Vec<String>,
    /// Public keys trusted for artifact signatures.
    pub trusted_keys: Vec<PublicKey>,
    /// Releases kept per service.
    pub keep_releases: usize,
    /// The first reconnect delay.
    pub reconnect_initial: Duration,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The cap on reconnect delays.
    pub reconnect_max: Duration,
    /// How slow a download may get before staging fails.
    pub download: crate::executor::DownloadLimits,
    /// What drives units of services run by systemd.
    pub systemctl: crate::executor::Systemctl,
    /// Peer-to-peer staging.
    pub peers: crate::peers::PeerConfig,
}

/// This host's id when none is given: the hostname, else the machine id.
pub fn default_host_id() -> Result<HostId, String> {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_owned());
    let hostname = read("/proc/sys/kernel/hostname").or_else(|_| read("/etc/hostname"));
    if let Ok(name) = &hostname
        && let Ok(id) = HostId::try_from(name.as_str())
    {
        return Ok(id);
    }
    let machine = read("/etc/machine-id").map_err(|e| {
        format!("no host id: the hostname is not a valid one and /etc/machine-id cannot be read ({e}); pass --host-id")
    })?;
    HostId::try_from(machine.as_str())
        .map_err(|e| format!("no host id: /etc/machine-id {}; pass --host-id", e.reason))
}

/// A join token: the secret, and the CA fingerprint when it carries one.
pub fn split_token(token: &str) -> Result<(String, Option<String>), String> {
    let token = token.trim();
    match token.split_once('.') {
        None => Ok((token.to_owned(), None)),
        Some((secret, pin)) => {
            if pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "the token's CA fingerprint {:?} is not 64 hex digits: copy the whole token `baton enroll create` printed",
                    baton_common::text::prefix(pin, 16)
                ));
            }
            Ok((secret.to_owned(), Some(pin.to_ascii_lowercase())))
        }
    }
}

/// What a new host enrolls with: `--enroll-token` and where to.
#[derive(Debug, Clone)]
pub struct EnrollTarget {
    /// The coordinators to ask.
    pub coordinators: Vec<String>,
    /// The host id to enroll as.
    pub host_id: HostId,
    /// The TLS directory: holds `ca.pem`; receives the key and certificate.
    pub tls_dir: PathBuf,
    /// The one-time token.
    pub token: String,
}

impl AgentConfig {
    /// The TLS directory and host id given, for finishing a certificate
    /// renewal a crash interrupted before anything reads the TLS files.
    /// Both come from the flags or the config file, as [`Self::resolve`]
    /// reads them; a file that does not read is left for `resolve` to
    /// report.
    pub fn tls_files(args: &AgentArgs) -> Option<(PathBuf, HostId)> {
        let file: FileConfig = match &args.config {
            Some(path) => baton_common::process::read_toml(path).ok()?,
            None => FileConfig::default(),
        };
        let host = match args.host_id.clone().or(file.host_id) {
            Some(host) => HostId::try_from(host.as_str()).ok()?,
            None => default_host_id().ok()?,
        };
        Some((args.tls_dir.clone().or(file.tls_dir)?, host))
    }

    /// What to enroll with, when `--enroll-token` is given and the TLS
    /// directory has no certificate for this host yet. Reads the config
    /// file and checks a path; enrolling is the caller's (the `enroll`
    /// module, which depends on this one and not the other way round).
    pub fn enrollment(args: &AgentArgs) -> Result<Option<EnrollTarget>, ConfigErrors> {
        let Some(token) = args.enroll_token.clone() else {
            return Ok(None);
        };
        // A join token's fingerprint is for `baton-agent enroll`; here the
        // CA is in the TLS directory already.
        let (token, _) = split_token(&token).map_err(|e| ConfigErrors(vec![e]))?;
        let file: FileConfig = match &args.config {
            Some(path) => {
                baton_common::process::read_toml(path).map_err(|e| ConfigErrors(vec![e]))?
            }
            None => FileConfig::default(),
        };
        let host = args.host_id.clone().or(file.host_id);
        let tls_dir = args.tls_dir.clone().or(file.tls_dir);
        let coordinators = if args.coordinator.is_empty() {
            file.coordinator.map_or_else(Vec::new, Urls::into_vec)
        } else {
            args.coordinator.clone()
        };
        let (Some(host), Some(tls_dir)) = (host, tls_dir) else {
            return Err(ConfigErrors(vec![
                "--enroll-token needs --host-id and --tls-dir (holding ca.pem)".into(),
            ]));
        };
        let host_id = HostId::try_from(host.as_str())
            .map_err(|e| ConfigErrors(vec![format!("host id {}", e.reason)]))?;
        if tls_dir.join(format!("agent-{host_id}.pem")).exists() {
            return Ok(None);
        }
        Ok(Some(EnrollTarget {
            coordinators,
            host_id,
            tls_dir,
            token,
        }))
    }

    /// Builds and checks the configuration, reading the TLS files; reports
    /// every problem at once.
    pub fn resolve(args: AgentArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let file = match &args.config {
            Some(path) => baton_common::process::read_toml(path).unwrap_or_else(|e| {
                errors.push(e);
                FileConfig::default()
            }),
            None => FileConfig::default(),
        };
        let hint = |key: &str| match &args.config {
            Some(path) => format!("pass --{key} or set {key} in {}", path.display()),
            None => format!("pass --{key} or set it in a --config file"),
        };

        let coordinators: Vec<String> = if args.coordinator.is_empty() {
            file.coordinator.map_or_else(Vec::new, Urls::into_vec)
        } else {
            args.coordinator
        };
        if coordinators.is_empty() {
            errors.push(format!("no coordinator URL: {}", hint("coordinator")));
        }
        for url in &coordinators {
            if !url.starts_with("https://") {
                errors.push(format!("coordinator URL {url:?} must start with https:// (agents only speak mutual TLS)"));
            }
        }
        let host_id = match args.host_id.or(file.host_id) {
            None => match default_host_id() {
                Ok(id) => Some(id),
                Err(e) => {
                    errors.push(format!("{e} ({})", hint("host-id")));
                    None
                }
            },
            Some(id) => HostId::try_from(id.as_str())
                .map_err(|e| errors.push(format!("host id {}", e.reason)))
                .ok(),
        };
        let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| {
            errors.push(format!("no data directory: {}", hint("data-dir")));
            PathBuf::new()
        });
        let tls_dir = args.tls_dir.or(file.tls_dir);
        if tls_dir.is_none() {
            errors.push(format!("no TLS directory: {}", hint("tls-dir")));
        }
        let tls = match (&tls_dir, &host_id) {
            (Some(dir), Some(id)) => ClientTls::load(dir, &format!("agent-{id}"))
                .map_err(|e| errors.push(e.to_string()))
                .ok(),
            _ => None,
        };

        let mut labels = file.labels;
        labels.extend(args.labels);
        if let Err(e) = validate_labels(&labels) {
            errors.push(format!("label {e}"));
        }
        let mut vars = file.vars;
        vars.extend(args.vars);
        if let Some(bad) = vars
            .keys()
            .find(|k| baton_common::host::validate_name(k).is_err())
        {
            errors.push(format!(
                "variable name {bad:?} must be letters, digits, '.', '_' or '-'"
            ));
        }
        let mut balancers = file.balancer;
        balancers.extend(args.balancers);
        if let Err(e) = baton_common::traffic::check_allowed(&balancers) {
            errors.push(e);
        }
        let mut trusted_keys = file.trusted_keys;
        trusted_keys.extend(args.trusted_keys);
        let trusted_keys: Vec<PublicKey> = trusted_keys
            .iter()
            .filter_map(|path| {
                read_public_key(path)
                    .map_err(|e| errors.push(format!("trusted key: {e}")))
                    .ok()
            })
            .collect();
        let keep_releases = args
            .keep_releases
            .or(file.keep_releases)
            .unwrap_or(DEFAULT_KEEP_RELEASES);
        if keep_releases < 2 {
            errors.push(format!(
                "keep-releases {keep_releases} is too small: at least 2 (the current release and the one to roll back to)"
            ));
        }
        if keep_releases > MAX_KEEP_RELEASES {
            errors.push(format!(
                "keep-releases {keep_releases} is too large: at most {MAX_KEEP_RELEASES}"
            ));
        }
        let reconnect_max = args
            .reconnect_max
            .or(file.reconnect_max)
            .unwrap_or(DEFAULT_RECONNECT_MAX);
        if reconnect_max < Duration::from_millis(100) || reconnect_max > MAX_RECONNECT_MAX {
            errors.push(format!(
                "reconnect-max {} is out of range: it must be between 100ms and 10m",
                baton_common::text::shorten(&humantime::format_duration(reconnect_max).to_string())
            ));
        }

        let download_window = args
            .download_stall_timeout
            .or(file.download_stall_timeout)
            .unwrap_or(crate::executor::DEFAULT_STALL_WINDOW);
        if download_window < Duration::from_secs(1) || download_window > Duration::from_secs(600) {
            errors.push(format!(
                "download-stall-timeout {} is out of range: it must be between 1s and 10m",
                baton_common::text::shorten(
                    &humantime::format_duration(download_window).to_string()
                )
            ));
        }
        let download = crate::executor::DownloadLimits {
            window: download_window,
        };
        let systemctl = match args.systemctl.or(file.systemctl) {
            Some(path) if path.as_os_str().is_empty() => {
                errors.push("systemctl: the program must not be empty".to_owned());
                crate::executor::Systemctl::default()
            }
            Some(path) => crate::executor::Systemctl::new(path),
            None => crate::executor::Systemctl::default(),
        };
        let metrics_listen = args
            .metrics_listen
            .or(file.metrics_listen)
            .and_then(|text| {
                baton_common::metrics::parse_listen(&text)
                    .map_err(|e| errors.push(format!("metrics-listen: {e}")))
                    .ok()
            });

        let peer_listen = args.peer_listen.or(file.peer_listen).and_then(|text| {
            text.parse::<std::net::SocketAddr>()
                .map_err(|_| {
                    errors.push(format!(
                        "peer-listen {:?} is not IP:PORT",
                        baton_common::text::prefix(&text, 64)
                    ))
                })
                .ok()
        });
        let peer_uploads = args
            .peer_uploads
            .or(file.peer_uploads)
            .unwrap_or(crate::peers::DEFAULT_UPLOADS);
        if !(1..=crate::peers::MAX_UPLOADS).contains(&peer_uploads) {
            errors.push(format!(
                "peer-uploads {peer_uploads} is out of range: it must be between 1 and {}",
                crate::peers::MAX_UPLOADS
            ));
        }
        let peer_serve_for = args
            .peer_serve_for
            .or(file.peer_serve_for)
            .unwrap_or(crate::peers::DEFAULT_SERVE_FOR);
        if peer_serve_for > crate::peers::MAX_SERVE_FOR {
            errors.push("peer-serve-for is too long: at most 7days".to_owned());
        }
        let upload_rate = args.peer_upload_rate.or(file.peer_upload_rate);
        // Each upload must get 256 KiB/s, so that a 1 MiB message never
        // takes a peer's stall window.
        let least = crate::peers::MIN_UPLOAD_RATE.max(u64::from(peer_uploads) << 18);
        if let Some(rate) = upload_rate
            && rate < least
        {
            errors.push(format!(
                "peer-upload-rate {rate} is too low: at least {least} bytes per second (1 MiB/s, and 256 KiB/s for each of the {peer_uploads} peer-uploads)"
            ));
        }
        let peers = crate::peers::PeerConfig {
            upload_rate,
            listen: peer_listen,
            uploads: peer_uploads,
            serve_for: peer_serve_for,
        };

        match (errors.is_empty(), host_id, tls) {
            (true, Some(host_id), Some(tls)) => Ok(Self {
                coordinators,
                host_id,
                data_dir,
                tls,
                tls_dir,
                labels,
                vars,
                balancers,
                trusted_keys,
                keep_releases,
                reconnect_initial: Duration::from_millis(100),
                reconnect_max,
                download,
                metrics_listen,
                systemctl,
                peers,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_token_is_a_secret_and_an_optional_fingerprint() {
        assert_eq!(split_token("bt1-ab").unwrap(), ("bt1-ab".into(), None));
        let pin = "AB".repeat(32);
        assert_eq!(
            split_token(&format!(" bt1-ab.{pin}\n")).unwrap(),
            ("bt1-ab".into(), Some("ab".repeat(32)))
        );
        assert!(split_token("bt1-ab.xyz").unwrap_err().contains("64 hex"));
    }

    fn errors_with_file(text: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, text).unwrap();
        let args =
            AgentArgs::try_parse_from(["baton-agent", "--config", file.to_str().unwrap()]).unwrap();
        AgentConfig::resolve(args).unwrap_err().0
    }

    #[test]
    fn an_interrupted_renewal_is_found_from_the_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "host-id = \"web-1\"\ntls-dir = \"/etc/baton/tls\"\n").unwrap();
        let args =
            AgentArgs::try_parse_from(["baton-agent", "--config", file.to_str().unwrap()]).unwrap();
        let (tls, host) = AgentConfig::tls_files(&args).unwrap();
        assert_eq!(tls, PathBuf::from("/etc/baton/tls"));
        assert_eq!(host.to_string(), "web-1");
        // Flags win over the file.
        let args = AgentArgs::try_parse_from([
            "baton-agent",
            "--config",
            file.to_str().unwrap(),
            "--host-id",
            "web-2",
        ])
        .unwrap();
        assert_eq!(
            AgentConfig::tls_files(&args).unwrap().1.to_string(),
            "web-2"
        );
        // Neither: nothing to finish.
        let args = AgentArgs::try_parse_from(["baton-agent"]).unwrap();
        assert!(AgentConfig::tls_files(&args).is_none());
    }

    #[test]
    fn several_coordinators_by_flag_or_file() {
        let a = AgentArgs::try_parse_from([
            "baton-agent",
            "--coordinator",
            "https://a:1,https://b:1",
            "--coordinator",
            "https://c:1",
        ])
        .unwrap();
        assert_eq!(a.coordinator, ["https://a:1", "https://b:1", "https://c:1"]);
        for text in [
            "coordinator = [\"https://a:1\", \"http://b:1\"]\n",
            "coordinator = \"https://a:1, http://b:1\"\n",
        ] {
            let errs = errors_with_file(text);
            assert!(
                errs.iter()
                    .any(|e| e.contains("\"http://b:1\" must start with https://")),
                "{errs:?}"
            );
            assert!(!errs.iter().any(|e| e.contains("a:1")), "{errs:?}");
            assert!(
                !errs.iter().any(|e| e.contains("no coordinator URL")),
                "{errs:?}"
            );
        }
        let errs = errors_with_file("host-id = \"h1\"\n");
        assert!(
            errs.iter().any(|e| e.contains("no coordinator URL")),
            "{errs:?}"
        );
    }
}
