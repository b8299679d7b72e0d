//! Samples for analysis (`SampleRequest`): the service's own Prometheus
//! endpoint on this host, and what the agent sees of its process. Not a
//! command: nothing changes and nothing is journaled; the coordinator
//! asks once per interval of a bake and judges the answers.
//!
//! Bounded: loopback addresses only (a coordinator cannot make agents
//! fetch anything else), at most [`MAX_BODY`] bytes read, at most
//! [`MAX_TIMEOUT`], at most [`MAX_FAMILIES`] families and [`MAX_SERIES`]
//! bucket bounds per answer, at most [`MAX_IN_FLIGHT`] requests at once.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use baton_common::text::{prefix, quote};
use baton_proto::agent::v1::{MetricSample, ProcessSample, SampleReply, SampleRequest};
use tokio::sync::mpsc;

/// The largest endpoint body read.
pub const MAX_BODY: usize = 4 << 20;
/// The longest a scrape may take.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);
/// The most families one request may ask for.
pub const MAX_FAMILIES: usize = 8;
/// The most samples (families × bucket bounds) one answer carries.
pub const MAX_SERIES: usize = 512;
/// Requests answered at once; more are refused.
pub const MAX_IN_FLIGHT: usize = 16;
/// The longest error sent.
const MAX_ERROR_CHARS: usize = 512;

/// What the sampler needs of the agent.
pub trait Source: Send + Sync + 'static {
    /// `${NAME}` values (the agent's `--var`s and `BATON_HOST_ID`).
    fn vars(&self) -> &BTreeMap<String, String>;
    /// The service's process as the agent sees it.
    fn process(&self, service: &str) -> Result<ProcessSample, String>;
}

/// Runs requests in the background, at most [`MAX_IN_FLIGHT`] at once.
#[derive(Clone, Default)]
pub struct Sampler {
    in_flight: Arc<AtomicUsize>,
}

impl Sampler {
    /// Answers `req` on `out` (refused at once when too many are open).
    pub fn start(
        &self,
        req: SampleRequest,
        source: Arc<dyn Source>,
        out: mpsc::Sender<SampleReply>,
    ) {
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = out.try_send(SampleReply {
                request_id: req.request_id,
                error: format!("{MAX_IN_FLIGHT} samples are being taken on this host; try again"),
                ..SampleReply::default()
            });
            return;
        }
        let slot = Slot(self.in_flight.clone());
        tokio::spawn(async move {
            // Given back however the task ends (a panic included).
            let _slot = slot;
            let reply = answer(req, source.as_ref()).await;
            let _ = out.send(reply).await;
        });
    }
}

/// One request's place among [`MAX_IN_FLIGHT`], given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes the samples `req` asks for.
pub async fn answer(req: SampleRequest, source: &dyn Source) -> SampleReply {
    let mut reply = SampleReply {
        request_id: req.request_id.clone(),
        ..SampleReply::default()
    };
    let error = |e: String| prefix(&e, MAX_ERROR_CHARS);
    if let Err(e) = baton_common::host::validate_name(&req.service) {
        reply.error = error(format!("invalid service name {}: {e}", quote(&req.service)));
        return reply;
    }
    if req.process {
        match source.process(&req.service) {
            Ok(p) => reply.process = Some(p),
            Err(e) => {
                reply.error = error(e);
                return reply;
            }
        }
    }
    if req.url.is_empty() {
        return reply;
    }
    let metric_name = |n: &str| {
        !n.is_empty()
            && n.len() <= 200
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    if let Some(bad) = req.families.iter().find(|f| !metric_name(f)) {
        reply.error = error(format!("{} is not a metric name", quote(bad)));
        return reply;
    }
    if req.families.len() > MAX_FAMILIES {
        reply.error = error(format!(
            "{} families asked, at most {MAX_FAMILIES}",
            req.families.len()
        ));
        return reply;
    }
    let timeout = Duration::from_millis(u64::from(req.timeout_ms))
        .clamp(Duration::from_millis(100), MAX_TIMEOUT);
    match scrape(&req.url, source.vars(), timeout).await {
        Ok(text) => match families(&text, &req.families) {
            Ok(samples) => reply.samples = samples,
            Err(e) => reply.error = error(e),
        },
        Err(e) => reply.error = error(e),
    }
    reply
}

/// The URL with its variables filled in, if it names a loopback address.
pub fn loopback_url(
    template: &str,
    vars: &BTreeMap<String, String>,
) -> Result<reqwest::Url, String> {
    let text =
        crate::service::substitute("analysis url", template, vars).map_err(|e| e.to_string())?;
    // Errors name the template, not the URL with this host's variables.
    let url =
        reqwest::Url::parse(&text).map_err(|e| format!("{} is not a URL: {e}", quote(template)))?;
    if url.scheme() != "http" {
        return Err(format!("{} is not http://", quote(template)));
    }
    let host = url
        .host_str()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = match host.parse::<IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host == "localhost",
    };
    if !loopback {
        return Err(format!(
            "{} is not on this host: an agent scrapes loopback addresses only (127.0.0.0/8, ::1, localhost)",
            quote(template)
        ));
    }
    Ok(url)
}

/// One HTTP client for every scrape of this agent (no pooled
/// connections kept between them).
fn client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    Ok(CLIENT.get_or_init(|| c))
}

async fn scrape(
    template: &str,
    vars: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<String, String> {
    let url = loopback_url(template, vars)?;
    let at = quote(template);
    let mut response = client()?
        .get(url)
        .timeout(timeout)
        .header("Accept", "text/plain;version=0.0.4")
        .send()
        .await
        .map_err(|e| format!("{at}: {}", e.without_url()))?;
    if !response.status().is_success() {
        return Err(format!("{at} answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("{at}: {}", e.without_url()))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("{at} sent more than {} MiB", MAX_BODY >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| format!("{at} sent text that is not UTF-8"))
}

/// The `wanted` families' samples in Prometheus (or OpenMetrics) text,
/// each summed over every label but `le`. A family with no sample is an
/// error: a missing counter is no data, not zero.
pub fn families(text: &str, wanted: &[String]) -> Result<Vec<MetricSample>, String> {
    let mut sums: BTreeMap<(usize, String), f64> = BTreeMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line
            .find(|c: char| c == '{' || c.is_whitespace())
            .unwrap_or(line.len());
        let name = &line[..name_end];
        let Some(family) = wanted.iter().position(|w| w == name) else {
            continue;
        };
        let (le, rest) = match line[name_end..].strip_prefix('{') {
            Some(labels) => {
                // Errors say where, never what: the text may be anything
                // a loopback port answered.
                let (le, end) = labels_le(labels).ok_or_else(|| {
                    format!("line {} of the answer has malformed labels", number + 1)
                })?;
                (le, &labels[end..])
            }
            None => (String::new(), &line[name_end..]),
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("line {} of the answer has no number", number + 1))?;
        if !value.is_finite() {
            continue;
        }
        let key = (family, le);
        if !sums.contains_key(&key) && sums.len() >= MAX_SERIES {
            return Err(format!(
                "more than {MAX_SERIES} series in the families asked"
            ));
        }
        *sums.entry(key).or_insert(0.0) += value;
    }
    if let Some(missing) = wanted
        .iter()
        .enumerate()
        .find(|(i, _)| !sums.keys().any(|(f, _)| f == i))
    {
        return Err(format!("the endpoint has no {} samples", quote(missing.1)));
    }
    Ok(sums
        .into_iter()
        .map(|((f, le), value)| MetricSample {
            family: wanted[f].clone(),
            le,
            value,
        })
        .collect())
}

/// The `le` label's value in `labels` (the text after `{`), and where the
/// label set ends (the byte after its `}`); `None` when it is malformed.
fn labels_le(labels: &str) -> Option<(String, usize)> {
    let mut chars = labels.char_indices().peekable();
    let mut le = String::new();
    loop {
        // Separators, then `}` or a name.
        while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
        let (start, c) = chars.next()?;
        if c == '}' {
            return Some((le, start + 1));
        }
        let mut key_end = start + c.len_utf8();
        loop {
            let (i, c) = chars.next()?;
            if c == '=' {
                break;
            }
            key_end = i + c.len_utf8();
        }
        let key = labels[start..key_end].trim();
        if chars.next()?.1 != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()?.1 {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        if key == "le" {
            le = value;
        }
    }
}

/// Resident memory and open files of `pid`, from /proc (0 when unknown).
pub fn proc_usage(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib.saturating_mul(1024));
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP app_requests_total Requests.
# TYPE app_requests_total counter
app_requests_total{path="/",code="200"} 90
app_requests_total{path="/x",code="500"} 10
app_errors_total 10
app_latency_seconds_bucket{le="0.1"} 50
app_latency_seconds_bucket{path="a \"q\" } b",le="0.5"} 90
app_latency_seconds_bucket{le="+Inf"} 100
app_other 1e9
"#;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn families_are_summed_over_their_labels_but_le() {
        let s = families(TEXT, &names(&["app_errors_total", "app_requests_total"])).unwrap();
        let v: Vec<(&str, f64)> = s.iter().map(|m| (m.family.as_str(), m.value)).collect();
        assert_eq!(
            v,
            vec![("app_errors_total", 10.0), ("app_requests_total", 100.0)]
        );
        let b = families(TEXT, &names(&["app_latency_seconds_bucket"])).unwrap();
        let les: Vec<(&str, f64)> = b.iter().map(|m| (m.le.as_str(), m.value)).collect();
        assert_eq!(les, vec![("+Inf", 100.0), ("0.1", 50.0), ("0.5", 90.0)]);
    }

    #[test]
    fn a_missing_family_or_a_broken_line_is_an_error_not_zero() {
        assert!(
            families(TEXT, &names(&["nope_total"]))
                .unwrap_err()
                .contains("no \"nope_total\"")
        );
        assert!(families("x{le=\"1\" 3\n", &names(&["x"])).is_err());
        assert!(families("x{le=\"1\"} \n", &names(&["x"])).is_err());
        assert!(families("x{le=1} 3\n", &names(&["x"])).is_err());
        let many: String = (0..600).map(|i| format!("x{{le=\"{i}\"}} 1\n")).collect();
        assert!(families(&many, &names(&["x"])).unwrap_err().contains("512"));
    }

    #[test]
    fn hostile_text_is_an_error_never_a_panic_nor_an_echo() {
        for text in [
            "x{a=\"\\é\"} 1\n",
            "x{a=\"é\\\"} 1\n",
            "x{é=\"1\"} 1\n",
            "x{le=\"0.5\\",
            "x{",
            "x{=\"\"} 1",
            "x{le=\"1\"}} 2",
            "x{le=\"1\"\"} 2",
            "x\u{0}{le=\"1\"} 2",
        ] {
            let _ = families(text, &names(&["x"]));
        }
        // A multi-byte character after a backslash is read whole.
        let s = families("x{a=\"\\é\",le=\"2\"} 1\n", &names(&["x"])).unwrap();
        assert_eq!((s[0].le.as_str(), s[0].value), ("2", 1.0));
        // What a loopback port answered is not quoted back.
        let e = families("password: hunter2\n", &names(&["password:"])).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_panicking_sample_gives_its_slot_back() {
        let sampler = Sampler::default();
        sampler.in_flight.fetch_add(1, Ordering::SeqCst);
        let held = Slot(sampler.in_flight.clone());
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _slot = held;
            panic!("a sample failed");
        }));
        assert!(unwound.is_err());
        assert_eq!(sampler.in_flight.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn only_loopback_urls_are_fetched() {
        let vars: BTreeMap<String, String> = [("port".to_owned(), "8080".to_owned())].into();
        assert_eq!(
            loopback_url("http://127.0.0.1:${port}/metrics", &vars)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/metrics"
        );
        assert!(loopback_url("http://[::1]:1/m", &vars).is_ok());
        assert!(loopback_url("http://localhost:1/m", &vars).is_ok());
        for bad in [
            "http://10.0.0.1/m",
            "http://example.com/m",
            "https://127.0.0.1/m",
            "file:///etc/passwd",
            "http://127.0.0.1:${nope}/m",
            "http://127.0.0.1.evil.com/m",
        ] {
            assert!(loopback_url(bad, &vars).is_err(), "{bad}");
        }
    }
}
