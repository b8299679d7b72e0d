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
        let in_flight = self.in_flight.clone();
        tokio::spawn(async move {
            let reply = answer(req, source.as_ref()).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let _ = out.send(reply).await;
        });
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
    let url =
        reqwest::Url::parse(&text).map_err(|e| format!("{} is not a URL: {e}", quote(&text)))?;
    if url.scheme() != "http" {
        return Err(format!("{} is not http://", quote(&text)));
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
            quote(&text)
        ));
    }
    Ok(url)
}

async fn scrape(
    template: &str,
    vars: &BTreeMap<String, String>,
    timeout: Duration,
) -> Result<String, String> {
    let url = loopback_url(template, vars)?;
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
    let mut response = client
        .get(url.clone())
        .header("Accept", "text/plain;version=0.0.4")
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| format!("{url}: {e}"))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("{url} sent more than {} MiB", MAX_BODY >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).map_err(|_| format!("{url} sent text that is not UTF-8"))
}

/// The `wanted` families' samples in Prometheus (or OpenMetrics) text,
/// each summed over every label but `le`. A family with no sample is an
/// error: a missing counter is no data, not zero.
pub fn families(text: &str, wanted: &[String]) -> Result<Vec<MetricSample>, String> {
    let mut sums: BTreeMap<(usize, String), f64> = BTreeMap::new();
    for line in text.lines() {
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
                let (le, end) = labels_le(labels)
                    .ok_or_else(|| format!("a malformed line: {}", quote(line)))?;
                (le, &labels[end..])
            }
            None => (String::new(), &line[name_end..]),
        };
        let value = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| format!("a line without a number: {}", quote(line)))?;
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
/// label set ends (after its `}`).
fn labels_le(labels: &str) -> Option<(String, usize)> {
    let bytes = labels.as_bytes();
    let mut i = 0;
    let mut le = String::new();
    loop {
        while i < bytes.len() && (bytes[i] == b',' || bytes[i] == b' ') {
            i += 1;
        }
        if *bytes.get(i)? == b'}' {
            return Some((le, i + 1));
        }
        let eq = i + labels[i..].find('=')?;
        let key = labels[i..eq].trim();
        i = eq + 1;
        if *bytes.get(i)? != b'"' {
            return None;
        }
        i += 1;
        let mut value = String::new();
        loop {
            match *bytes.get(i)? {
                b'\\' => {
                    match *bytes.get(i + 1)? {
                        b'n' => value.push('\n'),
                        other => value.push(other as char),
                    }
                    i += 2;
                }
                b'"' => {
                    i += 1;
                    break;
                }
                _ => {
                    let c = labels[i..].chars().next()?;
                    value.push(c);
                    i += c.len_utf8();
                }
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
