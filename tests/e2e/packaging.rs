//! The packaged units let the daemons write everything they write. The
//! paths come from the code: the units' `ExecStart` parsed by the daemons'
//! own flag parsers, `batond.toml` as `batond` resolves it, the defaults of
//! `baton-agent enroll` (which writes the agent's config) and the agent's
//! own layout of releases and run directories. The sandbox is read from
//! the unit files with systemd's rules for `ProtectSystem=`,
//! `ReadWritePaths=` and `StateDirectory=`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// A unit file's `[Service]` keys, each with every value it was given.
fn service_section(unit: &str) -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(packaging().join("systemd").join(unit)).unwrap();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut in_service = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if !in_service || line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap();
        out.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    out
}

/// What a unit's sandbox lets its process write, by systemd's rules.
struct Sandbox {
    protect_system: String,
    writable: Vec<PathBuf>,
    user: Option<String>,
}

impl Sandbox {
    fn of(unit: &str) -> Self {
        let s = service_section(unit);
        let one = |k: &str| s.get(k).and_then(|v| v.last()).cloned();
        let many = |k: &str| -> Vec<String> {
            s.get(k)
                .into_iter()
                .flatten()
                .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .collect()
        };
        let mut writable: Vec<PathBuf> = many("ReadWritePaths")
            .into_iter()
            .map(|p| PathBuf::from(p.trim_start_matches(['-', '+'])))
            .collect();
        for (key, base) in [
            ("StateDirectory", "/var/lib"),
            ("RuntimeDirectory", "/run"),
            ("CacheDirectory", "/var/cache"),
            ("LogsDirectory", "/var/log"),
        ] {
            writable.extend(many(key).into_iter().map(|d| Path::new(base).join(d)));
        }
        Self {
            protect_system: one("ProtectSystem").unwrap_or_else(|| "no".into()),
            writable,
            user: one("User"),
        }
    }

    /// Whether the process may write `path` (and below it).
    fn allows(&self, path: &Path) -> bool {
        if self.writable.iter().any(|w| path.starts_with(w)) {
            return true;
        }
        let read_only: &[&str] = match self.protect_system.as_str() {
            "strict" => &["/"],
            "full" => &["/usr", "/boot", "/efi", "/etc"],
            "yes" | "true" => &["/usr", "/boot", "/efi"],
            _ => &[],
        };
        !read_only.iter().any(|r| path.starts_with(r))
    }

    fn check(&self, unit: &str, what: &str, path: &Path) {
        assert!(
            self.allows(path),
            "{unit} cannot write {what} at {}: ProtectSystem={} with writable {:?}",
            path.display(),
            self.protect_system,
            self.writable
        );
    }
}

/// The arguments of a unit's `ExecStart`, the program first.
fn exec_start(unit: &str) -> Vec<String> {
    let s = service_section(unit);
    s["ExecStart"][0]
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// `path` under /etc/baton as it sits in the source tree.
fn installed_config(path: &str) -> PathBuf {
    let name = Path::new(path).file_name().unwrap();
    packaging().join("etc").join(name)
}

#[test]
fn batond_writes_only_where_its_unit_lets_it() {
    let unit = "batond.service";
    let mut argv = exec_start(unit);
    assert_eq!(argv[0], "/usr/bin/batond");
    // The installed config is the packaged one.
    let at = argv.iter().position(|a| a == "--config").unwrap() + 1;
    assert_eq!(argv[at], "/etc/baton/batond.toml");
    argv[at] = installed_config(&argv[at]).display().to_string();
    let args = baton_coordinator::config::BatondArgs::try_parse_from(&argv).unwrap();
    let config = baton_coordinator::config::Config::resolve(args)
        .unwrap_or_else(|e| panic!("the packaged batond.toml does not resolve: {:?}", e.0));
    let sandbox = Sandbox::of(unit);
    // The store, artifacts and everything else batond keeps.
    sandbox.check(unit, "its data directory", &config.data_dir);
    sandbox.check(unit, "its store", &config.data_dir.join("baton.redb"));
    assert_eq!(sandbox.protect_system, "strict");
    // It reads its TLS directory and never needs to write it.
    assert!(config.tls_dir.starts_with("/etc/baton"));

    // The user it runs as is created by the package.
    let user = sandbox.user.expect("batond runs as its own user");
    let sysusers =
        std::fs::read_to_string(packaging().join("systemd/sysusers.d/baton.conf")).unwrap();
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user.as_str()])),
        "sysusers.d/baton.conf creates no user {user}"
    );
    // Its state directory exists, owned by that user, before it starts.
    let tmpfiles =
        std::fs::read_to_string(packaging().join("systemd/tmpfiles.d/baton.conf")).unwrap();
    let line = format!("{} ", config.data_dir.display());
    assert!(
        tmpfiles
            .lines()
            .any(|l| l.contains(&line) && l.contains(&user)),
        "{tmpfiles}"
    );
}

#[test]
fn the_agent_writes_only_where_its_unit_lets_it_enrolled_or_set_up_by_hand() {
    let unit = "baton-agent.service";
    let argv = exec_start(unit);
    assert_eq!(argv[0], "/usr/bin/baton-agent");
    let run = baton_agent::AgentArgs::try_parse_from(&argv).unwrap();
    // `baton-agent enroll` with its defaults writes the config this unit
    // reads, naming the data and TLS directories the agent then uses.
    let enroll = baton_agent::AgentArgs::try_parse_from([
        "baton-agent",
        "enroll",
        "--coordinator",
        "https://coord.example:7443",
        "--token",
        "bt1-x",
    ])
    .unwrap();
    let Some(baton_agent::config::AgentCommand::Enroll(join)) = enroll.command else {
        panic!("baton-agent enroll parses as the enroll command");
    };
    assert_eq!(run.config.as_deref(), Some(join.config.as_path()));
    let tls_dir = join
        .tls_dir
        .clone()
        .unwrap_or_else(|| join.data_dir.join("tls"));
    let sandbox = Sandbox::of(unit);
    let host: baton_common::host::HostId = "web-1".try_into().unwrap();
    // Renewal writes the certificate and key beside their `.new` files.
    for file in [
        format!("agent-{host}.pem"),
        format!("agent-{host}-key.pem.new"),
    ] {
        sandbox.check(unit, "a renewed certificate", &tls_dir.join(file));
    }
    // Releases, run directories (process records, logs), the journal and
    // the pid file: all in the data directory.
    let releases = baton_agent::releases::Releases::new(&join.data_dir);
    sandbox.check(
        unit,
        "a release's run directory",
        &releases.run_dir("api", "1.2.0"),
    );
    sandbox.check(unit, "the pid file", &join.data_dir.join("agent.pid"));
    // Hosts set up by hand before `enroll` kept their certificates in
    // /etc/baton/tls: renewal must still work there.
    sandbox.check(
        unit,
        "a renewed certificate",
        Path::new("/etc/baton/tls/agent-web-1.pem"),
    );
    // And the sandbox is real: /usr and the rest of /etc stay read-only.
    assert!(!sandbox.allows(Path::new("/etc/passwd")));
    assert!(!sandbox.allows(Path::new("/usr/bin/x")));
    // The state directory exists before `enroll` runs.
    let tmpfiles =
        std::fs::read_to_string(packaging().join("systemd/tmpfiles.d/baton-agent.conf")).unwrap();
    assert!(
        tmpfiles.contains(&format!("{} ", join.data_dir.display())),
        "{tmpfiles}"
    );
}

#[test]
fn the_example_configs_use_only_keys_the_daemons_read() {
    for (file, keys) in [
        ("batond.toml", baton_coordinator::config::file_keys()),
        ("agent.toml.example", baton_agent::config::file_keys()),
    ] {
        assert!(!keys.is_empty());
        let text = std::fs::read_to_string(packaging().join("etc").join(file)).unwrap();
        // Every key, set or commented out, as `key = value`.
        for line in text.lines() {
            let line = line.trim_start_matches('#').trim();
            let Some((key, _)) = line.split_once(" = ") else {
                continue;
            };
            if key.contains(' ') || line.starts_with('[') {
                continue;
            }
            // Keys inside [labels] and [vars] are the operator's own.
            let table_key = ["role", "zone", "port"].contains(&key);
            assert!(
                table_key || keys.iter().any(|k| k == key),
                "{file}: `{key}` is not a key the daemon reads ({keys:?})"
            );
        }
        // And every key the daemon reads is shown.
        for key in &keys {
            assert!(
                text.contains(&format!("{key} =")) || text.contains(&format!("[{key}]")),
                "{file} does not show `{key}`"
            );
        }
    }
}
