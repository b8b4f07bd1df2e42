//! Watching the fleet with real tools: Home Assistant discovery read from
//! the broker with `mosquitto_sub` and checked (templates rendered with
//! Jinja2), `promtool` on both daemons' metrics, and a Prometheus server
//! scraping a fleet with the shipped config, rules and dashboard queries.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::*;

/// A node whose probe files say 48.5 °C and not throttled, so that every entity
/// and metric has a real value (this machine has neither sensor).
fn start_node(id: &str, broker: &Mosquitto, sim: &Sim, dir: &std::path::Path) -> Node {
    let temperature = dir.join(format!("{id}-temp"));
    let throttled = dir.join(format!("{id}-throttled"));
    std::fs::write(&temperature, "48500\n").unwrap();
    std::fs::write(&throttled, "throttled=0x0\n").unwrap();
    let probe = format!(
        "[probe]\ntemperature_file = \"{}\"\nthrottled_file = \"{}\"\n",
        temperature.display(),
        throttled.display()
    );
    Node::start(id, broker, &sim.url, "agent_capacity = 3", &probe)
}

async fn spawn_and_chat(coordinator: &Coordinator, agents: usize, chats: usize) {
    for i in 0..agents {
        coordinator.spawn_agent(&format!("w{i}"), "llama3.2").await;
    }
    coordinator.wait_running(agents).await;
    for i in 0..chats {
        let body = json!({"agent": format!("w{}", i % agents), "messages": [{"role": "user", "content": "hi"}]});
        let (status, reply) = coordinator.post("/v1/chat", body).await;
        assert_eq!(status, 200, "{reply}");
    }
}

fn entities_of<'a>(entities: &'a [Value], device: &str) -> Vec<&'a Value> {
    entities.iter().filter(|e| e["device"] == device).collect()
}

fn value_of(entities: &[Value], unique_id: &str) -> String {
    entities
        .iter()
        .find(|e| e["unique_id"] == unique_id)
        .unwrap_or_else(|| panic!("no entity {unique_id} in {entities:?}"))["value"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The checked entities, or `None` while a state topic has nothing retained
/// yet (a snapshot taken between a config and the first state it reads).
fn discovered_under(broker: &Mosquitto, prefix: &str) -> Option<Vec<Value>> {
    let snapshot = retained(broker, &[&format!("{prefix}/#"), "pifleet/#"]);
    match check_discovery(&snapshot) {
        Ok(entities) => Some(entities),
        Err(problems)
            if problems
                .lines()
                .all(|l| l.contains("nothing retained on its state_topic")) =>
        {
            None
        }
        Err(problems) => panic!("discovery configs fail the check:\n{problems}"),
    }
}

fn discovered(broker: &Mosquitto) -> Option<Vec<Value>> {
    discovered_under(broker, "homeassistant")
}

#[tokio::test(flavor = "multi_thread")]
async fn home_assistant_discovers_every_entity_follows_a_killed_node_and_forgets_it() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let dir = tempfile::tempdir().unwrap();
    let _n1 = start_node("pi-ha-1", &broker, &sim, dir.path());
    let n2 = start_node("pi-ha-2", &broker, &sim, dir.path());
    coordinator.wait_nodes_online(2).await;
    spawn_and_chat(&coordinator, 3, 0).await;

    // Every entity, checked against Home Assistant's documentation, its
    // template rendered on what is retained on its state topic.
    let entities = poll("3 agents in the retained summary", WAIT, || async {
        discovered(&broker).filter(|e| value_of(e, "pifleet_fleet_agents_running") == "3")
    })
    .await;
    assert_eq!(entities.len(), 2 * 9 + 7, "{entities:#?}");
    let n1 = entities_of(&entities, "pifleet_node_pi-ha-1");
    let keys: Vec<&str> = n1
        .iter()
        .map(|e| {
            e["unique_id"]
                .as_str()
                .unwrap()
                .trim_start_matches("pifleet_node_pi-ha-1_")
        })
        .collect();
    for key in [
        "agents_running",
        "agent_capacity",
        "load",
        "cpu_usage",
        "memory_available",
        "temperature",
        "throttled",
        "ollama_reachable",
        "draining",
    ] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }
    assert!(
        entities.iter().all(|e| e["available"] == true),
        "{entities:#?}"
    );
    assert_eq!(
        value_of(&entities, "pifleet_node_pi-ha-1_temperature"),
        "48.5"
    );
    assert_eq!(value_of(&entities, "pifleet_node_pi-ha-1_throttled"), "OFF");
    assert_eq!(
        value_of(&entities, "pifleet_node_pi-ha-1_ollama_reachable"),
        "ON"
    );
    assert_eq!(
        value_of(&entities, "pifleet_node_pi-ha-1_agent_capacity"),
        "3"
    );
    assert_eq!(value_of(&entities, "pifleet_fleet_nodes_online"), "2");
    assert_eq!(value_of(&entities, "pifleet_fleet_free_capacity"), "3");
    assert_eq!(value_of(&entities, "pifleet_fleet_coordinator"), "online");

    // Killed: its entities become unavailable; the fleet's change within
    // one summary interval (1 s) of the coordinator noticing.
    n2.proc.signal("KILL");
    poll("the coordinator to count one node online", WAIT, || async {
        (coordinator.status().await.summary.nodes_online == 1).then_some(())
    })
    .await;
    let noticed = Instant::now();
    poll("the fleet entities to show one node", WAIT, || async {
        discovered(&broker).filter(|e| value_of(e, "pifleet_fleet_nodes_online") == "1")
    })
    .await;
    // The summary goes out at most 1 s after a change; the rest is the
    // coordinator's 250 ms tick and this test's polling.
    assert!(
        noticed.elapsed() < Duration::from_secs(3),
        "the retained summary lagged {:?} behind the coordinator",
        noticed.elapsed()
    );
    // Its entities follow its retained status (the broker's last will).
    let entities = poll("pi-ha-2's entities to be unavailable", WAIT, || async {
        discovered(&broker).filter(|e| {
            entities_of(e, "pifleet_node_pi-ha-2")
                .iter()
                .all(|x| x["available"] == false)
        })
    })
    .await;
    assert_eq!(entities_of(&entities, "pifleet_node_pi-ha-2").len(), 9);
    for e in entities_of(&entities, "pifleet_node_pi-ha-1") {
        assert_eq!(e["available"], true, "{e}");
    }

    // Home Assistant restarts: every config comes again, live.
    let watcher = Client::connect(&broker, &["homeassistant/#"]).await;
    watcher.publish("homeassistant/status", "online").await;
    for topic in [
        "homeassistant/sensor/pifleet_fleet/queue_depth/config",
        "homeassistant/binary_sensor/pifleet_fleet/coordinator/config",
        "homeassistant/sensor/pifleet_node_pi-ha-1/temperature/config",
        "homeassistant/binary_sensor/pifleet_node_pi-ha-1/draining/config",
    ] {
        watcher.wait_message(topic, |m| !m.retain).await;
    }

    // Forgotten: its configs are removed.
    poll("pi-ha-2 to be offline", WAIT, || async {
        (coordinator.node("pi-ha-2").await.state == "offline").then_some(())
    })
    .await;
    let (status, body) = coordinator.delete("/v1/nodes/pi-ha-2").await;
    assert_eq!(status, 200, "{body}");
    let entities = poll("pi-ha-2's configs to go", WAIT, || async {
        discovered(&broker).filter(|e| entities_of(e, "pifleet_node_pi-ha-2").is_empty())
    })
    .await;
    assert_eq!(entities.len(), 9 + 7, "{entities:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_follows_its_prefix_and_can_be_turned_off() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let custom = Coordinator::start(
        &broker,
        "[home_assistant]\ndiscovery_prefix = \"ha-test\"\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let _node = start_node("pi-prefix", &broker, &sim, dir.path());
    custom.wait_nodes_online(1).await;
    let entities = poll("configs under ha-test/", WAIT, || async {
        discovered_under(&broker, "ha-test").filter(|e| e.len() == 9 + 7)
    })
    .await;
    assert!(entities
        .iter()
        .all(|e| e["topic"].as_str().unwrap().starts_with("ha-test/")));
    assert_eq!(retained(&broker, &["homeassistant/#"]), "");

    let broker = Mosquitto::start();
    let off = Coordinator::start(&broker, "[home_assistant]\ndiscovery = false\n");
    let _node = start_node("pi-off", &broker, &sim, dir.path());
    off.wait_nodes_online(1).await;
    // The summary is published by the same tick that would announce.
    poll("the fleet summary", WAIT, || async {
        (!retained(&broker, &["pifleet/fleet/summary"]).is_empty()).then_some(())
    })
    .await;
    assert_eq!(retained(&broker, &["homeassistant/#"]), "");
}

/// The PromQL of every panel of the shipped Grafana dashboard, with its
/// variables filled in as Grafana would.
fn dashboard_queries() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/monitoring/grafana/pifleet.json"
    );
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().clone())
        .map(|t| {
            t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$node", ".*")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_fleet_every_panel_answers_and_node_down_fires() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&broker, "");
    let dir = tempfile::tempdir().unwrap();
    let n1 = start_node("pi-prom-1", &broker, &sim, dir.path());
    let n2 = start_node("pi-prom-2", &broker, &sim, dir.path());
    coordinator.wait_nodes_online(2).await;
    spawn_and_chat(&coordinator, 4, 12).await;
    let job = coordinator
        .submit_job("w0", json!({"message": "summarise"}))
        .await;
    poll("the job to complete", WAIT, || async {
        (coordinator.job(&job).await.status == pifleet::protocol::JobState::Completed).then_some(())
    })
    .await;

    // promtool's linter finds nothing in either daemon's exposition.
    for url in [&coordinator.api, &n1.api] {
        let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let text = response.text().await.unwrap();
        let (ok, said) = promtool(&["check", "metrics"], &text);
        assert!(
            ok && said.is_empty(),
            "promtool on {url}/metrics: {said}\n{text}"
        );
    }

    let prometheus = Prometheus::start(&coordinator.api, &[&n1.api, &n2.api]).await;
    prometheus
        .wait_series("count(up == 1) == 3", Duration::from_secs(60))
        .await;
    for query in dashboard_queries() {
        prometheus
            .wait_series(&query, Duration::from_secs(60))
            .await;
    }

    n2.proc.signal("KILL");
    let alert = prometheus
        .wait_series(
            "ALERTS{alertname=\"NodeDown\", node=\"pi-prom-2\"}",
            Duration::from_secs(90),
        )
        .await;
    let state = alert[0]["metric"]["alertstate"].as_str().unwrap();
    assert!(["pending", "firing"].contains(&state), "{alert:?}");
    // The other node stays quiet.
    assert!(prometheus
        .query("ALERTS{alertname=\"NodeDown\", node=\"pi-prom-1\"}")
        .await
        .is_empty());
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let (ok, said) = promtool(&["check", "rules", "monitoring/alerts.yml"], "");
    assert!(ok, "{said}");
    let (ok, said) = promtool(&["test", "rules", "monitoring/alerts_test.yml"], "");
    assert!(ok, "{said}");
    let (ok, said) = promtool(&["check", "config", "monitoring/prometheus.yml"], "");
    assert!(ok, "{said}");
}
