//! Bad configuration exits with code 2 and a sentence naming the problem,
//! before anything is served.

use std::process::Command;

use baton_tests::{TestEnv, bin};

fn run(name: &str, args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let out = Command::new(bin(name)).args(args).output().unwrap();
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (out.status.code(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn a_malformed_config_file_exits_2_naming_the_problem() {
    let env = TestEnv::new(&[]);
    let file = env.path("batond.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\ndata-dir = \"d\"\ntls-dir = \"t\"\nagent-timeout = \"twelve\"\n",
    )
    .unwrap();
    let (code, err) = run("batond", &["--config".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("batond.toml") && err.contains("agent-timeout"),
        "{err}"
    );

    std::fs::write(&file, "listen = [unclosed\n").unwrap();
    let (code, err) = run("batond", &["--config".as_ref(), file.as_os_str()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 1"), "{err}");

    let agent_file = env.path("agent.toml");
    std::fs::write(
        &agent_file,
        "coordinator = \"https://127.0.0.1:1\"\nhost-id = \"h1\"\nlables = {}\n",
    )
    .unwrap();
    let (code, err) = run(
        "baton-agent",
        &["--config".as_ref(), agent_file.as_os_str()],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("agent.toml") && err.contains("lables"),
        "{err}"
    );
}

#[test]
fn a_missing_certificate_exits_2_naming_the_file() {
    let env = TestEnv::new(&["h1"]);
    std::fs::remove_file(env.path("tls/coordinator-key.pem")).unwrap();
    let (code, err) = run(
        "batond",
        &[
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data-dir".as_ref(),
            env.path("d").as_os_str(),
            "--tls-dir".as_ref(),
            env.tls().as_os_str(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("coordinator-key.pem"), "{err}");
    assert!(
        !env.path("d").exists(),
        "nothing is created before the configuration is whole"
    );

    let (code, err) = run(
        "baton-agent",
        &[
            "--coordinator".as_ref(),
            "https://127.0.0.1:1".as_ref(),
            "--host-id".as_ref(),
            "h2".as_ref(),
            "--data-dir".as_ref(),
            env.path("a").as_os_str(),
            "--tls-dir".as_ref(),
            env.tls().as_os_str(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("agent-h2.pem"), "{err}");
    assert!(!env.path("a").exists());
}

#[test]
fn an_agent_creates_its_data_dir_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = TestEnv::new(&["h1"]);
    let mut agent = baton_tests::start_agent(
        &env,
        "https://127.0.0.1:1",
        baton_tests::AgentOpts::new("h1"),
    );
    let dir = env.path("agent-h1");
    let mode = baton_tests::wait_until("the agent's data dir", baton_tests::SOON, || {
        std::fs::metadata(&dir)
            .ok()
            .map(|m| m.permissions().mode() & 0o777)
    });
    assert_eq!(mode, 0o700);
    // With no coordinator to reach it keeps retrying, and stops cleanly.
    baton_tests::wait_until("a failed connection attempt", baton_tests::SOON, || {
        agent
            .log_text()
            .contains("no stream to the coordinator")
            .then_some(())
    });
    assert!(agent.terminate().success());
}

#[test]
fn an_agent_refuses_a_bad_release_key_and_too_few_kept_releases() {
    let env = TestEnv::new(&["h1"]);
    let key = env.path("garbled.pub");
    std::fs::write(&key, "not a key\n").unwrap();
    let data = env.path("agent-h1");
    let (code, err) = run(
        "baton-agent",
        &[
            "--coordinator".as_ref(),
            "https://127.0.0.1:1".as_ref(),
            "--host-id".as_ref(),
            "h1".as_ref(),
            "--data-dir".as_ref(),
            data.as_os_str(),
            "--tls-dir".as_ref(),
            env.tls().as_os_str(),
            "--trusted-key".as_ref(),
            key.as_os_str(),
            "--keep-releases".as_ref(),
            "1".as_ref(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("garbled.pub"), "{err}");
    assert!(err.contains("keep-releases 1 is too small"), "{err}");
    assert!(
        !data.exists(),
        "a refused configuration created {}",
        data.display()
    );
}

#[test]
fn a_bad_store_url_exits_2() {
    let env = TestEnv::new(&[]);
    let with_store = |store: &str| {
        run(
            "batond",
            &[
                "--data-dir".as_ref(),
                env.path("d").as_os_str(),
                "--tls-dir".as_ref(),
                env.tls().as_os_str(),
                "--store".as_ref(),
                store.as_ref(),
            ],
        )
    };
    let (code, err) = with_store("zookeeper://127.0.0.1:2181");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("neither \"embedded\" nor etcd://HOST:PORT"),
        "{err}"
    );
    let (code, err) = with_store("etcd://127.0.0.1");
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("endpoint \"127.0.0.1\" is not HOST:PORT"),
        "{err}"
    );
}

#[test]
fn baton_exit_codes_tell_a_usage_error_from_an_unreachable_coordinator() {
    let env = TestEnv::new(&[]);
    // Nothing listens on a port just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let out = env.baton(&url, &env.tls(), &["hosts"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach"),
        "{out:?}"
    );
    // A bad flag, and a TLS directory without certificates: usage errors.
    let out = env.baton(&url, &env.tls(), &["hosts", "--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let empty = env.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = env.baton(&url, &empty, &["hosts"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn every_program_names_its_version_and_commit() {
    for name in ["baton", "batond", "baton-agent"] {
        let out = Command::new(bin(name)).arg("--version").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let expected = format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&expected), "{text}");
        let commit = text
            .trim_end()
            .trim_end_matches(')')
            .rsplit(' ')
            .next()
            .unwrap();
        assert!(
            commit == "unknown"
                || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
            "{text}"
        );
    }
}

#[test]
fn each_program_opens_its_help_with_its_own_headline() {
    let first_line = |name: &str| {
        let out = Command::new(bin(name)).arg("--help").output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    let lines: Vec<String> = ["baton", "batond", "baton-agent"]
        .iter()
        .map(|n| first_line(n))
        .collect();
    for (name, line) in ["baton:", "batond:", "baton-agent:"].iter().zip(&lines) {
        assert!(line.starts_with(name), "{line}");
    }
    assert!(lines[0] != lines[1] && lines[1] != lines[2], "{lines:?}");
}
