//! No single point of failure (docs/HA.md): several brokers in `[mqtt]
//! hosts`, the daemons moving to the next one when theirs fails; several
//! coordinator URLs in the client.

use std::time::Duration;

use serde_json::json;

use crate::util::*;

/// The coordinator and two nodes list two brokers, a bridge pair; the first
/// is killed: each daemon connects to the second within seconds, the nodes
/// stay online, no agent moves, and every agent answers again. The first
/// back, every daemon moves back to it, and still nothing moves.
#[tokio::test(flavor = "multi_thread")]
async fn the_daemons_move_to_the_next_broker_of_mqtt_hosts_when_theirs_dies_and_no_agent_moves() {
    let mut first = Mosquitto::start();
    let second = Mosquitto::start_bridged(&first);
    let hosts = format!(
        "[mqtt]\nhosts = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]",
        first.port, second.port
    );
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(&first, &hosts);
    let nodes = [
        Node::start("hb-1", &first, &sim.url, "agent_capacity = 2", &hosts),
        Node::start("hb-2", &first, &sim.url, "agent_capacity = 2", &hosts),
    ];
    coordinator.wait_nodes_online(2).await;
    let agents = ["h1", "h2", "h3"];
    for name in agents {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(agents.len()).await;
    let before = coordinator.placement().await;
    let on_first = format!("connected to MQTT broker 127.0.0.1:{}", first.port);
    assert_eq!(
        coordinator.proc.count_lines(&on_first),
        1,
        "the first broker is tried first"
    );

    tokio::task::block_in_place(|| first.kill());
    let on_second = format!("connected to MQTT broker 127.0.0.1:{}", second.port);
    for proc in [&coordinator.proc, &nodes[0].proc, &nodes[1].proc] {
        tokio::task::block_in_place(|| proc.wait_for_line(&on_second, Duration::from_secs(10)));
    }
    coordinator.wait_nodes_online(2).await;
    answer_each(&coordinator, &agents, "the second broker").await;
    assert_eq!(
        coordinator.placement().await,
        before,
        "moving to the second broker moved no agent"
    );

    // The first broker back: each daemon returns to it (within a probe of
    // 5 s), so that none stays split from the others.
    tokio::task::block_in_place(|| first.restart());
    for proc in [&coordinator.proc, &nodes[0].proc, &nodes[1].proc] {
        tokio::task::block_in_place(|| {
            wait_until(
                "a daemon back on the first broker",
                Duration::from_secs(15),
                || proc.count_lines(&on_first) == 2,
            )
        });
    }
    answer_each(&coordinator, &agents, "the first broker again").await;
    assert_eq!(
        coordinator.placement().await,
        before,
        "moving back to the first broker moved no agent"
    );
}

/// Each agent answers a chat (asked again while its node reconnects).
async fn answer_each(coordinator: &Coordinator, agents: &[&str], through: &str) {
    for name in agents {
        let body =
            json!({"agent": name, "messages": [{"role": "user", "content": "still there?"}]});
        poll(
            &format!("{name} answering through {through}"),
            Duration::from_secs(20),
            || async {
                let (status, _) = coordinator.post("/v1/chat", body.clone()).await;
                (status == 200).then_some(())
            },
        )
        .await;
    }
}

/// `--coordinator` (and `PIFLEET_COORDINATOR`) with several URLs: the
/// client asks the next while one cannot be reached, in either order; a
/// URL that is not one is refused, named.
#[tokio::test(flavor = "multi_thread")]
async fn pifleet_status_with_two_coordinator_urls_works_whichever_one_is_down() {
    let broker = Mosquitto::start();
    let coordinator = Coordinator::start(&broker, "");
    // Port 1: nothing listens there (a free port could be taken meanwhile).
    let down = "http://127.0.0.1:1".to_owned();
    let run = |urls: &str| {
        let out = std::process::Command::new(pifleet_bin())
            .args(["status", "--json"])
            .env("PIFLEET_COORDINATOR", urls)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for urls in [
        format!("{down},{}", coordinator.api),
        format!("{}, {down}", coordinator.api),
    ] {
        let (code, out, err) = run(&urls);
        assert_eq!(code, Some(0), "{urls}: {err}");
        let status: pifleet::protocol::FleetStatus = serde_json::from_str(&out).unwrap();
        assert_eq!(status.summary.nodes_online, 0, "{out}");
    }
    let (code, _, err) = run(&format!("{down},{down}"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("cannot reach the coordinator at {down}, {down}")),
        "{err}"
    );
    let (code, _, err) = run(&format!("{},127.0.0.1:9470", coordinator.api));
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("\"127.0.0.1:9470\" is not an http:// or https:// URL"),
        "{err}"
    );
}
