//! Talking to a balancer: HAProxy's runtime API (one command per
//! connection, over a unix socket or TCP) or the operator's commands. Each
//! exchange is bounded in time and in what is read back; errors say which
//! balancer, which server and what it answered (a short prefix).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Balancer, Traffic, expand_name};
use crate::text::prefix;

/// How long one runtime-API exchange may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one `exec` command may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes read back from the runtime API (`show stat` of one
/// backend: about 400 bytes a server).
pub const MAX_ANSWER_BYTES: u64 = 8 << 20;
/// The most bytes read from an `exec` command's output.
pub const MAX_EXEC_OUTPUT: u64 = 64 << 10;
/// How often a draining server's connections (and a returning server's
/// state) are asked for.
pub const POLL: Duration = Duration::from_millis(200);

/// One host's server in its balancer, names expanded.
#[derive(Debug, Clone)]
pub struct Server {
    traffic: Traffic,
    host: String,
    /// HAProxy: `BACKEND/SERVER`.
    name: Option<(String, String)>,
    /// It was in maintenance before the drain.
    maint: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections still open when `drain_timeout` ran out (cut by the
    /// swap).
    pub cut: u32,
    /// How long the drain took.
    pub waited: Duration,
}

impl Server {
    /// `host`'s server, its names expanded with `vars` (its labels; on an
    /// agent also its `--var`s).
    pub fn new(
        traffic: &Traffic,
        host: &str,
        vars: &BTreeMap<String, String>,
    ) -> Result<Self, String> {
        let name = match &traffic.balancer {
            Balancer::Haproxy {
                backend, server, ..
            } => Some((
                expand_name("backend", backend, host, vars)?,
                expand_name("server", server, host, vars)?,
            )),
            Balancer::Exec { .. } => None,
        };
        Ok(Self {
            traffic: traffic.clone(),
            host: host.to_owned(),
            name,
            maint: Default::default(),
        })
    }

    /// `web/h1` (HAProxy) or `h1` (exec), for messages.
    pub fn describe(&self) -> String {
        match &self.name {
            Some((b, s)) => format!("{b}/{s}"),
            None => self.host.clone(),
        }
    }

    /// Takes the server out, then waits until its connections reach zero
    /// or `drain_timeout` runs out (the connections left are counted in
    /// [`Drained::cut`]). A poll that fails is tried again until then. On
    /// an error the server is put back (a `set` that timed out may still
    /// have taken effect), and the error says whether that worked. An
    /// HAProxy server an operator had put in maintenance stays there
    /// ([`Self::ready`] restores it).
    pub async fn drain(&self) -> Result<Drained, String> {
        let began = Instant::now();
        let until = began + self.traffic.drain_timeout;
        if self.name.is_some() {
            match self.stat_row().await {
                Ok(row) if row.status.starts_with("MAINT") => {
                    self.maint.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) => return Err(format!("{e}; nothing was changed")),
            }
        }
        let result = async {
            self.set("drain").await?;
            loop {
                let open = match self.connections().await {
                    Ok(n) => Some(n),
                    Err(e) if Instant::now() >= until => return Err(e),
                    Err(_) => None,
                };
                if open == Some(0) {
                    return Ok(Drained {
                        cut: 0,
                        waited: began.elapsed(),
                    });
                }
                if let Some(open) = open
                    && Instant::now() >= until
                {
                    return Ok(Drained {
                        cut: open,
                        waited: began.elapsed(),
                    });
                }
                tokio::time::sleep(POLL.min(until.saturating_duration_since(Instant::now()))).await;
            }
        }
        .await;
        match result {
            Ok(d) => Ok(d),
            Err(e) => Err(match self.ready(None).await {
                Ok(()) => format!("{e}; the host was put back, nothing was swapped"),
                Err(back) => format!(
                    "{e}; nothing was swapped, and putting the host back failed too, it may still be drained: {back}"
                ),
            }),
        }
    }

    /// Puts the server back (an HAProxy server that was in maintenance
    /// before its drain goes back to maintenance); with `up_within`, then
    /// waits until the balancer reports it up (its own health check
    /// passed), at most that long. The `set` is tried for
    /// [`API_TIMEOUT`] × 3, a poll of the state until `up_within`.
    pub async fn ready(&self, up_within: Option<Duration>) -> Result<(), String> {
        let began = Instant::now();
        let set_until = began + API_TIMEOUT * 3;
        let maint = self.maint.load(std::sync::atomic::Ordering::Relaxed);
        let state = if maint { "maint" } else { "ready" };
        loop {
            match self.set(state).await {
                Ok(()) => break,
                Err(e) if Instant::now() >= set_until => return Err(e),
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
        let Some(within) = up_within.filter(|_| !maint) else {
            return Ok(());
        };
        let Some((backend, server)) = &self.name else {
            // An exec balancer says nothing about its servers' health.
            return Ok(());
        };
        let until = began + within;
        loop {
            let status = match self.stat_row().await {
                Ok(row) => row.status,
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => String::new(),
            };
            // "UP", or "UP 1/3" (up, a check failed lately); "no check":
            // the balancer does not check it.
            if status.starts_with("UP") || status == "no check" {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "HAProxy did not report {backend}/{server} up within {} of its return (its status is {})",
                    humantime::format_duration(within),
                    crate::text::quote(&status)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The server's open connections: HAProxy's current sessions plus its
    /// queue, or the number the `connections` command prints.
    pub async fn connections(&self) -> Result<u32, String> {
        match &self.traffic.balancer {
            Balancer::Haproxy { .. } => {
                let row = self.stat_row().await?;
                Ok(row.scur.saturating_add(row.qcur))
            }
            Balancer::Exec { connections, .. } => {
                let out = self.exec("connections", connections).await?;
                out.trim().parse::<u32>().map_err(|_| {
                    format!(
                        "the connections command for host {} printed {}, not a number",
                        self.host,
                        crate::text::quote(out.trim())
                    )
                })
            }
        }
    }

    async fn set(&self, state: &str) -> Result<(), String> {
        match (&self.traffic.balancer, &self.name) {
            (Balancer::Haproxy { .. }, Some((backend, server))) => {
                let answer = self
                    .ask(&format!("set server {backend}/{server} state {state}"))
                    .await?;
                let answer = answer.trim();
                if answer.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "HAProxy refused to set {backend}/{server} to {state}: {}",
                        crate::text::quote(answer)
                    ))
                }
            }
            (Balancer::Exec { drain, ready, .. }, _) => {
                let argv = if state == "drain" { drain } else { ready };
                self.exec(state, argv).await.map(drop)
            }
            (Balancer::Haproxy { .. }, None) => Err("no server name".into()),
        }
    }

    async fn stat_row(&self) -> Result<StatRow, String> {
        let Some((backend, server)) = &self.name else {
            return Err("no server name".into());
        };
        // Type 4: the backend's servers only.
        let answer = self.ask(&format!("show stat {backend} 4 -1")).await?;
        parse_stat(&answer, backend, server).ok_or_else(|| {
            format!(
                "HAProxy has no server {backend}/{server} (its answer to show stat: {})",
                crate::text::quote(answer.trim())
            )
        })
    }

    /// One runtime-API command and its whole answer.
    async fn ask(&self, command: &str) -> Result<String, String> {
        let Balancer::Haproxy { socket, .. } = &self.traffic.balancer else {
            return Err("not an HAProxy balancer".into());
        };
        let exchange = async {
            let line = format!("{command}\n");
            let mut answer = Vec::new();
            if let Some(addr) = socket.strip_prefix("tcp://") {
                let mut s = tokio::net::TcpStream::connect(addr).await?;
                s.write_all(line.as_bytes()).await?;
                (&mut s)
                    .take(MAX_ANSWER_BYTES)
                    .read_to_end(&mut answer)
                    .await?;
            } else {
                let mut s = tokio::net::UnixStream::connect(socket).await?;
                s.write_all(line.as_bytes()).await?;
                (&mut s)
                    .take(MAX_ANSWER_BYTES)
                    .read_to_end(&mut answer)
                    .await?;
            }
            Ok::<_, std::io::Error>(answer)
        };
        match tokio::time::timeout(API_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(String::from_utf8_lossy(&answer).into_owned()),
            Ok(Err(e)) => Err(format!(
                "cannot reach HAProxy's runtime API at {socket} for {}: {e}",
                self.describe()
            )),
            Err(_) => Err(format!(
                "HAProxy's runtime API at {socket} did not answer within {} for {}",
                humantime::format_duration(API_TIMEOUT),
                self.describe()
            )),
        }
    }

    /// Runs one of the operator's commands with the host id appended;
    /// its standard output (at most [`MAX_EXEC_OUTPUT`]).
    async fn exec(&self, what: &str, argv: &[String]) -> Result<String, String> {
        let Some((program, args)) = argv.split_first() else {
            return Err(format!("the {what} command is empty"));
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .arg(&self.host)
            .env("BATON_HOST_ID", &self.host)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot run the {what} command {} for host {}: {e}",
                crate::text::quote(program),
                self.host
            )
        })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(format!("the {what} command has no output pipes"));
        };
        let run = async {
            let mut out = Vec::new();
            let mut err = Vec::new();
            let (mut stdout, mut stderr) =
                (stdout.take(MAX_EXEC_OUTPUT), stderr.take(MAX_EXEC_OUTPUT));
            let (o, e, status) = tokio::join!(
                stdout.read_to_end(&mut out),
                stderr.read_to_end(&mut err),
                child.wait()
            );
            o?;
            e?;
            Ok::<_, std::io::Error>((status?, out, err))
        };
        let (status, out, err) = match tokio::time::timeout(EXEC_TIMEOUT, run).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                return Err(format!(
                    "the {what} command for host {} failed: {e}",
                    self.host
                ));
            }
            Err(_) => {
                return Err(format!(
                    "the {what} command for host {} did not finish within {}",
                    self.host,
                    humantime::format_duration(EXEC_TIMEOUT)
                ));
            }
        };
        if !status.success() {
            return Err(format!(
                "the {what} command for host {} {}: {}",
                self.host,
                status,
                crate::text::quote(String::from_utf8_lossy(&err).trim())
            ));
        }
        Ok(prefix(&String::from_utf8_lossy(&out), 4096))
    }
}

/// The columns of a `show stat` row that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatRow {
    scur: u32,
    qcur: u32,
    status: String,
}

/// The row of `server` in `show stat` CSV output (its header line names
/// the columns: `# pxname,svname,qcur,…`).
fn parse_stat(csv: &str, backend: &str, server: &str) -> Option<StatRow> {
    let mut lines = csv.lines();
    let header = lines.next()?.strip_prefix("# ")?;
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (px, sv, scur, qcur, status) = (
        col("pxname")?,
        col("svname")?,
        col("scur")?,
        col("qcur")?,
        col("status")?,
    );
    lines.find_map(|line| {
        let fields: Vec<&str> = line.split(',').collect();
        if fields.get(sv) != Some(&server) || fields.get(px) != Some(&backend) {
            return None;
        }
        let num = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0)
        };
        Some(StatRow {
            scur: num(scur),
            qcur: num(qcur),
            status: fields.get(status)?.to_string(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_row_is_found_by_its_header() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,status,weight\n\
                   web,h1,0,0,3,5,DRAIN,0\n\
                   web,h2,1,0,2,5,UP,1\n\n";
        assert_eq!(
            parse_stat(csv, "web", "h1"),
            Some(StatRow {
                scur: 3,
                qcur: 0,
                status: "DRAIN".into()
            })
        );
        assert_eq!(parse_stat(csv, "web", "h2").unwrap().qcur, 1);
        assert_eq!(parse_stat(csv, "web", "h3"), None);
        // Another backend's server of the same name is not it.
        assert_eq!(parse_stat(csv, "api", "h1"), None);
        assert_eq!(parse_stat("Unknown command.\n", "web", "h1"), None);
        assert_eq!(parse_stat("", "web", "h1"), None);
        assert_eq!(parse_stat("# svname\nh1\n", "web", "h1"), None);
    }

    /// Shell snippets as commands (`$1` is the host id); not script files,
    /// which another test's fork could hold open for writing (ETXTBSY).
    fn exec_traffic(_dir: &std::path::Path, drain: &str, ready: &str, conns: &str) -> Traffic {
        let script =
            |_name: &str, body: &str| ["/bin/sh", "-c", body, "sh"].map(String::from).to_vec();
        Traffic {
            balancer: Balancer::Exec {
                drain: script("drain", drain),
                ready: script("ready", ready),
                connections: script("conns", conns),
            },
            drain_timeout: Duration::from_secs(2),
            run_on: super::super::RunOn::Agent,
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "baton-balancer-{name}-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn exec_commands_drain_wait_for_connections_and_return_the_host() {
        let dir = temp_dir("ok");
        let log = dir.join("log");
        // Two polls see connections, then none.
        let t = exec_traffic(
            &dir,
            &format!("echo \"drain $1 $BATON_HOST_ID\" >> {}", log.display()),
            &format!("echo \"ready $1\" >> {}", log.display()),
            &format!(
                "n=$(cat {d}/n 2>/dev/null || echo 2); echo $((n-1)) > {d}/n; echo $n",
                d = dir.display()
            ),
        );
        let server = Server::new(&t, "h1", &BTreeMap::new()).unwrap();
        let drained = server.drain().await.unwrap();
        assert_eq!(drained.cut, 0);
        server.ready(Some(Duration::from_secs(1))).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "drain h1 h1\nready h1\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn connections_left_at_drain_timeout_are_counted_and_failures_are_precise() {
        let dir = temp_dir("cut");
        let t = exec_traffic(&dir, "true", "echo 'lb is down' >&2; exit 3", "echo 7");
        let server = Server::new(&t, "h1", &BTreeMap::new()).unwrap();
        let drained = server.drain().await.unwrap();
        assert_eq!(drained.cut, 7);
        assert!(drained.waited >= Duration::from_secs(2));
        let e = server.ready(None).await.unwrap_err();
        assert!(
            e.contains("the ready command for host h1") && e.contains("lb is down"),
            "{e}"
        );
        let t = exec_traffic(&dir, "true", "true", "echo many");
        let e = Server::new(&t, "h1", &BTreeMap::new())
            .unwrap()
            .drain()
            .await
            .unwrap_err();
        assert!(e.contains("printed \"many\", not a number"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn an_haproxy_socket_that_is_not_there_is_a_precise_error() {
        let t = Traffic {
            balancer: Balancer::Haproxy {
                socket: "/nonexistent/admin.sock".into(),
                backend: "web".into(),
                server: "${BATON_HOST_ID}".into(),
            },
            drain_timeout: Duration::from_secs(1),
            run_on: super::super::RunOn::Coordinator,
        };
        let e = Server::new(&t, "h1", &BTreeMap::new())
            .unwrap()
            .drain()
            .await
            .unwrap_err();
        assert!(
            e.contains("cannot reach HAProxy's runtime API at /nonexistent/admin.sock for web/h1"),
            "{e}"
        );
    }
}
