use super::*;

fn node(extra: Value) -> NodeView {
    let mut v = json!({
        "node": "pi-1", "session": "s", "seq": 1, "version": "v", "arch": "aarch64",
        "agent_capacity": 2, "agents_running": 2, "agents": ["a", "b"],
        "cpu": {"cores": 4, "load1": 0.31, "usage_pct": 12.0},
        "memory": {"total_bytes": 1, "available_bytes": 1},
        "temperature_c": 48.3, "throttled": null, "models": [], "ollama_reachable": true,
        "labels": {}, "draining": false, "ts": 1,
        "state": "online", "cordoned": false, "assigned": 0, "last_seen_secs": 0,
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    serde_json::from_value(v).unwrap()
}

#[test]
fn the_status_report_shows_scale_nodes_queue_and_events() {
    let status: FleetStatus = serde_json::from_value(json!({
        "agents_total": 13, "agents_running": 12, "agent_capacity": 14, "utilisation_pct": 85.7,
        "agents_pending": 1, "agents_assigned": 0, "agents_moving": 0, "nodes_online": 3,
        "nodes_total": 3, "queue_depth": 5, "jobs_running": 1, "generation": 1,
        "nodes": [node(json!({}))],
        "events": [{"ts_ms": 1_795_392_000_000u64 + 3_723_000, "kind": "placed",
                    "message": "placed a on pi-1"}]
    }))
    .unwrap();
    let report = status_report(&status);
    assert!(report.contains("Agents: 12 / 14 running (86%)"), "{report}");
    assert!(report.contains("Nodes online: 3 / 3"), "{report}");
    assert!(report.contains("pi-1  online  2/2"), "{report}");
    assert!(report.contains("48.3°C"), "{report}");
    assert!(
        report.contains("Queue Depth: 5 jobs (1 running)"),
        "{report}"
    );
    assert!(report.contains("01:02:03  placed a on pi-1"), "{report}");
}

#[test]
fn a_node_that_is_not_online_shows_when_it_was_seen_and_no_stale_load() {
    let row = node_row(&node(json!({"node": "pi-2", "state": "offline",
                                    "agents_running": 0, "agents": [], "last_seen_secs": 150})));
    assert_eq!(row[1], "offline (seen 2m ago)");
    assert_eq!(row[3..6], ["-", "-", "-"]);
    assert_eq!(
        [ago(0), ago(59), ago(3599), ago(7200), ago(200_000)],
        ["0s", "59s", "59m", "2h", "2d"]
    );
}

#[test]
fn labels_must_be_key_value_pairs() {
    assert_eq!(
        parse_labels(&["room=attic".into()]).unwrap()["room"],
        "attic"
    );
    assert!(parse_labels(&["attic".into()]).is_err());
}
