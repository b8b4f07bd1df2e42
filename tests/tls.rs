//! MQTT over TLS (issue 16): daemons verify a TLS-only broker with
//! `[mqtt] tls_ca_file` (rustls) and work as on a plain one; a CA that did
//! not sign the broker's certificate keeps a node off the broker with an
//! error naming the file; a file holding no certificate is refused at load.

use std::time::Duration;

use serde_json::json;

use crate::util::*;

fn tls_section(ca: &std::path::Path) -> String {
    format!("[mqtt]\ntls_ca_file = \"{}\"\n", ca.display())
}

#[tokio::test]
async fn a_fleet_on_a_tls_only_broker_verifies_it_with_tls_ca_file_and_answers_a_chat() {
    let broker = Mosquitto::start_tls();
    let ca = broker.ca.clone().expect("a TLS broker has a CA");
    let coordinator = Coordinator::start(&broker, &tls_section(&ca));
    let sim = Sim::start(&[]);
    let node = Node::start(
        "t1",
        &broker,
        &sim.url,
        "agent_capacity = 2",
        &tls_section(&ca),
    );
    assert!(
        node.proc
            .output()
            .iter()
            .any(|l| l.contains("TLS, verified with") && l.contains(&*ca.to_string_lossy())),
        "the node says it is on TLS, verified with its CA file: {:?}",
        node.proc.output()
    );
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("secure", "llama3.2").await;
    coordinator.wait_running(1).await;
    let (status, answer) = coordinator
        .post(
            "/v1/chat",
            json!({"agent": "secure", "messages": [{"role": "user", "content": "over TLS?"}]}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["node"], "t1", "{answer}");
    assert!(
        !answer["message"]["content"]
            .as_str()
            .unwrap_or("")
            .is_empty(),
        "{answer}"
    );
}

#[tokio::test]
async fn a_node_without_tls_or_with_another_ca_stays_off_a_tls_broker_and_says_why() {
    let broker = Mosquitto::start_tls();
    let sim = Sim::start(&[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let other = tls::make_ca(dir.path(), "not-the-brokers-ca");
    let mut nodes = Vec::new();
    for (id, sections) in [
        ("wrong-ca", tls_section(&other.cert)),
        ("plain", String::new()),
    ] {
        let config = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{id}\"\nagent_capacity = 1\n[mqtt]\nport = {}\n{}\n[ollama]\nurl = \"{}\"\n[api]\nlisten = \"127.0.0.1:0\"\n",
                broker.port,
                sections.trim_start_matches("[mqtt]\n"),
                sim.url
            ),
        )
        .expect("write node.toml");
        nodes.push(Proc::spawn(
            id,
            &["node", "--config", config.to_str().unwrap()],
            &[],
        ));
    }
    let refused = nodes[0].wait_for_line("TLS failed", WAIT);
    assert!(
        refused.contains(&*other.cert.to_string_lossy())
            && refused.contains("invalid peer certificate: UnknownIssuer"),
        "the error names the CA file and the cause, a broker certificate of another CA: {refused}"
    );
    // The plain client tries, and gets no MQTT session from a TLS listener.
    let tried = nodes[1].wait_for_line("reconnecting with backoff", WAIT);
    assert!(
        tried.contains(&format!("MQTT broker 127.0.0.1:{}:", broker.port))
            && !tried.contains("TLS"),
        "the plain node tried the broker's port in plain: {tried}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    for node in &nodes {
        assert_eq!(
            node.count_lines("connected to MQTT broker"),
            0,
            "{:?}",
            node.output()
        );
    }
}

#[test]
fn a_tls_ca_file_without_a_certificate_is_refused_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let not_a_ca = dir.path().join("ca.pem");
    std::fs::write(&not_a_ca, "this is not PEM\n").expect("write");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"x\"\nagent_capacity = 1\n[mqtt]\ntls_ca_file = \"{}\"\n",
            not_a_ca.display()
        ),
    )
    .expect("write node.toml");
    let out = std::process::Command::new(pifleet_bin())
        .args(["config", "check", config.to_str().unwrap()])
        .output()
        .expect("run pifleet config check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(
        stderr.contains("mqtt.tls_ca_file")
            && stderr.contains(&*not_a_ca.to_string_lossy())
            && stderr.contains("holds no certificate"),
        "{stderr}"
    );
}
