//! `pifleet up`: the whole fleet on one machine, on its embedded broker or
//! on one the user already runs (`--mqtt`).

use serde_json::Value;

use pifleet::protocol::FleetStatus;

use crate::util::*;

/// `pifleet up` with `nodes` nodes of 4 slots on free ports, no Ollama (so
/// its simulator), once ready: the process, API port, MQTT port, data dir.
fn start_up(nodes: u32) -> (Proc, u16, u16, tempfile::TempDir) {
    let mqtt_port = free_port();
    let (up, api_port, data) = start_up_with(nodes, &["--mqtt-port", &mqtt_port.to_string()]);
    (up, api_port, mqtt_port, data)
}

/// `pifleet up` with `broker` options (`--mqtt-port P` or `--mqtt H:P`),
/// once ready: the process, API port and data dir.
fn start_up_with(nodes: u32, broker: &[&str]) -> (Proc, u16, tempfile::TempDir) {
    let api_port = free_port();
    let data = tempfile::tempdir().unwrap();
    let no_ollama = format!("http://127.0.0.1:{}", free_port());
    let up = Proc::spawn(
        "up",
        &[
            "up",
            "--nodes",
            &nodes.to_string(),
            "--capacity",
            "4",
            "--api-port",
            &api_port.to_string(),
            broker[0],
            broker[1],
            "--ollama-url",
            &no_ollama,
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[],
    );
    up.wait_for_line("SIMULATOR", WAIT);
    up.wait_for_line(
        &format!("fleet is ready ({nodes}/{nodes} nodes online"),
        WAIT,
    );
    // The last line of the report that follows (node pids, data dir).
    up.wait_for_line("Ctrl-C stops everything", WAIT);
    (up, api_port, data)
}

#[test]
fn pifleet_up_killed_with_sigkill_leaves_no_node_running() {
    let (up, _, _, data) = start_up(2);
    let pids: Vec<u32> = up
        .output()
        .iter()
        .filter(|l| l.trim_start().starts_with("node up-"))
        .filter_map(|l| l.split("pid ").nth(1)?.split(',').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "{:?}", up.output());
    up.signal("KILL");
    let running = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    wait_until("the orphaned nodes to stop", WAIT, || {
        !pids.iter().any(|&p| running(p))
    });
    for node in ["up-1", "up-2"] {
        let log = std::fs::read_to_string(data.path().join(format!("nodes/{node}.log"))).unwrap();
        assert!(
            log.contains("that started this node is gone; stopping"),
            "{log}"
        );
    }
}

#[test]
fn pifleet_up_then_spawn_chat_and_status_from_a_second_terminal() {
    let (mut up, api_port, mqtt_port, data) = start_up(3);
    let api = format!("http://127.0.0.1:{api_port}");
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(pifleet_bin())
            .args(args)
            .env("PIFLEET_COORDINATOR", &api)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pifleet {args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    assert!(cli(&[
        "spawn",
        "alice",
        "--model",
        "llama3.2",
        "--system",
        "You are Alice."
    ])
    .contains("spawned alice"));
    let answer = cli(&["chat", "alice", "hello there"]);
    assert!(
        answer.contains("last user message: \"hello there\""),
        "{answer}"
    );
    assert!(answer.contains("You are Alice."), "{answer}");
    let status = cli(&["status"]);
    assert!(status.contains("Agents: 1 / 12 running"), "{status}");
    assert!(status.contains("Nodes online: 3 / 3"), "{status}");
    let json: FleetStatus = serde_json::from_str(&cli(&["status", "--json"])).unwrap();
    assert_eq!(json.summary.agents_running, 1);
    // The embedded broker carries the contract topics.
    let sub = std::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt_port.to_string(),
            "-t",
            "pifleet/nodes/+/capacity",
            "-C",
            "1",
            "-W",
            "10",
        ])
        .output()
        .unwrap();
    let capacity: Value = serde_json::from_slice(&sub.stdout).expect("a capacity message");
    assert_eq!(capacity["agent_capacity"], 4);
    // A failing command exits non-zero with the server's error.
    let out = std::process::Command::new(pifleet_bin())
        .args(["chat", "nobody", "hi"])
        .env("PIFLEET_COORDINATOR", &api)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no agent named nobody"));

    up.signal("INT");
    assert_eq!(up.wait_exit(WAIT).code(), Some(0), "{:?}", up.output());
    up.wait_for_line("pifleet up: stopped", WAIT);
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", data.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "node processes survived: {}",
        String::from_utf8_lossy(&leftover.stdout)
    );
}

#[test]
fn pifleet_up_on_the_users_broker_shows_the_fleet_to_clients_already_connected() {
    let broker = Mosquitto::start();
    // A dashboard already subscribed before the fleet exists.
    let dashboard = std::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string()])
        .args(["-t", "pifleet-up/nodes/+/capacity", "-C", "2", "-W", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{}", broker.port);
    let (mut up, _, _data) = start_up_with(2, &["--mqtt", &address]);
    assert!(
        up.output()
            .iter()
            .any(|l| l.contains(&format!("MQTT broker  {address} (yours)"))),
        "{:?}",
        up.output()
    );
    // `-W` bounds the wait.
    let seen = dashboard.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout);
    let capacity: Value = serde_json::from_str(seen.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the dashboard saw no capacity message ({e}): {seen:?}"));
    assert_eq!(capacity["agent_capacity"], 4);
    up.signal("INT");
    assert_eq!(up.wait_exit(WAIT).code(), Some(0), "{:?}", up.output());

    // A broker that is not there: a clear error naming it, at once.
    let nowhere = format!("127.0.0.1:{}", free_port());
    let out = std::process::Command::new(pifleet_bin())
        .args([
            "up",
            "--mqtt",
            &nowhere,
            "--api-port",
            &free_port().to_string(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains(&format!("--mqtt {nowhere}: cannot reach the MQTT broker")),
        "{stderr}"
    );
    let out = std::process::Command::new(pifleet_bin())
        .args(["up", "--mqtt", "host:port"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"port\" is not a port number"), "{stderr}");
}
