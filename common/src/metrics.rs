//! Prometheus metrics: counters and histograms from prometheus-client,
//! written out in the OpenMetrics text format by [`Exposition`] (which
//! builds a prometheus-client registry of what one scrape shows: the
//! daemons' counters, and gauges computed at the scrape), and served over
//! plain HTTP by [`serve`].
//!
//! Names follow Prometheus conventions: a `baton_` prefix, `_total` for
//! counters, `_seconds` for durations, base units only.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter as PCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge as PGauge;
use prometheus_client::metrics::histogram::Histogram as PHistogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Bucket bounds (seconds) for activations and health waits: from a
/// fast restart to the default health deadline and beyond.
pub const DURATION_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// A monotonically increasing count.
#[derive(Debug, Default, Clone)]
pub struct Counter(PCounter);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.inc();
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.inc_by(n);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// Counters told apart by the values of their labels (the names are
/// given when written out).
#[derive(Debug, Default)]
pub struct CounterVec(Mutex<BTreeMap<Vec<String>, u64>>);

impl CounterVec {
    /// A family whose listed label values show as 0 before they happen
    /// (so a rate over them exists from the first scrape).
    pub fn with_values(values: &[&[&str]]) -> Self {
        Self(Mutex::new(
            values
                .iter()
                .map(|v| (v.iter().map(|s| (*s).to_owned()).collect(), 0))
                .collect(),
        ))
    }

    /// Adds one to the counter of these label values.
    pub fn inc(&self, values: &[&str]) {
        self.inc_by(values, 1);
    }

    /// Adds `n` to the counter of these label values.
    pub fn inc_by(&self, values: &[&str], n: u64) {
        let key: Vec<String> = values.iter().map(|s| (*s).to_owned()).collect();
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = map.entry(key).or_default();
        *count = count.saturating_add(n);
    }

    /// Every combination of label values and its count, in label order.
    pub fn values(&self) -> Vec<(Vec<String>, u64)> {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// A distribution of durations over fixed buckets.
#[derive(Debug, Clone)]
pub struct Histogram(PHistogram);

impl Histogram {
    /// An empty histogram over `bounds` (ascending, in seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Self(PHistogram::new(bounds.iter().copied()))
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        self.0.observe(d.as_secs_f64());
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new(DURATION_BUCKETS)
    }
}

/// A float gauge, as prometheus-client keeps one.
type FGauge = PGauge<f64, AtomicU64>;
/// Label pairs.
type Labels = Vec<(String, String)>;

/// What one scrape shows, being put together: a prometheus-client
/// registry, written out by [`Exposition::finish`].
#[derive(Debug, Default)]
pub struct Exposition(Registry);

/// prometheus-client adds the period to help texts, and `_total` to
/// counters' names.
fn help(text: &str) -> String {
    text.trim_end_matches('.').to_owned()
}

fn counter_name(name: &str) -> &str {
    name.strip_suffix("_total").unwrap_or(name)
}

fn labels(names: &[&str], values: &[String]) -> Labels {
    names
        .iter()
        .zip(values)
        .map(|(n, v)| ((*n).to_owned(), v.clone()))
        .collect()
}

impl Exposition {
    /// A gauge without labels.
    pub fn gauge(&mut self, name: &str, help_text: &str, value: f64) {
        let g = FGauge::default();
        g.set(value);
        self.0.register(name, help(help_text), g);
    }

    /// A gauge with one label, one sample per value.
    pub fn gauge_vec(
        &mut self,
        name: &str,
        help_text: &str,
        label: &str,
        samples: &[(String, f64)],
    ) {
        let family = Family::<Labels, FGauge>::default();
        for (v, n) in samples {
            family
                .get_or_create(&vec![(label.to_owned(), v.clone())])
                .set(*n);
        }
        self.0.register(name, help(help_text), family);
    }

    /// A gauge family with several labels: one sample per label values.
    pub fn gauge_family(
        &mut self,
        name: &str,
        help_text: &str,
        label_names: &[&str],
        samples: &[(Vec<String>, f64)],
    ) {
        let family = Family::<Labels, FGauge>::default();
        for (values, n) in samples {
            family.get_or_create(&labels(label_names, values)).set(*n);
        }
        self.0.register(name, help(help_text), family);
    }

    /// A counter without labels.
    pub fn counter(&mut self, name: &str, help_text: &str, c: &Counter) {
        self.0
            .register(counter_name(name), help(help_text), c.0.clone());
    }

    /// A counter family; `label_names` names the label values in order.
    pub fn counter_vec(
        &mut self,
        name: &str,
        help_text: &str,
        label_names: &[&str],
        c: &CounterVec,
    ) {
        let family = Family::<Labels, PCounter>::default();
        for (values, n) in c.values() {
            family
                .get_or_create(&labels(label_names, &values))
                .inc_by(n);
        }
        self.0.register(counter_name(name), help(help_text), family);
    }

    /// A histogram: cumulative buckets, sum and count.
    pub fn histogram(&mut self, name: &str, help_text: &str, h: &Histogram) {
        self.0.register(name, help(help_text), h.0.clone());
    }

    /// `baton_build_info{program, version, commit} 1`: which build answers.
    pub fn build_info(&mut self, program: &str) {
        self.gauge_family(
            "baton_build_info",
            "The build of this program: always 1, its version and commit in the labels.",
            &["program", "version", "commit"],
            &[(
                vec![
                    program.to_owned(),
                    crate::VERSION.to_owned(),
                    crate::COMMIT.to_owned(),
                ],
                1.0,
            )],
        );
    }

    /// The process metrics Prometheus client libraries export, read from
    /// `/proc/self`: CPU seconds, resident and virtual memory, open and
    /// allowed file descriptors, start time. What cannot be read is left
    /// out.
    pub fn process(&mut self) {
        let p = ProcessStats::read();
        if let Some(cpu) = p.cpu_seconds {
            let c = PCounter::<f64, AtomicU64>::default();
            c.inc_by(cpu);
            self.0.register(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                c,
            );
        }
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                p.resident_bytes.map(|v| v as f64),
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                p.virtual_bytes.map(|v| v as f64),
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                p.open_fds.map(|v| v as f64),
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                p.max_fds.map(|v| v as f64),
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                p.start_time_seconds,
            ),
        ];
        for (name, text, value) in gauges {
            if let Some(v) = value {
                self.gauge(name, text, v);
            }
        }
    }

    /// The document (OpenMetrics text, ending with `# EOF`).
    pub fn finish(self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.0);
        out
    }
}

/// This process's resource use, from `/proc/self` (Linux).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time.
    pub cpu_seconds: Option<f64>,
    /// Resident memory.
    pub resident_bytes: Option<u64>,
    /// Virtual memory.
    pub virtual_bytes: Option<u64>,
    /// Open file descriptors.
    pub open_fds: Option<u64>,
    /// The soft limit on open file descriptors.
    pub max_fds: Option<u64>,
    /// When the process started, in Unix seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self/stat`, `/proc/self/fd`, `/proc/self/limits` and
    /// `/proc/stat`'s boot time.
    pub fn read() -> Self {
        // Clock ticks and page size: the values every Linux uses for
        // /proc accounting (USER_HZ is 100; pages are 4 KiB on the
        // platforms Baton ships for).
        const TICKS: f64 = 100.0;
        const PAGE: u64 = 4096;
        let mut out = Self::default();
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command (which may hold spaces) in parens.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // f[0] is field 3 (state): field N is f[N - 3].
                let num = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
                if let (Some(u), Some(s)) = (num(14), num(15)) {
                    out.cpu_seconds = Some((u + s) as f64 / TICKS);
                }
                out.virtual_bytes = num(23);
                out.resident_bytes = num(24).map(|p| p * PAGE);
                let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("btime "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                });
                if let (Some(start), Some(boot)) = (num(22), boot) {
                    out.start_time_seconds = Some(boot as f64 + start as f64 / TICKS);
                }
            }
        }
        out.open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        out.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3))
                    .and_then(|v| v.parse().ok())
            });
        out
    }
}

/// Parses the address of an HTTP endpoint: `IP:PORT`, or a port alone for
/// loopback (`9100` is `127.0.0.1:9100`): what is not told otherwise stays
/// on this machine.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse::<SocketAddr>().map_err(|_| {
        format!("{text:?} is neither IP:PORT nor a port (for example 127.0.0.1:9100 or 9100)")
    })
}

/// Serves `GET /metrics` (anything else is 404) on `listener` until
/// `shutdown`, rendering the document afresh for every scrape.
///
/// A scrape endpoint needs one request per connection and no more, so
/// this is a small HTTP/1.1 responder of its own (`Connection: close`)
/// rather than a web framework: the agent serves it too, and must stay
/// small in memory.
pub async fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    render: F,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors, a connection reset before accept: the
                // next one may work.
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tasks.spawn(async move {
            // A client that says nothing is not waited for.
            let answered = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, render)).await;
            if let Ok(Err(e)) = answered {
                tracing::debug!(error = %e, "metrics: a scrape failed");
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, tasks.wait()).await;
    Ok(())
}

/// How long one scrape may take, from connect to the last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;

async fn answer<F, Fut>(mut stream: tokio::net::TcpStream, render: F) -> std::io::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "",
            )
            .await;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            let body = render().await;
            let body = if method == "HEAD" {
                String::new()
            } else {
                body
            };
            respond(&mut stream, "200 OK", CONTENT_TYPE, &body).await
        }
        ("GET" | "HEAD", _) => {
            respond(
                &mut stream,
                "404 Not Found",
                "text/plain",
                "metrics are at /metrics\n",
            )
            .await
        }
        _ => respond(&mut stream, "405 Method Not Allowed", "text/plain", "").await,
    }?;
    stream.shutdown().await
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await
}

/// The value of one sample in a scraped document (`name` with its labels
/// exactly as written, e.g. `baton_hosts_connected` or
/// `baton_rollouts{state="succeeded"}`), for tests and tools.
pub fn sample(document: &str, name: &str) -> Option<f64> {
    document
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_endpoint_answers_a_scrape_and_nothing_else() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            || async { "baton_x 1\n".to_owned() },
            stop.clone(),
        ));
        let ask = |request: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains(CONTENT_TYPE) && ok.ends_with("\r\n\r\nbaton_x 1\n"),
            "{ok}"
        );
        let missing = ask("GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = ask("POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    #[test]
    fn a_port_alone_means_loopback() {
        assert_eq!(parse_listen("9100").unwrap().to_string(), "127.0.0.1:9100");
        assert_eq!(
            parse_listen("0.0.0.0:80").unwrap().to_string(),
            "0.0.0.0:80"
        );
        assert_eq!(parse_listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert!(
            parse_listen("localhost:80")
                .unwrap_err()
                .contains("neither")
        );
    }

    #[test]
    fn the_text_format_is_written_as_prometheus_reads_it() {
        let c = Counter::default();
        c.inc();
        c.inc();
        let v = CounterVec::with_values(&[&["failed"], &["healthy"]]);
        v.inc(&["healthy"]);
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let mut e = Exposition::default();
        e.counter("baton_x_total", "X.", &c);
        e.counter_vec("baton_y_total", "Y.", &["result"], &v);
        e.gauge_vec("baton_z", "Z.", "state", &[("a\"b".into(), 3.0)]);
        e.histogram("baton_d_seconds", "D.", &h);
        let text = e.finish();
        assert!(
            text.contains("# TYPE baton_x counter\nbaton_x_total 2\n"),
            "{text}"
        );
        assert!(text.contains("# HELP baton_x X.\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(sample(&text, "baton_y_total{result=\"failed\"}"), Some(0.0));
        assert_eq!(
            sample(&text, "baton_y_total{result=\"healthy\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "baton_z{state=\"a\\\"b\"}"),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "baton_d_seconds_bucket{le=\"0.1\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "baton_d_seconds_bucket{le=\"1.0\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "baton_d_seconds_bucket{le=\"+Inf\"}"),
            Some(3.0)
        );
        assert_eq!(sample(&text, "baton_d_seconds_count"), Some(3.0));
        assert_eq!(sample(&text, "baton_d_seconds_sum"), Some(5.55));
    }
}
