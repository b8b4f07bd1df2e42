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
        .any(|v| v.contains("application/openmetrics-text"));
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
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match kind {
                "counter" => {
                    counters.push(name);
                    out.push_str(&format!("# TYPE {name}_total counter\n"));
                }
                "unknown" => out.push_str(&format!("# TYPE {name} untyped\n")),
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            // HELP comes before TYPE: look the counter up by the next TYPE.
            if is_counter_declared(openmetrics, name) {
                out.push_str(&format!("# HELP {name}_total{}\n", &rest[name.len()..]));
            } else {
                out.push_str(line);
                out.push('\n');
            }
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        let created = sample
            .strip_suffix("_created")
            .is_some_and(|base| counters.contains(&base));
        if !created {
            // A family without labels prints `name{} value`.
            match line.split_once("{} ") {
                Some((name, value)) if name == sample => {
                    out.push_str(&format!("{name} {value}\n"));
                }
                _ => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
    }
    out
}

fn is_counter_declared(text: &str, name: &str) -> bool {
    text.contains(&format!("# TYPE {name} counter\n"))
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
    }
}
