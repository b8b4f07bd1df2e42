//! What the node's and the coordinator's `GET /metrics` share: content
//! negotiation between OpenMetrics (what Prometheus asks for) and the classic
//! Prometheus text format 0.0.4 (what `curl`, `promtool check metrics` and
//! older scrapers read), as the Go client library does.
//!
//! `prometheus-client` encodes OpenMetrics only; [`classic_text`] rewrites
//! that into the 0.0.4 format: counters are declared under their `_total`
//! name, and the `# UNIT`, `# EOF` and `_created` lines, which 0.0.4 does
//! not have, are dropped.

use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry's exposition in the format the request's `Accept` asks for.
pub fn exposition(registry: &Registry, request: &HeaderMap) -> Response {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, registry);
    let wants_openmetrics = request
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(accepts_openmetrics);
    if wants_openmetrics {
        ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response()
    } else {
        ([(header::CONTENT_TYPE, CLASSIC)], classic_text(&text)).into_response()
    }
}

/// Rewrites an OpenMetrics exposition into the Prometheus text format 0.0.4.
pub fn classic_text(openmetrics: &str) -> String {
    let mut counters: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(openmetrics.len());
    let mut lines = openmetrics.lines().peekable();
    while let Some(line) = lines.next() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            // The TYPE line follows its HELP: both get the classic name.
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let kind = lines
                .peek()
                .and_then(|l| l.strip_prefix(&format!("# TYPE {name} ")))
                .unwrap_or("");
            let (classic, classic_kind) = classic_family(name, kind);
            out.push_str(&format!("# HELP {classic} {help}\n"));
            if !kind.is_empty() {
                lines.next();
                out.push_str(&format!("# TYPE {classic} {classic_kind}\n"));
            }
            if kind == "counter" {
                counters.push(name);
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (classic, classic_kind) = classic_family(name, kind);
            out.push_str(&format!("# TYPE {classic} {classic_kind}\n"));
            if kind == "counter" {
                counters.push(name);
            }
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample
            .strip_suffix("_created")
            .is_some_and(|base| counters.contains(&base))
        {
            continue;
        }
        // A family without labels prints `name{} value`.
        match line.split_once("{} ") {
            Some((name, value)) if name == sample => out.push_str(&format!("{name} {value}\n")),
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The classic name and type of an OpenMetrics family.
fn classic_family<'a>(name: &str, kind: &'a str) -> (String, &'a str) {
    match kind {
        "counter" => (format!("{name}_total"), "counter"),
        "info" => (format!("{name}_info"), "gauge"),
        "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
        _ => (name.to_owned(), "untyped"),
    }
}

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero q).
fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        parts.next() == Some("application/openmetrics-text")
            && !parts.any(|p| p.strip_prefix("q=").is_some_and(|q| q.parse() == Ok(0.0)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;

    fn registry() -> Registry {
        let mut r = Registry::with_prefix("pifleet_test");
        let c: Counter = Counter::default();
        c.inc();
        r.register("requests", "Requests served", c);
        let g: Gauge = Gauge::default();
        g.set(3);
        r.register("agents", "Agents", g);
        let h = Histogram::new([0.1, 1.0]);
        h.observe(0.5);
        r.register(
            "build",
            "Build",
            prometheus_client::metrics::info::Info::new(vec![("version", "1")]),
        );
        r.register_with_unit(
            "latency",
            "Latency",
            prometheus_client::registry::Unit::Seconds,
            h,
        );
        r
    }

    #[test]
    fn counters_are_declared_under_their_total_name_and_openmetrics_only_lines_go() {
        let mut om = String::new();
        encode(&mut om, &registry()).unwrap();
        let text = classic_text(&om);
        assert!(text.contains("# HELP pifleet_test_requests_total Requests served"));
        assert!(text.contains("# TYPE pifleet_test_requests_total counter\n"));
        assert!(text.contains("pifleet_test_requests_total 1\n"), "{text}");
        assert!(text.contains("# TYPE pifleet_test_agents gauge\npifleet_test_agents 3\n"));
        assert!(text.contains("pifleet_test_latency_seconds_bucket{le=\"1.0\"} 1\n"));
        assert!(text.contains("# HELP pifleet_test_latency_seconds Latency.\n# TYPE pifleet_test_latency_seconds histogram\n"), "{text}");
        assert!(
            text.contains(
                "# TYPE pifleet_test_build_info gauge\npifleet_test_build_info{version=\"1\"} 1\n"
            ),
            "{text}"
        );
        for gone in ["# EOF", "# UNIT", "_created"] {
            assert!(!text.contains(gone), "{gone} left in\n{text}");
        }
    }

    #[test]
    fn the_accept_header_chooses_the_format() {
        let r = registry();
        let mut headers = HeaderMap::new();
        let classic = exposition(&r, &headers);
        assert_eq!(classic.headers()[header::CONTENT_TYPE], CLASSIC);
        headers.insert(
            header::ACCEPT,
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
                .parse()
                .unwrap(),
        );
        let om = exposition(&r, &headers);
        assert_eq!(om.headers()[header::CONTENT_TYPE], OPENMETRICS);
        assert!(!accepts_openmetrics(
            "application/openmetrics-text;q=0, text/plain"
        ));
        assert!(!accepts_openmetrics("text/plain;version=0.0.4"));
    }
}
