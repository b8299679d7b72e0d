//! `wrk` under a scenario: started before it, stopped with SIGINT after
//! it, its report parsed (requests, socket errors, non-2xx answers,
//! latency).

use std::process::Command;
use std::time::Duration;

/// What one wrk run reported.
#[derive(Debug, Default, Clone)]
pub struct Wrk {
    pub requests: u64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub seconds: f64,
}

/// `12.3us` / `4.5ms` / `1.2s` → milliseconds.
fn wrk_ms(v: &str) -> f64 {
    let num = |s: &str| s.parse::<f64>().unwrap_or(f64::NAN);
    if let Some(x) = v.strip_suffix("us") {
        num(x) / 1000.0
    } else if let Some(x) = v.strip_suffix("ms") {
        num(x)
    } else if let Some(x) = v.strip_suffix('m') {
        num(x) * 60_000.0
    } else if let Some(x) = v.strip_suffix('s') {
        num(x) * 1000.0
    } else {
        f64::NAN
    }
}

pub fn parse_wrk(out: &str) -> Wrk {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => w.max_ms = wrk_ms(max),
            ["50%", v] => w.p50_ms = wrk_ms(v),
            ["99%", v] => w.p99_ms = wrk_ms(v),
            [n, "requests", "in", secs, ..] => {
                w.requests = n.parse().unwrap_or(0);
                w.seconds = wrk_ms(secs.trim_end_matches(',')) / 1000.0;
            }
            ["Socket", "errors:", rest @ ..] => {
                w.socket_errors = rest
                    .iter()
                    .filter_map(|x| x.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => w.non_2xx = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    w
}

/// Runs wrk against `addr` until `during` returns, then stops it with
/// SIGINT (wrk then prints its report).
pub fn wrk_while(addr: std::net::SocketAddr, during: impl FnOnce()) -> Wrk {
    wrk_on_while(addr, "/", during)
}

/// [`wrk_while`] asking for `path` (e.g. `/slow?ms=20`: requests that are
/// in flight for a while, as real ones are).
pub fn wrk_on_while(addr: std::net::SocketAddr, path: &str, during: impl FnOnce()) -> Wrk {
    let child = Command::new("wrk")
        .args(["-t2", "-c16", "-d600s", "--latency", "--timeout", "5s"])
        .arg(format!("http://{addr}{path}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cannot run wrk");
    // Killed if `during` panics, rather than left loading the machine.
    let mut guard = KillOnDrop(Some(child));
    // wrk connects before the upgrades start; its figures include these
    // 300 ms of plain load too (a test asserts on counts, not on rates).
    std::thread::sleep(Duration::from_millis(300));
    during();
    let child = guard.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    parse_wrk(&String::from_utf8_lossy(&out.stdout))
}

/// A child process killed (and reaped) when this is dropped.
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
