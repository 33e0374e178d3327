//! Reading the daemon's Prometheus metrics and health endpoints from inside the node netns.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::HarnessError;
use crate::netns::in_netns;

/// One sample: metric name, its label text (`{…}` without braces) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: String,
    pub value: f64,
}

/// Parsed text exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self { samples }
    }

    /// Sum of every series of `name` whose labels contain all of `label_parts` (e.g. `type="success"`).
    pub fn sum(&self, name: &str, label_parts: &[&str]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && label_parts.iter().all(|p| s.labels.contains(p)))
            .map(|s| s.value)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (head, ""),
    };
    Some(Sample {
        name: name.to_string(),
        labels: labels.to_string(),
        value,
    })
}

/// `GET path` over HTTP/1.0 to `addr` from inside the netns at `netns`; returns (status, body).
pub fn http_get(netns: &Path, addr: SocketAddr, path: &str) -> Result<(u16, String), HarnessError> {
    let path = path.to_string();
    in_netns(netns, move || -> Result<(u16, String), HarnessError> {
        let io = |e| HarnessError::Io(format!("http {addr}"), e);
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        s.write_all(
            format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .map_err(io)?;
        let mut raw = String::new();
        s.read_to_string(&mut raw).map_err(io)?;
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })?
}

/// The daemon's metrics.
pub fn scrape(netns: &Path, addr: SocketAddr) -> Result<Metrics, HarnessError> {
    let (status, body) = http_get(netns, addr, "/metrics")?;
    if status != 200 {
        return Err(HarnessError::Other(format!("/metrics answered {status}")));
    }
    Ok(Metrics::parse(&body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_series_matching_labels() {
        let m = Metrics::parse(
            "# HELP x\ncoredns_cache_hits_total{server=\"dns://10.96.0.10:53\",type=\"success\"} 3\n\
             coredns_cache_hits_total{server=\"dns://169.254.20.10:53\",type=\"denial\"} 2\nup 1\n",
        );
        assert_eq!(m.sum("coredns_cache_hits_total", &[]), 5.0);
        assert_eq!(
            m.sum("coredns_cache_hits_total", &["type=\"success\""]),
            3.0
        );
        assert!(m.has("up"));
        assert!(!m.has("down"));
    }
}
