//! The core driven in-process: no broker, no processes, no clock. A test
//! plays the nodes (they acknowledge commands and announce their capacity
//! as the node daemon does) and moves time by hand, 250 ms per step like the
//! daemon's tick.

use super::*;
use crate::coordinator::store::tests::Place;
use crate::protocol::{AckItem, CpuInfo, ListDigest, MemoryInfo};

const STEP: Duration = Duration::from_millis(250);

/// A node as the core sees it through MQTT.
#[derive(Default)]
struct SimNode {
    capacity: u32,
    hosted: BTreeSet<String>,
    /// Announces its capacity every second and answers commands.
    alive: bool,
    /// Acknowledges assignments (a node that does not is "mute").
    acks_assign: bool,
    draining: bool,
    seq: u64,
    /// Its list travels apart from its heartbeats (docs/PROTOCOL.md,
    /// "Agent lists"), at revision `rev`.
    long: bool,
    rev: u64,
    /// Commands to it are lost (but `list_agents`).
    deaf: bool,
    /// Turns received and not answered yet.
    turns: Vec<Command>,
    /// Turns the coordinator cancelled, by command id.
    cancelled: Vec<String>,
    /// It says it reads batches of commands.
    batches: bool,
}

struct Sim {
    c: Coordinator,
    now: Now,
    nodes: BTreeMap<String, SimNode>,
    /// Every command sent, in order: (node, command).
    sent: Vec<(String, Command)>,
    /// The ids of the commands sent that may go in a batch.
    batchable: Vec<String>,
    steps: u64,
    place: Place,
}

impl Sim {
    fn new(tweak: impl FnOnce(&mut CoordinatorConfig)) -> Sim {
        let place = Place::from_env();
        let mut config = CoordinatorConfig::with_defaults("unused.db".into());
        config.scheduler.rebalance_threshold = 0.0;
        tweak(&mut config);
        let store = place.open(config.history_limit);
        let now = Now::system();
        let metrics = Arc::new(CoordinatorMetrics::new());
        let mut c = Coordinator::load(config, store, now, metrics).unwrap();
        c.on_subscribed(now);
        Sim {
            c,
            now,
            nodes: BTreeMap::new(),
            sent: Vec::new(),
            batchable: Vec::new(),
            steps: 0,
            place,
        }
    }

    /// A node that comes online with `capacity` slots.
    fn join(&mut self, node: &str, capacity: u32) {
        self.nodes.insert(
            node.to_owned(),
            SimNode {
                capacity,
                alive: true,
                acks_assign: true,
                ..SimNode::default()
            },
        );
        self.c.on_status(node, b"online", false, self.now);
        self.announce(node);
    }

    fn announce(&mut self, node: &str) {
        let n = self.nodes.get_mut(node).unwrap();
        n.seq += 1;
        let capacity = Capacity {
            node: node.to_owned(),
            session: format!("{node}-session"),
            seq: n.seq,
            version: "test".into(),
            arch: "aarch64".into(),
            agent_capacity: n.capacity,
            agents_running: n.hosted.len() as u32,
            agents: (!n.long).then(|| n.hosted.iter().cloned().collect()),
            agents_rev: if n.long { n.rev } else { n.seq },
            agents_digest: ListDigest::of(n.hosted.iter().map(String::as_str)),
            cpu: CpuInfo {
                cores: 4,
                load1: 0.0,
                usage_pct: 0.0,
            },
            memory: MemoryInfo {
                total_bytes: 1 << 32,
                available_bytes: 1 << 31,
            },
            temperature_c: None,
            throttled: None,
            models: vec!["llama3.2:latest".into()],
            ollama_reachable: true,
            labels: BTreeMap::new(),
            draining: n.draining,
            // A node clock that runs backwards: the core must order
            // reports by session and seq and never look at `ts`.
            ts: 1_000_000_000_000 - n.seq,
            max_temperature_c: None,
            max_parallel: 1,
            turns_in_flight: n.turns.len() as u32,
            generation: self.c.generation,
            fence_ms: 7000,
            batches: n.batches,
        };
        self.c
            .on_capacity(node, &encode(&capacity), false, self.now);
        self.deliver();
    }

    /// One tick of the daemon: time passes, the core reconciles, nodes
    /// answer what they were sent and announce themselves once a second.
    fn step(&mut self) {
        self.steps += 1;
        self.now = self.now.after(STEP);
        self.c.reconcile(self.now);
        self.deliver();
        if self.steps.is_multiple_of(4) {
            let alive: Vec<String> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.alive)
                .map(|(id, _)| id.clone())
                .collect();
            for node in alive {
                self.announce(&node);
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        for _ in 0..d.as_millis() / STEP.as_millis() {
            self.step();
        }
    }

    /// Steps until `done` holds; fails after `limit` of simulated time.
    fn run_until(&mut self, what: &str, limit: Duration, done: impl Fn(&Sim) -> bool) {
        let start = self.now.at;
        while !done(self) {
            assert!(
                self.now.at.duration_since(start) < limit,
                "{what}: not within {limit:?}; agents {:?}; events {:?}",
                self.placement(),
                self.kinds()
            );
            self.step();
        }
    }

    /// Hands what the core published to the nodes it is for, and their
    /// replies back, until nothing is left to answer.
    fn deliver(&mut self) {
        loop {
            let outbox = self.c.take_outbox();
            if outbox.is_empty() {
                return;
            }
            for m in outbox {
                let Some((node, NodeTopic::Command)) = self.c.topics.parse_node_topic(&m.topic)
                else {
                    continue;
                };
                let node = node.to_owned();
                let command: Command = serde_json::from_slice(&m.payload).unwrap();
                if m.batch {
                    self.batchable.push(command.id.clone());
                }
                self.sent.push((node.clone(), command.clone()));
                self.answer(&node, command);
            }
        }
    }

    fn answer(&mut self, node: &str, command: Command) {
        let Some(n) = self.nodes.get_mut(node).filter(|n| n.alive) else {
            return;
        };
        if matches!(command.body, CommandBody::ListAgents) && n.long {
            n.seq += 1;
            n.rev = n.seq;
            let update = AgentUpdate {
                node: node.to_owned(),
                session: format!("{node}-session"),
                seq: n.seq,
                base: None,
                added: n.hosted.iter().cloned().collect(),
                removed: vec![],
                digest: ListDigest::of(n.hosted.iter().map(String::as_str)),
                more: false,
            };
            self.c.on_agents(node, &encode(&update), self.now);
            return;
        }
        if n.deaf {
            return;
        }
        let (kind, agent, placement, ok) = match &command.body {
            CommandBody::Assign { agent, placement } => {
                if !n.acks_assign {
                    return;
                }
                let room = (n.hosted.len() as u32) < n.capacity;
                if room {
                    n.hosted.insert(agent.name.clone());
                }
                (CommandKind::Assign, agent.name.clone(), *placement, room)
            }
            CommandBody::Release { agent, placement } => {
                n.hosted.remove(agent);
                (CommandKind::Release, agent.clone(), *placement, true)
            }
            CommandBody::Drain { draining } => {
                n.draining = *draining;
                return;
            }
            CommandBody::Turn(_) => {
                n.turns.push(command);
                return;
            }
            CommandBody::Cancel { turn, .. } => {
                n.turns.retain(|t| t.id != *turn);
                n.cancelled.push(turn.clone());
                return;
            }
            CommandBody::AssignBatch { agents } => {
                if !n.acks_assign {
                    return;
                }
                let acks = agents
                    .iter()
                    .map(|a| {
                        let room = (n.hosted.len() as u32) < n.capacity;
                        if room {
                            n.hosted.insert(a.agent.name.clone());
                        }
                        AckItem {
                            agent: a.agent.name.clone(),
                            placement: a.placement,
                            ok: room,
                            reason: (!room).then(|| "full".to_owned()),
                        }
                    })
                    .collect();
                let batch = AckBatch {
                    command: CommandKind::Assign,
                    acks,
                    agents_running: n.hosted.len() as u32,
                    ts: 0,
                    seq: n.seq,
                };
                self.reply(node, &command.id, ReplyBody::AckBatch(batch));
                return;
            }
            CommandBody::Pull { .. } | CommandBody::ListAgents => return,
        };
        let ack = Ack {
            command: kind,
            agent: Some(agent),
            placement: Some(placement),
            ok,
            reason: (!ok).then(|| "full".to_owned()),
            agents_running: n.hosted.len() as u32,
            ts: 0,
            seq: n.seq,
        };
        self.reply(node, &command.id, ReplyBody::Ack(ack));
    }

    fn reply(&mut self, node: &str, id: &str, body: ReplyBody) {
        let reply = Reply {
            id: id.to_owned(),
            node: node.to_owned(),
            session: format!("{node}-session"),
            generation: self.c.generation,
            body,
        };
        self.c.on_reply(node, &encode(&reply), self.now);
    }

    /// Submits a job "work" to `agent` and delivers its turn; its id.
    fn submit(&mut self, agent: &str) -> String {
        let id = self
            .c
            .submit_job(agent, "work".into(), 0, self.now)
            .unwrap()
            .job_id;
        self.deliver();
        id
    }

    /// Answers the oldest unanswered turn on `node` with `content`, inside
    /// a store batch as the daemon does; the batch's outcome.
    fn answer_turn_in_batch(&mut self, node: &str, content: &str) -> Result<(), StoreError> {
        let turn = self.nodes.get_mut(node).unwrap().turns.remove(0);
        let CommandBody::Turn(request) = &turn.body else {
            unreachable!()
        };
        let result = TurnResult {
            agent: request.agent.clone(),
            ok: true,
            model: None,
            message: Some(ChatMessage::new(Role::Assistant, content)),
            usage: None,
            error: None,
            job: request.job.clone(),
            chunks: 0,
        };
        self.c.begin_batch();
        self.reply(node, &turn.id, ReplyBody::TurnResult(result));
        let outcome = self.c.end_batch();
        self.deliver();
        outcome
    }

    /// Answers the oldest unanswered turn on `node` with a failure.
    fn fail_turn(&mut self, node: &str, code: TurnErrorCode) {
        let turn = self.nodes.get_mut(node).unwrap().turns.remove(0);
        let CommandBody::Turn(request) = &turn.body else {
            unreachable!()
        };
        let result = TurnResult::failed(&request.agent, request.job.clone(), code, "test".into());
        self.reply(node, &turn.id, ReplyBody::TurnResult(result));
        self.deliver();
    }

    fn spawn(&mut self, names: &[&str]) {
        for name in names {
            let spec = AgentSpec {
                name: (*name).to_owned(),
                model: "llama3.2:latest".into(),
                system: None,
                labels: BTreeMap::new(),
            };
            self.c.create_agent(spec, self.now).unwrap();
        }
    }

    /// Running agents per node.
    fn placement(&self) -> BTreeMap<String, Vec<String>> {
        let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (name, a) in &self.c.agents {
            if a.state == AgentState::Running {
                map.entry(a.node.clone().unwrap_or_default())
                    .or_default()
                    .push(name.clone());
            }
        }
        map
    }

    fn running_on(&self, node: &str) -> usize {
        self.placement().get(node).map_or(0, Vec::len)
    }

    fn kinds(&self) -> Vec<&'static str> {
        self.c.events.iter().map(|e| e.kind.as_str()).collect()
    }

    fn commands_to(&self, node: &str, kind: CommandKind) -> usize {
        self.sent
            .iter()
            .filter(|(n, c)| n == node && c.body.kind() == kind)
            .count()
    }
}

const MINUTE: Duration = Duration::from_secs(60);

/// Three agents on `a`, then `b` (same size) joins.
fn three_on_a_then_b(tweak: impl FnOnce(&mut CoordinatorConfig)) -> Sim {
    let mut sim = Sim::new(tweak);
    sim.join("a", 4);
    sim.spawn(&["x", "y", "z"]);
    sim.run_until("all on a", MINUTE, |s| s.running_on("a") == 3);
    sim.join("b", 4);
    sim
}

/// Drains `a` with `max_parallel`; returns the most agents seen in motion
/// off `a` at once.
fn drain_three(max_parallel: usize) -> (Sim, usize) {
    let mut sim = three_on_a_then_b(|_| {});
    sim.c.drain("a", Some(max_parallel), None, sim.now).unwrap();
    let mut most = 0;
    let deadline = sim.now.at + MINUTE;
    while sim.running_on("b") < 3 {
        assert!(sim.now.at < deadline, "not drained: {:?}", sim.placement());
        sim.step();
        let in_motion = sim
            .c
            .agents
            .values()
            .filter(|a| a.moving_from.as_deref() == Some("a") && a.state != AgentState::Running)
            .count();
        most = most.max(in_motion);
    }
    (sim, most)
}

#[test]
fn a_drain_moves_at_most_max_parallel_agents_at_a_time() {
    let (mut sim, most) = drain_three(1);
    assert_eq!(most, 1);
    sim.run_for(Duration::from_secs(1));
    assert!(sim.kinds().contains(&"drained"), "{:?}", sim.kinds());
    assert_eq!(sim.commands_to("a", CommandKind::Release), 3);
    // The same drain with room for all three moves them together.
    assert_eq!(drain_three(3).1, 3);
}

#[test]
fn a_drain_waits_for_busy_agents_until_its_deadline_then_moves_them_all() {
    let mut sim = three_on_a_then_b(|_| {});
    // Two agents are busy: their turns stay unanswered on a.
    let mut chats = Vec::new();
    for name in ["x", "y"] {
        let (tx, rx) = oneshot::channel();
        sim.c.chat(
            name,
            ChatCall::remembered(vec![ChatMessage::new(Role::User, "hi")]),
            tx,
            sim.now,
        );
        chats.push(rx);
    }
    sim.deliver();
    assert_eq!(sim.nodes["a"].turns.len(), 2);
    let deadline = Some(Duration::from_secs(30));
    sim.c.drain("a", Some(3), deadline, sim.now).unwrap();
    sim.run_for(Duration::from_secs(29));
    // The idle one moved; the busy ones stay until the deadline.
    assert_eq!(sim.placement()["b"], ["z"]);
    assert_eq!(sim.running_on("a"), 2);
    sim.run_until("deadline moves the rest", Duration::from_secs(5), |s| {
        s.running_on("b") == 3
    });
    // Their chats are told to try again: the turns were cut short.
    for mut rx in chats {
        let answer = rx.try_recv().expect("answered");
        let error = answer.expect_err("a chat cut short by the drain");
        assert!(
            matches!(
                error,
                CoreError::Turn {
                    code: TurnErrorCode::Released,
                    retry_after_secs: Some(_),
                    ..
                }
            ),
            "{error:?}"
        );
    }
}

#[test]
fn rebalancing_stops_within_the_threshold_and_does_not_bounce() {
    let mut sim = Sim::new(|c| {
        c.scheduler.rebalance_threshold = 1.5;
        c.scheduler.rebalance_max_moves = 2;
    });
    sim.join("a", 10);
    let names: Vec<String> = (0..6).map(|i| format!("r{i}")).collect();
    sim.spawn(&names.iter().map(String::as_str).collect::<Vec<_>>());
    sim.run_until("all on a", MINUTE, |s| s.running_on("a") == 6);
    sim.join("b", 10);
    sim.run_until("two moved", MINUTE, |s| s.running_on("b") == 2);
    // 4/10 against a fleet average of 3/10 is within 1.5x: nothing more
    // moves, then or later.
    sim.run_for(5 * MINUTE);
    assert_eq!((sim.running_on("a"), sim.running_on("b")), (4, 2));
    assert_eq!(sim.commands_to("a", CommandKind::Release), 2);
    assert_eq!(sim.commands_to("b", CommandKind::Release), 0);
}

#[test]
fn a_stray_on_a_node_whose_long_list_does_not_change_is_released_again_while_it_stays() {
    let mut sim = Sim::new(|_| {});
    sim.join("big", 10);
    let n = sim.nodes.get_mut("big").unwrap();
    (n.long, n.deaf) = (true, true);
    n.hosted.insert("ghost".into());
    // Its heartbeats say "unchanged" once the coordinator has the list;
    // the releases are lost.
    sim.run_until("ghost released", MINUTE, |s| {
        s.commands_to("big", CommandKind::Release) >= 1
    });
    let first = sim.now.at;
    sim.run_until("ghost released again", MINUTE, |s| {
        s.commands_to("big", CommandKind::Release) >= 2
    });
    let again = sim.now.at.duration_since(first);
    assert!(
        again < Duration::from_secs(8),
        "released again after {again:?}"
    );
    assert!(sim.commands_to("big", CommandKind::ListAgents) >= 1);
}

#[test]
fn a_node_that_does_not_confirm_an_assignment_in_time_loses_it() {
    let mut sim = Sim::new(|c| c.timeouts.assign_ack = Duration::from_secs(10));
    sim.join("mute", 4);
    sim.nodes.get_mut("mute").unwrap().acks_assign = false;
    sim.spawn(&["x"]);
    sim.run_for(Duration::from_secs(9));
    assert_eq!(sim.c.agents["x"].state, AgentState::Assigned);
    sim.join("ok", 4);
    sim.run_until("placed on ok", Duration::from_secs(5), |s| {
        s.running_on("ok") == 1
    });
    assert!(sim.kinds().contains(&"assign_timeout"), "{:?}", sim.kinds());
    // The late node is told to let it go, in case it does hold it.
    assert_eq!(sim.commands_to("mute", CommandKind::Release), 1);
}

#[test]
fn a_silent_node_is_lost_after_node_lost_after_but_its_agents_move_only_once_it_has_fenced() {
    // Lost after 5 s of silence, but the node announced a 7 s fence: its
    // agents may still run there until 7 s after it was last heard.
    let mut sim = three_on_a_then_b(|c| c.timeouts.node_lost_after = Duration::from_secs(5));
    sim.run_for(Duration::from_secs(10));
    assert_eq!(sim.running_on("a"), 3, "a healthy node keeps its agents");
    sim.announce("a");
    let last_heard = sim.now.at;
    sim.nodes.get_mut("a").unwrap().alive = false; // cut off: no last will
    sim.run_until("a lost", Duration::from_secs(6), |s| {
        s.kinds().contains(&"node_lost")
    });
    while sim.now.at < last_heard + Duration::from_millis(7400) {
        assert_eq!(
            sim.running_on("b"),
            0,
            "placed elsewhere {:?} after a was last heard, before its 7 s fence",
            sim.now.at - last_heard
        );
        sim.step();
    }
    sim.run_until("moved to b", Duration::from_secs(2), |s| {
        s.running_on("b") == 3
    });
    assert_eq!(sim.kinds().iter().filter(|k| **k == "node_lost").count(), 1);
}

#[test]
fn an_agent_its_node_stops_listing_is_placed_again_whatever_the_node_clock_says() {
    // The sim's node clock runs backwards (see `announce`): only `seq`
    // tells that the report without the agent is newer than its ack.
    let mut sim = one_running_on_a();
    sim.run_for(Duration::from_secs(2));
    sim.nodes.get_mut("a").unwrap().hosted.clear(); // the node dropped it
    sim.announce("a");
    assert!(sim.kinds().contains(&"vanished"), "{:?}", sim.kinds());
    sim.run_until("hosted again", MINUTE, |s| s.running_on("a") == 1);
}

#[test]
fn a_job_turn_whose_answer_the_node_forgot_runs_again_at_once_as_the_same_attempt() {
    let mut sim = one_running_on_a();
    let id = sim.submit("x");
    let turns = |sim: &Sim| sim.commands_to("a", CommandKind::Turn);
    assert_eq!(turns(&sim), 1);
    sim.fail_turn("a", TurnErrorCode::Forgotten);
    assert_eq!(turns(&sim), 2, "sent again without waiting for its timeout");
    let job = sim.c.job(&id).unwrap();
    assert_eq!((job.status, job.attempts), (JobState::Running, 1));
}

/// Batches (docs/PROTOCOL.md): turn commands may be batched only to a node
/// that says it reads batches, and a batch of results answers every turn.
#[test]
fn turns_are_batched_only_to_a_node_that_reads_batches_and_a_batch_of_results_ends_each() {
    let mut sim = Sim::new(|_| {});
    sim.join("a", 2);
    sim.join("b", 2);
    sim.nodes.get_mut("a").unwrap().batches = true;
    sim.announce("a");
    sim.spawn(&["w", "x", "y", "z"]);
    sim.run_until("running", MINUTE, |s| {
        s.running_on("a") == 2 && s.running_on("b") == 2
    });
    let jobs: Vec<String> = ["w", "x", "y", "z"].iter().map(|a| sim.submit(a)).collect();
    let turns_to = |sim: &Sim, node: &str| -> Vec<String> {
        sim.sent
            .iter()
            .filter(|(n, c)| n == node && c.body.kind() == CommandKind::Turn)
            .map(|(_, c)| c.id.clone())
            .collect()
    };
    let (on_a, on_b) = (turns_to(&sim, "a"), turns_to(&sim, "b"));
    assert_eq!((on_a.len(), on_b.len()), (2, 2));
    assert!(on_a.iter().all(|id| sim.batchable.contains(id)), "{on_a:?}");
    assert!(
        !on_b.iter().any(|id| sim.batchable.contains(id)),
        "{on_b:?}"
    );
    // Both results of node a in one message.
    let results: Vec<String> = sim.nodes["a"]
        .turns
        .iter()
        .map(|turn| {
            let CommandBody::Turn(request) = &turn.body else {
                unreachable!()
            };
            let reply = Reply {
                id: turn.id.clone(),
                node: "a".into(),
                session: "a-session".into(),
                generation: sim.c.generation,
                body: ReplyBody::TurnResult(TurnResult {
                    agent: request.agent.clone(),
                    ok: true,
                    model: None,
                    message: Some(ChatMessage::new(Role::Assistant, "done")),
                    usage: None,
                    error: None,
                    job: request.job.clone(),
                    chunks: 0,
                }),
            };
            String::from_utf8(encode(&reply)).unwrap()
        })
        .collect();
    assert_eq!(results.len(), 2);
    sim.nodes.get_mut("a").unwrap().turns.clear();
    let batch = format!("[{}]", results.join(","));
    sim.c.begin_batch();
    sim.c.on_reply("a", batch.as_bytes(), sim.now);
    sim.c.end_batch().unwrap();
    let done: Vec<JobState> = jobs
        .iter()
        .map(|id| sim.c.job(id).unwrap().status)
        .collect();
    let completed = done.iter().filter(|s| **s == JobState::Completed).count();
    assert_eq!(completed, 2, "{done:?}");
}

#[test]
fn a_last_will_moves_the_agents_after_offline_grace_without_waiting_for_the_fence() {
    let mut sim = three_on_a_then_b(|_| {});
    sim.run_for(Duration::from_secs(10));
    sim.nodes.get_mut("a").unwrap().alive = false; // kill -9: the broker sends the will
    sim.c.on_status("a", b"offline", false, sim.now);
    sim.run_until("moved to b", Duration::from_secs(2), |s| {
        s.running_on("b") == 3
    });
}

#[test]
fn a_job_is_retried_up_to_max_attempts_and_not_for_a_missing_model() {
    let mut sim = Sim::new(|c| c.queue.max_attempts = 3);
    sim.join("a", 2);
    sim.spawn(&["x"]);
    sim.run_until("running", MINUTE, |s| s.running_on("a") == 1);
    let status = |sim: &Sim, id: &str| {
        let job = sim.c.job(id).unwrap();
        (job.status, job.attempts)
    };
    let submitted = sim.c.submit_job("x", "work".into(), 0, sim.now).unwrap();
    let id = submitted.job_id;
    sim.deliver();
    for attempt in 1..=3 {
        assert_eq!(status(&sim, &id), (JobState::Running, attempt));
        sim.fail_turn("a", TurnErrorCode::OllamaError);
    }
    assert_eq!(status(&sim, &id), (JobState::Failed, 3));

    let submitted = sim.c.submit_job("x", "other".into(), 0, sim.now).unwrap();
    let id = submitted.job_id;
    sim.deliver();
    sim.fail_turn("a", TurnErrorCode::ModelMissing);
    assert_eq!(status(&sim, &id), (JobState::Failed, 1));
}

fn one_running_on_a() -> Sim {
    let mut sim = Sim::new(|_| {});
    sim.join("a", 2);
    sim.spawn(&["x"]);
    sim.run_until("running", MINUTE, |s| s.running_on("a") == 1);
    sim
}

#[test]
fn api_requests_are_data_logged_replayed_and_answered_only_after_their_batch_commits() {
    let mut sim = Sim::new(|_| {});
    let spec = AgentSpec {
        name: "rec".into(),
        model: "llama3.2:latest".into(),
        system: None,
        labels: BTreeMap::new(),
    };
    let (reply, mut created) = oneshot::channel();
    let request = ApiRequest::CreateAgent { spec, reply };
    assert!(format!("{request:?}").starts_with("CreateAgent(AgentSpec { name: \"rec\""));
    sim.c.begin_batch();
    sim.c.handle(request, sim.now);
    assert!(created.try_recv().is_err(), "no answer before the commit");
    sim.c.end_batch().unwrap();
    assert_eq!(created.try_recv().unwrap().unwrap().name, "rec");
    // The same request replayed: refused as a duplicate, as a client would see.
    let (reply, mut again) = oneshot::channel();
    let spec = sim.c.agents["rec"].spec.clone();
    sim.c
        .handle(ApiRequest::CreateAgent { spec, reply }, sim.now);
    assert!(matches!(
        again.try_recv().unwrap(),
        Err(CoreError::Conflict { .. })
    ));
}

mod pulls;
mod store_faults;
mod streaming;
