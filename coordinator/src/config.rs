//! `batond`'s configuration: command-line flags over an optional TOML file
//! with the same keys. Everything is parsed and checked before any port is
//! bound, and every problem is reported at once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use baton_common::process::ConfigErrors;
use clap::Parser;

/// The default address of the agent stream and the Control API.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";
/// The default silence after which an agent counts as disconnected.
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The default time given to open streams to close on shutdown.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The default largest artifact payload: 4 GiB.
pub const DEFAULT_MAX_ARTIFACT_SIZE: u64 = 4 << 30;

/// `batond`: the Baton coordinator.
///
/// Holds the fleet registry and the rollout state machine, accepts one
/// mutual-TLS gRPC stream per agent and serves the Control API used by the
/// `baton` CLI, all on one port.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "batond",
    version = baton_common::VERSION_LINE,
    about = "batond: the Baton coordinator — runs rollouts, holds the fleet registry, serves agents, operators, the dashboard and metrics",
    long_about = None,
    after_help = "Examples:\n  batond --config /etc/baton/batond.toml                      # as batond.service runs it\n  batond --listen 127.0.0.1:7443 --data-dir ./state --tls-dir ./tls --http-listen 7080\n\nExit codes: 0 clean shutdown, 1 a failure at run time, 2 a bad flag, config file or certificate."
)]
pub struct BatondArgs {
    /// A TOML file with any of the keys below (`listen`, `data-dir`,
    /// `tls-dir`, `agent-timeout`, `shutdown-grace`, `max-artifact-size`,
    /// `store`, `metrics-listen`, `http-listen`, …);
    /// flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve agents and operators on [default: 127.0.0.1:7443].
    /// Port 0 picks a free port; the chosen address is printed on stdout.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Directory for the coordinator's state (created with mode 0700).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Directory with `ca.pem`, `coordinator.pem` and `coordinator-key.pem`
    /// (see `baton certs init`).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,

    /// Silence after which an agent counts as disconnected [default: 10s].
    /// Agents heartbeat three times within it.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub agent_timeout: Option<Duration>,

    /// On SIGTERM/SIGINT, how long open streams get to close [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,

    /// The largest artifact payload accepted by `baton artifact push`, in
    /// bytes [default: 4294967296, 4 GiB].
    #[arg(long, value_name = "BYTES")]
    pub max_artifact_size: Option<u64>,

    /// How many agents download one payload from batond at once while
    /// other agents can serve it (`baton-agent --peer-listen`); the rest
    /// fetch from those peers, so batond sends about one copy whatever the
    /// fleet's size. Agents with no peer to use always fetch from batond
    /// [default: 2, at most 10000].
    #[arg(long, value_name = "N")]
    pub artifact_uploads: Option<u32>,

    /// Where state lives: `embedded` (a redb file in the data dir, the
    /// default) or `etcd://HOST:PORT[,HOST:PORT…]` (needs a batond built
    /// with `--features etcd`).
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,

    /// With an etcd store: the URL agents and operators reach this batond
    /// at, which followers hand out while it leads [default:
    /// https://<listen address>].
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,

    /// How long the agent certificates this coordinator signs (enrollment,
    /// renewal) are valid; agents renew at two thirds [default: 30days].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub agent_cert_lifetime: Option<Duration>,

    /// With an etcd store: the leader's lease. A leader that cannot renew
    /// it for this long stops leading, and another takes over
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub lease_ttl: Option<Duration>,

    /// Serve Prometheus metrics at http://ADDR/metrics: IP:PORT, or a
    /// port alone for 127.0.0.1:PORT. Plain HTTP; off unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Serve the web dashboard at http://ADDR/: IP:PORT, or a port alone
    /// for 127.0.0.1:PORT (e.g. `--http-listen 7080`). Plain HTTP and
    /// readable without signing in: keep it on loopback (reach it through
    /// an SSH tunnel) unless a proxy in front adds TLS and access control.
    /// Off unless given.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,

    /// How long the audit log keeps the changes it records (refused and
    /// failed calls are kept apart and cannot push them out)
    /// [default: 365days; at most 3650days].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub audit_max_age: Option<Duration>,

    /// How many changes the audit log keeps at most, the newest
    /// [default: 20000; at most 1000000].
    #[arg(long, value_name = "COUNT")]
    pub audit_max_entries: Option<usize>,

    /// The Prometheus server that `kind = "prometheus"` analysis checks
    /// query, e.g. http://127.0.0.1:9090 (http or https).
    #[arg(long, value_name = "URL")]
    pub prometheus_url: Option<String>,

    /// A weekly window in which rollouts may start hosts, in UTC, e.g.
    /// "mon-fri 09:00-17:00"; repeat for several. Outside every window new
    /// rollouts wait and running ones pause between batches. None: always.
    #[arg(long = "deploy-window", value_name = "DAYS HH:MM-HH:MM")]
    pub deploy_windows: Vec<String>,

    /// A fixed freeze, START/END in RFC 3339, e.g.
    /// 2026-12-24T00:00:00Z/2026-12-27T00:00:00Z; repeat for several.
    #[arg(long = "freeze-period", value_name = "START/END")]
    pub freeze_periods: Vec<String>,

    /// A load balancer plans may drain hosts from through batond
    /// (`run_on = "coordinator"`): an HAProxy runtime-API socket (a unix
    /// path or tcp://IP:PORT) or the program of an `exec` balancer's
    /// commands, exactly as the plan names it; repeat for several (at most
    /// 64). None: plans cannot use a central balancer.
    #[arg(long = "balancer", value_name = "SOCKET|PROGRAM")]
    pub balancers: Vec<String>,
}

/// The config file: the same keys as the flags.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    agent_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    shutdown_grace: Option<Duration>,
    max_artifact_size: Option<u64>,
    artifact_uploads: Option<u32>,
    store: Option<String>,
    advertise_url: Option<String>,
    #[serde(default, with = "humantime_serde")]
    lease_ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    agent_cert_lifetime: Option<Duration>,
    metrics_listen: Option<String>,
    http_listen: Option<String>,
    #[serde(default, with = "humantime_serde")]
    audit_max_age: Option<Duration>,
    audit_max_entries: Option<usize>,
    prometheus_url: Option<String>,
    deploy_window: Option<Vec<String>>,
    freeze_period: Option<Vec<String>>,
    balancer: Option<Vec<String>>,
}

/// Every key a `batond.toml` may hold, as its reader accepts them (the
/// generated reference lists them with the flag of the same name).
pub fn file_keys() -> Vec<String> {
    baton_common::process::toml_keys::<FileConfig>("__probe = 1")
}

/// A complete, checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The state directory.
    pub data_dir: PathBuf,
    /// The TLS directory.
    pub tls_dir: PathBuf,
    /// Silence after which an agent is disconnected.
    pub agent_timeout: Duration,
    /// Time given to streams to close on shutdown.
    pub shutdown_grace: Duration,
    /// The largest payload accepted.
    pub max_artifact_size: u64,
    /// Downloads of one payload served at once while peers can serve it.
    pub artifact_uploads: u32,
    /// Where state lives.
    pub store: StoreConfig,
    /// The URL others reach this coordinator at (`None`: from the bound
    /// address).
    pub advertise_url: Option<String>,
    /// The leader's lease with an etcd store.
    pub lease_ttl: Duration,
    /// Validity of the agent certificates this coordinator signs.
    pub agent_cert_lifetime: Duration,
    /// Where to serve Prometheus metrics (`None`: nowhere).
    pub metrics_listen: Option<SocketAddr>,
    /// Where to serve the web dashboard (`None`: nowhere).
    pub http_listen: Option<SocketAddr>,
    /// How long, and how many, changes the audit log keeps.
    pub audit_retention: crate::audit::Retention,
    /// The Prometheus server analysis queries.
    pub prometheus_url: Option<String>,
    /// Deployment windows and fixed freezes.
    pub calendar: crate::freeze::Calendar,
    /// The balancers plans may use through batond.
    pub balancers: Vec<String>,
}

/// The default validity of agent certificates the coordinator signs.
pub const DEFAULT_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The default leader lease with an etcd store.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// The longest `--shutdown-grace`.
pub const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(600);
/// The longest `--agent-cert-lifetime`: five years.
pub const MAX_AGENT_CERT_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// The largest `--max-artifact-size`: 64 GiB.
pub const MAX_ARTIFACT_SIZE_LIMIT: u64 = 64 << 30;

/// Where the coordinator keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreConfig {
    /// A redb file in the data directory.
    #[default]
    Embedded,
    /// An etcd cluster (`host:port` endpoints).
    Etcd(Vec<String>),
}

impl StoreConfig {
    /// Parses `embedded` or `etcd://HOST:PORT[,HOST:PORT…]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "embedded" {
            return Ok(Self::Embedded);
        }
        let Some(list) = text.strip_prefix("etcd://") else {
            return Err(format!(
                "store {text:?} is neither \"embedded\" nor etcd://HOST:PORT[,HOST:PORT...]"
            ));
        };
        let endpoints: Vec<String> = list.split(',').map(str::trim).map(str::to_owned).collect();
        if let Some(bad) = endpoints.iter().find(|e| {
            e.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        }) {
            return Err(format!("store {text:?}: endpoint {bad:?} is not HOST:PORT"));
        }
        if !cfg!(feature = "etcd") {
            return Err(format!(
                "store {text:?}: this batond was built without etcd support; build it with `cargo build --release --features etcd` (needs protoc)"
            ));
        }
        Ok(Self::Etcd(endpoints))
    }
}

impl Config {
    /// A coordinator on a free loopback port with the defaults, for
    /// running it in-process (the demo, tests, benchmarks).
    pub fn loopback(data_dir: PathBuf, tls_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            tls_dir,
            agent_timeout: DEFAULT_AGENT_TIMEOUT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_artifact_size: DEFAULT_MAX_ARTIFACT_SIZE,
            artifact_uploads: crate::swarm::SwarmConfig::default().coordinator_slots,
            store: StoreConfig::Embedded,
            advertise_url: None,
            lease_ttl: DEFAULT_LEASE_TTL,
            agent_cert_lifetime: DEFAULT_AGENT_CERT_LIFETIME,
            metrics_listen: None,
            http_listen: None,
            audit_retention: crate::audit::DEFAULT_RETENTION,
            prometheus_url: None,
            calendar: crate::freeze::Calendar::default(),
            balancers: Vec::new(),
        }
    }

    /// Builds the configuration from flags and, when `--config` is given,
    /// the file; collects every problem instead of stopping at the first.
    pub fn resolve(args: BatondArgs) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let file = match &args.config {
            Some(path) => baton_common::process::read_toml(path).unwrap_or_else(|e| {
                errors.push(e);
                FileConfig::default()
            }),
            None => FileConfig::default(),
        };
        let source = |flag: &str| match &args.config {
            Some(path) => format!("pass --{flag} or set {flag} in {}", path.display()),
            None => format!("pass --{flag} or set it in a --config file"),
        };

        let listen_text = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen = listen_text.parse::<SocketAddr>().unwrap_or_else(|_| {
            errors.push(format!(
                "listen address {listen_text:?} is not IP:PORT (for example 127.0.0.1:7443)"
            ));
            SocketAddr::from(([127, 0, 0, 1], 0))
        });
        let data_dir = args.data_dir.or(file.data_dir).unwrap_or_else(|| {
            errors.push(format!("no data directory: {}", source("data-dir")));
            PathBuf::new()
        });
        let tls_dir = args.tls_dir.or(file.tls_dir).unwrap_or_else(|| {
            errors.push(format!("no TLS directory: {}", source("tls-dir")));
            PathBuf::new()
        });
        let agent_timeout = args
            .agent_timeout
            .or(file.agent_timeout)
            .unwrap_or(DEFAULT_AGENT_TIMEOUT);
        if agent_timeout < Duration::from_millis(300) || agent_timeout > Duration::from_secs(3600) {
            errors.push(format!(
                "agent-timeout {} is out of range: it must be between 300ms and 1h",
                baton_common::text::shorten(&humantime::format_duration(agent_timeout).to_string())
            ));
        }
        let shutdown_grace = args
            .shutdown_grace
            .or(file.shutdown_grace)
            .unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        if shutdown_grace > MAX_SHUTDOWN_GRACE {
            errors.push(format!(
                "shutdown-grace {} is out of range: it must be at most 10m",
                baton_common::text::shorten(
                    &humantime::format_duration(shutdown_grace).to_string()
                )
            ));
        }

        let max_artifact_size = args
            .max_artifact_size
            .or(file.max_artifact_size)
            .unwrap_or(DEFAULT_MAX_ARTIFACT_SIZE);
        if max_artifact_size == 0 || max_artifact_size > MAX_ARTIFACT_SIZE_LIMIT {
            errors.push(format!(
                "max-artifact-size {max_artifact_size} is out of range: it must be between 1 byte and {MAX_ARTIFACT_SIZE_LIMIT} (64 GiB)"
            ));
        }
        let artifact_uploads = args
            .artifact_uploads
            .or(file.artifact_uploads)
            .unwrap_or(crate::swarm::SwarmConfig::default().coordinator_slots);
        if !(1..=crate::swarm::MAX_COORDINATOR_SLOTS).contains(&artifact_uploads) {
            errors.push(format!(
                "artifact-uploads {artifact_uploads} is out of range: it must be between 1 and {}",
                crate::swarm::MAX_COORDINATOR_SLOTS
            ));
        }
        let store = match args.store.or(file.store) {
            None => StoreConfig::Embedded,
            Some(text) => StoreConfig::parse(&text).unwrap_or_else(|e| {
                errors.push(e);
                StoreConfig::Embedded
            }),
        };

        let advertise_url = args.advertise_url.or(file.advertise_url);
        if let Some(url) = &advertise_url
            && (!url.starts_with("https://") || url.len() <= "https://".len())
        {
            errors.push(format!(
                "advertise-url {url:?} must be an https:// URL (for example https://10.0.0.5:7443)"
            ));
        }
        if advertise_url.is_none()
            && listen.ip().is_unspecified()
            && matches!(store, StoreConfig::Etcd(_))
        {
            errors.push(format!(
                "listen address {listen} is not one others can reach: with an etcd store pass --advertise-url"
            ));
        }
        let lease_ttl = args
            .lease_ttl
            .or(file.lease_ttl)
            .unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(300) {
            errors.push(format!(
                "lease-ttl {} is out of range: it must be between 2s and 5m",
                baton_common::text::shorten(&humantime::format_duration(lease_ttl).to_string())
            ));
        }

        let agent_cert_lifetime = args
            .agent_cert_lifetime
            .or(file.agent_cert_lifetime)
            .unwrap_or(DEFAULT_AGENT_CERT_LIFETIME);
        if agent_cert_lifetime < Duration::from_secs(5)
            || agent_cert_lifetime > MAX_AGENT_CERT_LIFETIME
        {
            errors.push(format!(
                "agent-cert-lifetime {} is out of range: it must be between 5s and 1825days (5 years)",
                baton_common::text::shorten(
                    &humantime::format_duration(agent_cert_lifetime).to_string()
                )
            ));
        }

        let mut http_addr = |flag: &str, text: Option<String>| {
            baton_common::metrics::parse_listen(&text?)
                .map_err(|e| errors.push(format!("{flag}: {e}")))
                .ok()
        };
        let metrics_listen = http_addr(
            "metrics-listen",
            args.metrics_listen.or(file.metrics_listen),
        );
        let http_listen = http_addr("http-listen", args.http_listen.or(file.http_listen));

        let defaults = crate::audit::DEFAULT_RETENTION;
        let audit_retention = crate::audit::Retention {
            max_age: args
                .audit_max_age
                .or(file.audit_max_age)
                .unwrap_or(defaults.max_age),
            max_entries: args
                .audit_max_entries
                .or(file.audit_max_entries)
                .unwrap_or(defaults.max_entries),
        };
        if audit_retention.max_age < Duration::from_secs(3600)
            || audit_retention.max_age > crate::audit::MAX_RETENTION_AGE
        {
            errors.push(format!(
                "audit-max-age {} is out of range: it must be between 1h and 3650days",
                baton_common::text::shorten(
                    &humantime::format_duration(audit_retention.max_age).to_string()
                )
            ));
        }
        if audit_retention.max_entries < 100
            || audit_retention.max_entries > crate::audit::MAX_RETENTION_ENTRIES
        {
            errors.push(format!(
                "audit-max-entries {} is out of range: it must be between 100 and {}",
                audit_retention.max_entries,
                crate::audit::MAX_RETENTION_ENTRIES
            ));
        }

        let prometheus_url = args.prometheus_url.or(file.prometheus_url);
        if let Some(url) = &prometheus_url
            && (!(url.starts_with("http://") || url.starts_with("https://")) || url.len() > 512)
        {
            errors.push(format!(
                "prometheus-url {} must be an http:// or https:// URL of at most 512 characters (for example http://127.0.0.1:9090)",
                baton_common::text::quote(url)
            ));
        }
        let windows = if args.deploy_windows.is_empty() {
            file.deploy_window.unwrap_or_default()
        } else {
            args.deploy_windows
        };
        let periods = if args.freeze_periods.is_empty() {
            file.freeze_period.unwrap_or_default()
        } else {
            args.freeze_periods
        };
        if windows.len() + periods.len() > crate::freeze::MAX_ENTRIES {
            errors.push(format!(
                "{} deploy windows and freeze periods, more than the limit of {}",
                windows.len() + periods.len(),
                crate::freeze::MAX_ENTRIES
            ));
        }
        let balancers = if args.balancers.is_empty() {
            file.balancer.unwrap_or_default()
        } else {
            args.balancers
        };
        if let Err(e) = baton_common::traffic::check_allowed(&balancers) {
            errors.push(e);
        }
        let mut calendar = crate::freeze::Calendar::default();
        for w in windows.iter().take(crate::freeze::MAX_ENTRIES) {
            match crate::freeze::Window::parse(w) {
                Ok(w) => calendar.windows.push(w),
                Err(e) => errors.push(e),
            }
        }
        for p in periods.iter().take(crate::freeze::MAX_ENTRIES) {
            match crate::freeze::Period::parse(p) {
                Ok(p) => calendar.freezes.push(p),
                Err(e) => errors.push(e),
            }
        }

        if errors.is_empty() {
            Ok(Self {
                prometheus_url,
                calendar,
                balancers,
                listen,
                data_dir,
                tls_dir,
                agent_timeout,
                shutdown_grace,
                max_artifact_size,
                artifact_uploads,
                store,
                advertise_url,
                lease_ttl,
                agent_cert_lifetime,
                metrics_listen,
                http_listen,
                audit_retention,
            })
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> BatondArgs {
        BatondArgs::try_parse_from(std::iter::once("batond").chain(list.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_the_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("batond.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\ndata-dir = \"/d\"\ntls-dir = \"/t\"\nagent-timeout = \"5s\"\n").unwrap();
        let c = Config::resolve(args(&[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:9001",
        ]))
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9001");
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.agent_timeout, Duration::from_secs(5));
        assert_eq!(c.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        // The bound: a silent agent is noticed within 15 s by default.
        assert!(DEFAULT_AGENT_TIMEOUT <= Duration::from_secs(15));
    }

    #[test]
    fn analysis_and_calendar_settings_are_checked_and_the_file_may_hold_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("batond.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ntls-dir = \"/t\"\nprometheus-url = \"http://127.0.0.1:9090\"\ndeploy-window = [\"mon-fri 09:00-17:00\"]\nfreeze-period = [\"2026-12-24T00:00:00Z/2026-12-27T00:00:00Z\"]\n",
        )
        .unwrap();
        let c = Config::resolve(args(&["--config", file.to_str().unwrap()])).unwrap();
        assert_eq!(c.prometheus_url.as_deref(), Some("http://127.0.0.1:9090"));
        assert_eq!((c.calendar.windows.len(), c.calendar.freezes.len()), (1, 1));
        let errs = Config::resolve(args(&[
            "--data-dir",
            "/d",
            "--tls-dir",
            "/t",
            "--prometheus-url",
            "file:///etc/passwd",
            "--deploy-window",
            "someday 25:00-26:00",
            "--freeze-period",
            "soon/later",
        ]))
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].contains("prometheus-url"), "{errs:?}");
        assert!(errs[1].contains("deploy-window"), "{errs:?}");
        assert!(errs[2].contains("freeze"), "{errs:?}");
        let many: Vec<String> = (0..65).map(|_| "daily 00:00-01:00".to_owned()).collect();
        let mut list = vec!["--data-dir", "/d", "--tls-dir", "/t"];
        for w in &many {
            list.extend(["--deploy-window", w.as_str()]);
        }
        let errs = Config::resolve(args(&list)).unwrap_err().0;
        assert!(errs[0].contains("limit of 64"), "{errs:?}");
    }

    #[test]
    fn ha_flags_are_checked() {
        let base = ["--data-dir", "/d", "--tls-dir", "/t"];
        let with = |extra: &[&str]| {
            let list: Vec<&str> = base.iter().chain(extra).copied().collect();
            Config::resolve(args(&list))
        };
        let c = with(&[]).unwrap();
        assert_eq!((c.advertise_url, c.lease_ttl), (None, DEFAULT_LEASE_TTL));
        let errs = with(&["--advertise-url", "http://x:1", "--lease-ttl", "1s"])
            .unwrap_err()
            .0;
        assert!(errs[0].contains("must be an https:// URL"), "{errs:?}");
        assert!(errs[1].contains("lease-ttl 1s is out of range"), "{errs:?}");
        if cfg!(feature = "etcd") {
            // Nobody can reach 0.0.0.0: the leader's address must be told.
            let errs = with(&["--listen", "0.0.0.0:7443", "--store", "etcd://e:2379"])
                .unwrap_err()
                .0;
            assert!(errs[0].contains("pass --advertise-url"), "{errs:?}");
            let c = with(&[
                "--listen",
                "0.0.0.0:7443",
                "--store",
                "etcd://e:2379",
                "--advertise-url",
                "https://10.0.0.5:7443",
            ])
            .unwrap();
            assert_eq!(c.advertise_url.as_deref(), Some("https://10.0.0.5:7443"));
        }
    }

    #[test]
    fn http_endpoints_default_to_loopback_and_bad_ones_are_named() {
        let base = ["--data-dir", "/d", "--tls-dir", "/t"];
        let c = Config::resolve(args(&[&base[..], &["--http-listen", "7080"]].concat())).unwrap();
        assert_eq!(c.http_listen.unwrap().to_string(), "127.0.0.1:7080");
        assert_eq!(c.metrics_listen, None);
        let errs = Config::resolve(args(
            &[
                &base[..],
                &["--metrics-listen", "web:80", "--http-listen", "x"],
            ]
            .concat(),
        ))
        .unwrap_err()
        .0;
        assert!(
            errs[0].starts_with("metrics-listen: \"web:80\""),
            "{errs:?}"
        );
        assert!(errs[1].starts_with("http-listen: \"x\""), "{errs:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("batond.toml");
        std::fs::write(&file, "listen = \"nowhere\"\nagent-timeout = \"1ms\"\n").unwrap();
        let errs = Config::resolve(args(&["--config", file.to_str().unwrap()]))
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert!(errs[0].contains("\"nowhere\""));
        assert!(errs[1].contains("data directory"));
        assert!(errs[2].contains("TLS directory"));
        assert!(errs[3].contains("agent-timeout"));
    }

    #[test]
    fn unknown_keys_and_bad_durations_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("batond.toml");
        std::fs::write(
            &file,
            "data-dir = \"/d\"\ntls-dir = \"/t\"\nlisten_addr = \"x\"\n",
        )
        .unwrap();
        let errs = Config::resolve(args(&["--config", file.to_str().unwrap()]))
            .unwrap_err()
            .0;
        assert!(
            errs[0].contains("batond.toml") && errs[0].contains("listen_addr"),
            "{errs:?}"
        );
        std::fs::write(&file, "agent-timeout = \"soon\"\n").unwrap();
        let errs = Config::resolve(args(&["--config", file.to_str().unwrap()]))
            .unwrap_err()
            .0;
        assert!(errs[0].contains("agent-timeout"), "{errs:?}");
    }
}
