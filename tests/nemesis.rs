//! Issue 14: the nemesis. A seeded random schedule of faults runs against
//! three real nodes (each with its own Ollama simulator and its broker link
//! through a proxy), a real coordinator and a real Mosquitto, under
//! continuous chats and jobs: `kill -9` and restart of a node, a freeze
//! (SIGSTOP of node and Ollama), a partition (blackholed link), a slow link
//! (every chunk delayed), a broker restart, a node's clock stepped by hours
//! either way (libfaketime), the coordinator's store disk full (a tmpfs),
//! while each node's clock is already off by a random offset.
//!
//! Then the history checker: what the nodes themselves held and ran,
//! sampled every 15 ms (their own agent lists, their Ollama's running
//! generations), and the store's histories, must show that no agent was
//! hosted or generating on two nodes at any sample; every chat was answered
//! once or failed with a retryable error; every accepted job completed once;
//! every agent's history holds exactly its answered turns, chats in order.
//!
//! Five seeds of about a minute run in the test command; `scripts/test.sh
//! --long` sets PIFLEET_NEMESIS_SEEDS and PIFLEET_NEMESIS_SECS for more;
//! PIFLEET_NEMESIS_SEED=N reruns one seed (a failure names its seed).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pifleet::bench::copies::{self, Machine};
use pifleet::bench::proxy::Blackhole;
use pifleet::bench::Api;
use pifleet::protocol::JobState;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::util::*;

const NODES: usize = 3;
const AGENTS: usize = 6;

/// One machine: a node process (absent while killed), its Ollama, the
/// proxy of its broker link and the file its fake clock reads.
struct Box_ {
    id: String,
    node: Option<Node>,
    sim: Sim,
    proxy: Blackhole,
    clock: tempfile::NamedTempFile,
    api_port: u16,
}

impl Box_ {
    fn start_node(&mut self, broker: &Mosquitto) {
        let clock = self.clock.path().to_str().unwrap();
        let libfaketime = crate::faults::libfaketime();
        let env = [
            ("LD_PRELOAD", libfaketime.as_str()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_TIMESTAMP_FILE", clock),
            ("FAKETIME_CACHE_DURATION", "1"),
        ];
        let sections = format!(
            "[mqtt]\nport = {}\n[api]\nlisten = \"127.0.0.1:{}\"",
            self.proxy.port, self.api_port
        );
        let top = format!("agent_capacity = {AGENTS}");
        self.node = Some(Node::start_with_env(
            &self.id,
            broker,
            &self.sim.url,
            &top,
            &sections,
            &env,
        ));
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    Kill,
    Freeze,
    Partition,
    SlowLink,
    BrokerRestart,
    ClockStep,
    DiskFull,
}

/// What the clients saw.
#[derive(Default)]
pub(crate) struct Record {
    /// Per agent, its chats in order: (content, HTTP status, error code).
    pub(crate) chats: BTreeMap<String, Vec<(String, u16, String)>>,
    /// Accepted jobs: id → (agent, message).
    pub(crate) jobs: BTreeMap<String, (String, String)>,
}

fn offset(rng: &mut StdRng) -> String {
    let hours: i32 = rng.random_range(-48..=48);
    format!("{hours:+}h\n")
}

async fn run_seed(seed: u64, seconds: u64) {
    let fail = |what: String| -> ! {
        panic!("nemesis seed {seed}: {what}\n(rerun: PIFLEET_NEMESIS_SEED={seed} cargo test --test tests nemesis)")
    };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut broker = Mosquitto::start();
    let disk = crate::faults::SmallDisk::mount(32);
    let store = disk.dir.path().join("coordinator.db");
    let coordinator = Coordinator::start(
        &broker,
        &format!(
            "history_limit = 10000\n[store]\npath = \"{}\"",
            store.display()
        ),
    );
    let mut boxes = Vec::new();
    for i in 1..=NODES {
        let clock = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(clock.path(), offset(&mut rng)).unwrap();
        let mut b = Box_ {
            id: format!("nm-{i}"),
            node: None,
            sim: Sim::start(&["--tokens-per-sec", "20"]),
            proxy: Blackhole::start(broker.port).await.unwrap(),
            clock,
            api_port: free_port(),
        };
        b.start_node(&broker);
        boxes.push(b);
    }
    coordinator.wait_nodes_online(NODES as u64).await;
    let agents: Vec<String> = (1..=AGENTS).map(|i| format!("a{i}")).collect();
    for name in &agents {
        coordinator.spawn_agent(name, "llama3.2").await;
    }
    coordinator.wait_running(AGENTS).await;

    let machines = Arc::new(
        boxes
            .iter()
            .map(|b| Machine {
                node: b.id.clone(),
                api: Api::new(&format!("http://127.0.0.1:{}", b.api_port), None, 2),
                sim: Api::new(&b.sim.url, None, 2),
            })
            .collect::<Vec<_>>(),
    );
    // The system prompt names the agent: `You are a1.` (spawn_agent).
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(copies::watch(
        machines.clone(),
        Duration::from_millis(15),
        stopped.clone(),
    ));
    let record = Arc::new(Mutex::new(Record::default()));
    let api = coordinator.api.clone();
    let mut clients = Vec::new();
    for name in agents.clone() {
        clients.push(tokio::spawn(chat_loop(
            api.clone(),
            seed,
            name,
            record.clone(),
            stopped.clone(),
        )));
    }
    clients.push(tokio::spawn(job_loop(
        api.clone(),
        seed,
        agents.clone(),
        record.clone(),
        stopped.clone(),
    )));

    // The schedule.
    let start = Instant::now();
    let mut faults = Vec::new();
    // When each machine could not answer the sampler: (node, from, to).
    let mut down: Vec<(String, Instant, Instant)> = Vec::new();
    while start.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
        let fault = match rng.random_range(0..7) {
            0 => Fault::Kill,
            1 => Fault::Freeze,
            2 => Fault::Partition,
            3 => Fault::SlowLink,
            4 => Fault::BrokerRestart,
            5 => Fault::DiskFull,
            _ => Fault::ClockStep,
        };
        let i = rng.random_range(0..NODES);
        let hold = Duration::from_millis(rng.random_range(1000..12_000));
        faults.push(format!(
            "{:.1}s {fault:?} {} {hold:?}",
            start.elapsed().as_secs_f64(),
            boxes[i].id
        ));
        let b = &mut boxes[i];
        match fault {
            Fault::Kill => {
                let from = Instant::now();
                if let Some(node) = b.node.take() {
                    node.proc.signal("KILL");
                    drop(node);
                }
                tokio::time::sleep(hold / 4).await;
                b.start_node(&broker);
                down.push((b.id.clone(), from, Instant::now()));
            }
            Fault::Freeze => {
                let from = Instant::now();
                let node = b.node.as_ref().unwrap();
                node.proc.signal("STOP");
                b.sim.proc.signal("STOP");
                tokio::time::sleep(hold).await;
                b.sim.proc.signal("CONT");
                node.proc.signal("CONT");
                down.push((b.id.clone(), from, Instant::now()));
            }
            Fault::Partition => {
                b.proxy.set_cut(true);
                tokio::time::sleep(hold).await;
                b.proxy.set_cut(false);
            }
            Fault::SlowLink => {
                b.proxy
                    .set_delay(Duration::from_millis(rng.random_range(100..1500)));
                tokio::time::sleep(hold).await;
                b.proxy.set_delay(Duration::ZERO);
            }
            Fault::DiskFull => {
                disk.fill();
                tokio::time::sleep(hold).await;
                disk.free();
            }
            Fault::BrokerRestart => {
                let down = Duration::from_millis(rng.random_range(200..2000));
                tokio::task::block_in_place(|| broker.restart_after(down));
            }
            Fault::ClockStep => std::fs::write(b.clock.path(), offset(&mut rng)).unwrap(),
        }
    }
    // Healed: let the fleet settle, then stop the clients.
    coordinator.wait_nodes_online(NODES as u64).await;
    poll(
        "every agent to run once more",
        Duration::from_secs(60),
        || async {
            // (A node that does not answer: asked again at the next poll.)
            let hosted = copies::hosted(&machines, &[]).await.ok()?;
            let once = agents
                .iter()
                .all(|a| hosted.get(a).map_or(0, Vec::len) == 1);
            once.then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send_replace(true);
    for client in clients {
        let _ = client.await;
    }
    let copies = watcher.await.unwrap();
    let schedule = faults.join("\n  ");

    // The history checker.
    if copies.hosted_twice > 0 || copies.generating_twice > 0 {
        fail(format!(
            "copies at one sample: hosted twice {}, generating twice {} (e.g. {:?})\n  {schedule}",
            copies.hosted_twice, copies.generating_twice, copies.example
        ));
    }
    // A machine that did not answer counts as holding nothing: only right
    // for one that was down or frozen. Others may miss a few samples on a
    // loaded machine (200 ms each), not more.
    let slack = Duration::from_secs(2);
    let unexplained = copies
        .unanswered_at
        .iter()
        .filter(|(node, at)| {
            !down
                .iter()
                .any(|(n, from, to)| n == node && *from <= *at && *at <= *to + slack)
        })
        .count();
    if unexplained as u64 * 100 > copies.samples * NODES as u64 {
        fail(format!(
            "{unexplained} samples missed a machine that was neither down nor frozen (of {} samples of {NODES} machines): copies there went unseen",
            copies.samples
        ));
    }
    // Samples wait up to 200 ms for a frozen machine; more is a stall.
    if copies.max_gap_ms > 1000 {
        fail(format!("sampling stalled for {} ms", copies.max_gap_ms));
    }
    let record = std::mem::take(&mut *record.lock().unwrap());
    for id in record.jobs.keys() {
        let job = poll(
            "every accepted job to end",
            Duration::from_secs(90),
            || async {
                let job = coordinator.job(id).await;
                matches!(job.status, JobState::Completed | JobState::Failed).then_some(job)
            },
        )
        .await;
        if job.status != JobState::Completed {
            fail(format!("job {id} did not complete: {job:?}\n  {schedule}"));
        }
    }
    let mut answered_chats = 0;
    for name in &agents {
        let history = Coordinator::stored_user_messages(&store, name);
        let chats = record.chats.get(name).cloned().unwrap_or_default();
        for (content, status, code) in &chats {
            let stored = history.iter().filter(|h| *h == content).count();
            match status {
                200 if stored == 1 => answered_chats += 1,
                200 => fail(format!(
                    "chat {content:?} answered 200 but stored {stored} times\n  {schedule}"
                )),
                429 | 503 if stored == 0 => {}
                429 | 503 => fail(format!(
                    "chat {content:?} failed ({code}) yet stored {stored} times"
                )),
                _ => fail(format!(
                    "chat {content:?} failed with {status} {code}: not retryable\n  {schedule}"
                )),
            }
        }
        let acknowledged: Vec<&String> =
            chats.iter().filter(|c| c.1 == 200).map(|c| &c.0).collect();
        let in_history: Vec<&String> = history.iter().filter(|h| h.contains("-chat-")).collect();
        if acknowledged != in_history {
            fail(format!(
                "{name}: history {in_history:?} is not the answered chats {acknowledged:?}"
            ));
        }
        for (id, (agent, message)) in &record.jobs {
            let stored = history.iter().filter(|h| *h == message).count();
            if agent == name && stored != 1 {
                fail(format!(
                    "job {id} ({message:?}) is in {name}'s history {stored} times\n  {schedule}"
                ));
            }
        }
    }
    assert!(
        answered_chats > AGENTS && !record.jobs.is_empty(),
        "seed {seed}: too little work to judge ({answered_chats} chats, {} jobs)",
        record.jobs.len()
    );
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, status, code) in record.chats.values().flatten() {
        *outcomes.entry(format!("{status} {code}")).or_default() += 1;
    }
    eprintln!(
        "nemesis seed {seed}: {} faults, {answered_chats} chats answered, {} jobs completed, {} samples (max gap {} ms, {} machine-samples unanswered, {unexplained} of them outside a kill or freeze); chat outcomes {outcomes:?}\n  {schedule}",
        faults.len(),
        record.jobs.len(),
        copies.samples,
        copies.max_gap_ms,
        copies.unanswered
    );
}

/// Sequential chats with `agent` until `stop`.
pub(crate) async fn chat_loop(
    api: String,
    seed: u64,
    agent: String,
    record: Arc<Mutex<Record>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = Api::new(&api, None, 1);
    for n in 0.. {
        if *stop.borrow() {
            return;
        }
        let content = format!("s{seed}-{agent}-chat-{n}");
        let body = json!({"agent": agent, "messages": [{"role": "user", "content": content}]});
        // A chat under way when the run stops is still waited for: its
        // outcome is judged like any other.
        let (status, answer) = client
            .send(reqwest::Method::POST, "/v1/chat", Some(&body))
            .await
            .unwrap_or((0, serde_json::Value::Null));
        let code = answer["code"].as_str().unwrap_or("").to_owned();
        record
            .lock()
            .unwrap()
            .chats
            .entry(agent.clone())
            .or_default()
            .push((content, status, code));
        if status != 200 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A job every 1.5 s to a random agent, until `stop`.
pub(crate) async fn job_loop(
    api: String,
    seed: u64,
    agents: Vec<String>,
    record: Arc<Mutex<Record>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let client = Api::new(&api, None, 1);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6a6f6273);
    for n in 0.. {
        if *stop.borrow() {
            return;
        }
        let agent = &agents[rng.random_range(0..agents.len())];
        let message = format!("s{seed}-job-{n}");
        let body = json!({"message": message});
        let path = format!("/v1/agents/{agent}/jobs");
        if let Ok((202, answer)) = client.send(reqwest::Method::POST, &path, Some(&body)).await {
            let id = answer["job_id"].as_str().unwrap().to_owned();
            record
                .lock()
                .unwrap()
                .jobs
                .insert(id, (agent.clone(), message));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

macro_rules! seeds {
    ($($name:ident = $seed:expr),*) => {$(
        #[tokio::test(flavor = "multi_thread")]
        async fn $name() {
            if let Some(only) = env_u64("PIFLEET_NEMESIS_SEED") {
                if only != $seed {
                    return;
                }
            }
            run_seed($seed, env_u64("PIFLEET_NEMESIS_SECS").unwrap_or(60)).await;
        }
    )*};
}

seeds!(seed_1 = 1, seed_2 = 2, seed_3 = 3, seed_4 = 4, seed_5 = 5);

/// More seeds (PIFLEET_NEMESIS_SEEDS, from 6 on) for `scripts/test.sh --long`.
#[tokio::test(flavor = "multi_thread")]
async fn more_seeds_when_asked() {
    let seconds = env_u64("PIFLEET_NEMESIS_SECS").unwrap_or(60);
    // A seed of a long run, replayed alone.
    if let Some(only) = env_u64("PIFLEET_NEMESIS_SEED").filter(|s| *s > 5) {
        run_seed(only, seconds).await;
        return;
    }
    let Some(count) = env_u64("PIFLEET_NEMESIS_SEEDS") else {
        return;
    };
    if env_u64("PIFLEET_NEMESIS_SEED").is_some() {
        return; // one of seeds 1 to 5 was asked for
    }
    for seed in 6..6 + count.saturating_sub(5) {
        run_seed(seed, seconds).await;
    }
}
