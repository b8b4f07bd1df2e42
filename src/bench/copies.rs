//! Counting copies from what the nodes themselves hold, not from what the
//! coordinator believes: every node's own agent list (its HTTP API) and the
//! generations running on its Ollama (each node has its own simulator,
//! whose `/_sim/stats` lists the system prompt of every generation running;
//! the bench gives each agent its name as system prompt). A machine that
//! does not answer within [`SAMPLE_TIMEOUT`] (killed, frozen) counts as
//! holding nothing for that sample: a killed node holds nothing, and a
//! frozen machine (node and Ollama both stopped) runs nothing and fences
//! before it answers again. Such samples are counted (`unanswered`), and
//! while a machine is frozen the samples come every `SAMPLE_TIMEOUT`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::watch;

use super::{Api, BenchError};

/// How long a sample waits for each machine: long enough for a busy (or
/// just thawed) node to answer, so that it is not taken for an empty one.
pub const SAMPLE_TIMEOUT: Duration = Duration::from_millis(200);

/// One machine: a node's API and its Ollama simulator.
pub struct Machine {
    pub node: String,
    pub api: Api,
    pub sim: Api,
}

/// The worst seen over a run.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Copies {
    /// Most agents hosted by two nodes in one sample.
    pub hosted_twice: usize,
    /// Most agents generating on two nodes in one sample.
    pub generating_twice: usize,
    pub samples: u64,
    /// The longest time between two samples, in ms.
    pub max_gap_ms: u64,
    /// Agents hosted twice, by name, in the worst sample (for the report).
    pub example: Vec<String>,
    /// Machine-samples without an answer (the machine down or frozen).
    pub unanswered: u64,
    /// Which machine did not answer, when (the first 100,000): a caller
    /// that knows when machines were down can check the others answered.
    #[serde(skip)]
    pub unanswered_at: Vec<(String, Instant)>,
}

/// Samples `machines` every `every` until `stop` turns true.
pub async fn watch(
    machines: std::sync::Arc<Vec<Machine>>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) -> Copies {
    let mut copies = Copies::default();
    let mut last = Instant::now();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return copies,
        }
        let samples =
            futures_util::future::join_all(machines.iter().map(|m| sample(m, SAMPLE_TIMEOUT)))
                .await;
        let (mut hosted, mut generating) = (BTreeMap::new(), BTreeMap::new());
        let at = Instant::now();
        for (m, (answered, h, g)) in machines.iter().zip(samples) {
            if !answered {
                copies.unanswered += 1;
                if copies.unanswered_at.len() < 100_000 {
                    copies.unanswered_at.push((m.node.clone(), at));
                }
            }
            for name in h {
                *hosted.entry(name).or_insert(0usize) += 1;
            }
            for name in g {
                *generating.entry(name).or_insert(0usize) += 1;
            }
        }
        let twice = |m: &BTreeMap<String, usize>| -> Vec<String> {
            m.iter()
                .filter(|(_, &n)| n > 1)
                .map(|(a, _)| a.clone())
                .collect()
        };
        let (h, g) = (twice(&hosted), twice(&generating));
        if h.len() > copies.hosted_twice {
            copies.example = h.clone();
        }
        copies.hosted_twice = copies.hosted_twice.max(h.len());
        copies.generating_twice = copies.generating_twice.max(g.len());
        copies.samples += 1;
        let now = Instant::now();
        copies.max_gap_ms = copies.max_gap_ms.max((now - last).as_millis() as u64);
        last = now;
    }
}

/// Whether one machine answered, and what it hosts and generates now
/// (empty if it did not answer).
async fn sample(m: &Machine, limit: Duration) -> (bool, Vec<String>, Vec<String>) {
    let hosted = async {
        let v: Value = m.api.get("/v1/agents").await.ok()?;
        Some(names(&v["agents"], |a| a["name"].as_str()))
    };
    let generating = async {
        let v: Value = m.sim.get("/_sim/stats").await.ok()?;
        Some(names(&v["running"], Value::as_str))
    };
    let (h, g) = tokio::join!(
        tokio::time::timeout(limit, hosted),
        tokio::time::timeout(limit, generating)
    );
    let (h, g) = (h.ok().flatten(), g.ok().flatten());
    (
        h.is_some() && g.is_some(),
        h.unwrap_or_default(),
        g.unwrap_or_default(),
    )
}

fn names(list: &Value, name: impl Fn(&Value) -> Option<&str>) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| name(v).map(str::to_owned))
        .collect()
}

/// Every machine's own agent list, now (for the final count), but for the
/// nodes killed (`dead`). A machine that does not answer is asked again (a
/// loaded 2-core machine can take longer than a sample's limit), and one
/// that never does is an error, not a machine that hosts nothing.
pub async fn hosted(
    machines: &[Machine],
    dead: &[&str],
) -> Result<BTreeMap<String, Vec<String>>, BenchError> {
    let mut by_agent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in machines.iter().filter(|m| !dead.contains(&m.node.as_str())) {
        let mut names = None;
        for _ in 0..3 {
            let (answered, h, _) = sample(m, Duration::from_secs(2)).await;
            if answered {
                names = Some(h);
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let names = names.ok_or_else(|| {
            BenchError::new(format!(
                "node {} did not list its agents in 3 tries",
                m.node
            ))
        })?;
        for name in names {
            by_agent.entry(name).or_default().push(m.node.clone());
        }
    }
    Ok(by_agent)
}
