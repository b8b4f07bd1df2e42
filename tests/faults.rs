//! Issue 14: true on a shelf of real Pis. Clocks that disagree (libfaketime),
//! a store on a disk that fills up (a small tmpfs). Partitions, kills and
//! freezes are played by `pifleet bench failover` (tests/failover.rs), the
//! randomized schedule by tests/nemesis.rs.

use std::time::{Duration, Instant};

use pifleet::protocol::{EventKind, JobState};
use serde_json::json;

use crate::util::*;

/// libfaketime, multi-threaded variant, where Debian's `faketime` package
/// puts it on this architecture.
pub fn libfaketime() -> String {
    format!(
        "/usr/lib/{}-linux-gnu/faketime/libfaketimeMT.so.1",
        std::env::consts::ARCH
    )
}

/// The environment of a process whose wall clock reads `spec` (a
/// libfaketime offset such as "+10m", or a file to read it from), while its
/// monotonic clock stays true, as on a real machine whose RTC is wrong or
/// whose clock NTP steps.
fn fake_clock(spec: &str) -> Vec<(&'static str, String)> {
    let lib = libfaketime();
    assert!(
        std::path::Path::new(&lib).exists(),
        "{lib} is missing: apt-get install faketime (scripts/test.sh does)"
    );
    let mut env = vec![
        ("LD_PRELOAD", lib),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ];
    if spec.starts_with('/') {
        env.push(("FAKETIME_TIMESTAMP_FILE", spec.to_owned()));
        env.push(("FAKETIME_CACHE_DURATION", "1".to_owned()));
    } else {
        env.push(("FAKETIME", spec.to_owned()));
    }
    env
}

fn refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn now_ms() -> i64 {
    pifleet::protocol::now_ms() as i64
}

/// Nodes whose clocks run 10 minutes ahead, an hour behind, and one
/// stepped by a day while running, under a coordinator a day behind: every
/// chat and job succeeds, and nothing moves.
#[tokio::test(flavor = "multi_thread")]
async fn clocks_ahead_behind_and_stepped_while_running_break_no_chat_job_or_placement() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let behind_a_day = fake_clock("-1d");
    let coordinator = Coordinator::start_with_env(&broker, "", &refs(&behind_a_day));
    let step = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(step.path(), "+0\n").unwrap();
    let clocks = [
        ("ahead", fake_clock("+10m")),
        ("behind", fake_clock("-1h")),
        ("stepped", fake_clock(step.path().to_str().unwrap())),
    ];
    let _nodes: Vec<Node> = clocks
        .iter()
        .map(|(id, env)| {
            Node::start_with_env(id, &broker, &sim.url, "agent_capacity = 2", "", &refs(env))
        })
        .collect();
    coordinator.wait_nodes_online(3).await;
    // The fakes took: each node's own `ts` is off by its offset.
    for (id, offset_ms) in [("ahead", 600_000), ("behind", -3_600_000)] {
        let ts = coordinator.node(id).await.capacity.ts as i64;
        let off = ts - now_ms();
        assert!((off - offset_ms).abs() < 30_000, "{id}: ts off by {off} ms");
    }
    let agents = ["c1", "c2", "c3", "c4", "c5", "c6"];
    for name in agents {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(agents.len()).await;
    let placed = coordinator.placement().await;
    assert_eq!(
        placed.len(),
        3,
        "one agent or more on every node: {placed:?}"
    );

    let round = |label: &'static str| {
        let coordinator = &coordinator;
        async move {
            let mut jobs = Vec::new();
            for name in agents {
                let (status, body) = coordinator
                    .post(
                        "/v1/chat",
                        json!({"agent": name, "messages": [{"role": "user", "content": label}]}),
                    )
                    .await;
                assert_eq!(status, 200, "{label}: chat with {name}: {body}");
                jobs.push(
                    coordinator
                        .submit_job(name, json!({"message": label}))
                        .await,
                );
            }
            for id in jobs {
                poll("the job to complete", WAIT, || async {
                    let job = coordinator.job(&id).await;
                    assert_ne!(job.status, JobState::Failed, "{label}: {job:?}");
                    (job.status == JobState::Completed).then_some(())
                })
                .await;
            }
        }
    };
    round("before the step").await;
    // The stepped node's clock jumps a day ahead, then two days back.
    std::fs::write(step.path(), "+1d\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    round("after a step forward").await;
    std::fs::write(step.path(), "-1d\n").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ts = coordinator.node("stepped").await.capacity.ts as i64;
    assert!(now_ms() - ts > 80_000_000, "the step took: ts {ts}");
    round("after a step back").await;

    assert_eq!(coordinator.placement().await, placed, "nothing moved");
    let moved = coordinator.disruptions().await;
    assert!(moved.is_empty(), "{moved:#?}");
}

/// A disk that can fill up: a small tmpfs mounted for the test.
pub struct SmallDisk {
    pub dir: tempfile::TempDir,
}

impl SmallDisk {
    pub fn mount(mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs (the tests run as root)");
        SmallDisk { dir }
    }

    /// Fills the disk.
    pub fn fill(&self) {
        let filler = self.dir.path().join("filler");
        let _ = std::fs::remove_file(&filler);
        let chunk = vec![0u8; 64 << 10];
        let mut file = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
    }

    pub fn free(&self) {
        std::fs::remove_file(self.dir.path().join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// The store's disk fills up during chats and jobs: no chat is answered 200
/// unless its turn is stored, chats get a clear 503 and `/ready` is 503
/// while it is full; once space is freed the coordinator serves again by
/// itself, every acknowledged chat is in the history exactly once and every
/// accepted job completes exactly once.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_store_disk_answers_503_loses_no_acknowledged_chat_or_job_and_recovers_by_itself() {
    let disk = SmallDisk::mount(3);
    let broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let store = disk.dir.path().join("coordinator.db");
    let coordinator = Coordinator::start(
        &broker,
        &format!(
            "history_limit = 1000\n[store]\npath = \"{}\"",
            store.display()
        ),
    );
    let _node = Node::start("disk", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("scribe", "llama3.2").await;
    coordinator.wait_running(1).await;

    let mut acknowledged = Vec::new();
    // Accepted jobs: (id, message).
    let mut jobs: Vec<(String, String)> = Vec::new();
    let mut refused = 0;
    let chat = |i: usize| {
        let coordinator = &coordinator;
        async move {
            let content = format!("note {i}");
            let (status, body) = coordinator
                .post(
                    "/v1/chat",
                    json!({"agent": "scribe", "messages": [{"role": "user", "content": content}]}),
                )
                .await;
            (content, status, body)
        }
    };
    for i in 0..5 {
        let (content, status, body) = chat(i).await;
        assert_eq!(status, 200, "{body}");
        acknowledged.push(content);
        let message = format!("job {i}");
        let id = coordinator
            .submit_job("scribe", json!({"message": message}))
            .await;
        jobs.push((id, message));
    }
    disk.fill();
    let full_at = Instant::now();
    for i in 5..25 {
        let (content, status, body) = chat(i).await;
        match status {
            200 => acknowledged.push(content),
            503 => {
                refused += 1;
                assert_eq!(body["code"], "store", "{body}");
            }
            other => panic!("chat {i} while the disk is full: {other} {body}"),
        }
        let (status, body) = coordinator
            .post(
                "/v1/agents/scribe/jobs",
                json!({"message": format!("job {i}")}),
            )
            .await;
        match status {
            202 => jobs.push((
                body["job_id"].as_str().unwrap().to_owned(),
                format!("job {i}"),
            )),
            503 => assert_eq!(body["code"], "store", "{body}"),
            other => panic!("job {i} while the disk is full: {other} {body}"),
        }
    }
    assert!(
        refused >= 15,
        "only {refused} of 20 chats refused on a full disk"
    );
    let (status, body) = coordinator.get("/ready").await;
    assert_eq!(status, 503, "/ready on a full disk: {body}");
    assert!(body["error"].as_str().unwrap().contains("store"), "{body}");
    assert!(full_at.elapsed() < Duration::from_secs(60));

    disk.free();
    poll("the coordinator to serve again by itself", WAIT, || async {
        (coordinator.get("/ready").await.0 == 200).then_some(())
    })
    .await;
    for i in 25..28 {
        let (content, status, body) = chat(i).await;
        assert_eq!(status, 200, "{body}");
        acknowledged.push(content);
    }
    for (id, _) in &jobs {
        poll("every accepted job to complete", WAIT, || async {
            let job = coordinator.job(id).await;
            assert_ne!(job.status, JobState::Failed, "{job:?}");
            (job.status == JobState::Completed).then_some(job.attempts)
        })
        .await;
    }
    // Every acknowledged chat is in the history once, in order; nothing else.
    let all = Coordinator::stored_user_messages(&store, "scribe");
    let history: Vec<&String> = all.iter().filter(|c| c.starts_with("note ")).collect();
    assert_eq!(history, acknowledged.iter().collect::<Vec<_>>());
    // ...and every accepted job's turn exactly once.
    for (id, message) in &jobs {
        let stored = all.iter().filter(|c| *c == message).count();
        assert_eq!(
            stored, 1,
            "job {id} ({message}) is in the history {stored} times"
        );
    }
}

/// The broker down for 30 s at default settings: the nodes fence (their
/// lease runs out), chats meanwhile answer 503 `no_broker` with
/// `Retry-After`, the chat in flight fails retryably or is answered, and
/// afterwards every agent runs exactly once and the chat's turn command
/// from before the outage is not delivered (the test's client subscribes
/// as soon as the broker is back, racing the coordinator's reconnection;
/// the coordinator's backoff makes it usually second).
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_down_30_s_fences_the_nodes_refuses_chats_and_delivers_no_stale_turn() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "3000"]);
    let coordinator = Coordinator::start(&broker, "");
    let top = "agent_capacity = 2";
    let nodes = [
        Node::start("out-1", &broker, &sim.url, top, ""),
        Node::start("out-2", &broker, &sim.url, top, ""),
    ];
    coordinator.wait_nodes_online(2).await;
    for name in ["o1", "o2"] {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(2).await;
    let chat = |agent: &str, text: &str| {
        let api = coordinator.api.clone();
        let body = json!({"agent": agent, "messages": [{"role": "user", "content": text}]});
        async move {
            let response = reqwest::Client::new()
                .post(format!("{api}/v1/chat"))
                .json(&body)
                .send()
                .await
                .expect("the coordinator answers");
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").is_some();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, retry_after, body)
        }
    };
    let in_flight = tokio::spawn(chat("o1", "before the outage"));
    wait_until_async("Ollama to be answering", WAIT, || async {
        sim.stats().await["in_flight"].as_u64() >= Some(1)
    })
    .await;
    let outage = std::thread::spawn(move || {
        let mut broker = broker;
        broker.restart_after(Duration::from_secs(30));
        broker
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, retry_after, body) = chat("o2", "during the outage").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("no_broker")),
        "{body}"
    );
    assert!(retry_after, "a 503 without Retry-After: {body}");
    assert_eq!(coordinator.get("/ready").await.0, 503);
    let broker = tokio::task::spawn_blocking(move || outage.join().unwrap())
        .await
        .unwrap();
    let commands = Client::connect(&broker, &["pifleet/nodes/+/cmd"]).await;
    for node in &nodes {
        assert!(
            node.proc.output().iter().any(|l| l.contains("fenced:")),
            "{} did not fence during a 30 s outage",
            node.id
        );
    }
    let (status, _, body) = in_flight.await.unwrap();
    assert!(
        status == 200 || (status == 503 && body["code"] == "fenced"),
        "the chat in flight: {status} {body}"
    );
    coordinator.wait_nodes_online(2).await;
    coordinator.wait_running(2).await;
    poll("each agent hosted by exactly one node", WAIT, || async {
        let mut hosted = Vec::new();
        for node in &nodes {
            let (status, body) = node.get("/v1/agents").await;
            assert_eq!(status, 200, "{body}");
            for a in body["agents"].as_array().unwrap() {
                hosted.push(a["name"].as_str().unwrap().to_owned());
            }
        }
        hosted.sort();
        (hosted == ["o1", "o2"]).then_some(())
    })
    .await;
    for name in ["o1", "o2"] {
        let (status, _, body) = chat(name, "after the outage").await;
        assert_eq!(status, 200, "{body}");
    }
    let stale: Vec<_> = commands
        .messages()
        .into_iter()
        .flat_map(|m| m.each())
        .filter(|turn| {
            let last = turn["messages"].as_array().and_then(|m| m.last()).cloned();
            turn["type"] == "turn" && last.is_some_and(|l| l["content"] == "before the outage")
        })
        .collect();
    assert!(
        stale.is_empty(),
        "stale turns delivered: {:?}",
        stale.iter().map(|m| m.to_string()).collect::<Vec<_>>()
    );
}

/// A node stops the running turn of an agent it releases (a delete here; a
/// drain past its deadline releases busy agents the same way) before it
/// acknowledges: its Ollama call is cancelled at once, so a job being run
/// there cannot start elsewhere while it still generates.
#[tokio::test(flavor = "multi_thread")]
async fn releasing_an_agent_stops_its_running_generation_at_once() {
    let broker = Mosquitto::start();
    let sim = Sim::start(&["--first-token-ms", "20000"]);
    let coordinator = Coordinator::start(&broker, "");
    let _node = Node::start("rel", &broker, &sim.url, "agent_capacity = 1", "");
    coordinator.wait_nodes_online(1).await;
    coordinator.spawn_agent("busy", "llama3.2").await;
    coordinator.wait_running(1).await;
    coordinator
        .submit_job("busy", json!({"message": "a long one"}))
        .await;
    wait_until_async("Ollama to be generating", WAIT, || async {
        sim.stats().await["running"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
    })
    .await;
    let released = Instant::now();
    let (status, body) = coordinator.delete("/v1/agents/busy").await;
    assert_eq!(status, 200, "{body}");
    wait_until_async("the generation to be stopped", WAIT, || async {
        let stats = sim.stats().await;
        stats["running"] == json!([]) && stats["cancelled"] == 1
    })
    .await;
    assert!(
        released.elapsed() < Duration::from_secs(3),
        "{:?}",
        released.elapsed()
    );
}

/// A broker restart of 2 s at default settings (heartbeat 2 s, lease 7 s,
/// keep-alive 15 s, node_lost_after 9 s) moves no agent.
#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_of_2_s_at_defaults_moves_nothing() {
    let mut broker = Mosquitto::start();
    let sim = Sim::start(&[]);
    let coordinator = Coordinator::start(
        &broker,
        "[mqtt]\nkeep_alive_secs = 15\n[timeouts]\nnode_lost_after_secs = 9",
    );
    let top = "agent_capacity = 2\nheartbeat_secs = 2";
    let defaults = "[mqtt]\nkeep_alive_secs = 15";
    let _nodes = [
        Node::start("rs-1", &broker, &sim.url, top, defaults),
        Node::start("rs-2", &broker, &sim.url, top, defaults),
    ];
    coordinator.wait_nodes_online(2).await;
    for name in ["r1", "r2", "r3"] {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(3).await;
    let before = coordinator.placement().await;
    let events_before = coordinator.events().await.len();
    tokio::task::block_in_place(|| broker.restart_after(Duration::from_secs(2)));
    coordinator.wait_nodes_online(2).await;
    // Longer than the nodes' lease and the coordinator's node_lost_after.
    tokio::time::sleep(Duration::from_secs(10)).await;
    for name in ["r1", "r2", "r3"] {
        let (status, body) = coordinator
            .post(
                "/v1/chat",
                json!({"agent": name, "messages": [{"role": "user", "content": "still there?"}]}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(coordinator.placement().await, before);
    let events = coordinator.events().await;
    let moved: Vec<_> = events[events_before..]
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::NodeLost
                    | EventKind::Placed
                    | EventKind::Moving
                    | EventKind::Released
                    | EventKind::Vanished
            )
        })
        .collect();
    assert!(
        moved.is_empty(),
        "a 2 s broker restart moved agents: {moved:#?}"
    );
}
