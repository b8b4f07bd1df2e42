//! `pifleet bench takeover`: two coordinators on one PostgreSQL store, a
//! node and a few agents; the leader is killed with SIGKILL RUNS times
//! (started again each time, as a follower) and each time the bench times
//! how long until the other one leads (its `/ready` says so) and until a
//! chat is answered again through it. Issue 17's target: a median ≤ 5 s
//! at default settings (docs/HA.md).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{progress, quantile, round3, Api, BenchError, Stack};

#[derive(Debug, clap::Args)]
pub struct TakeoverArgs {
    /// The PostgreSQL database both coordinators share (postgres://…);
    /// docs/BENCHMARKS.md shows how to start a private one.
    #[arg(long)]
    store_url: String,
    /// Leaders killed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Agents running meanwhile.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000))]
    agents: u32,
}

/// `/ready` of `api`: (status, role).
async fn role(api: &Api) -> (u16, String) {
    match api.send(reqwest::Method::GET, "/ready", None).await {
        Ok((status, body)) => (status, body["role"].as_str().unwrap_or("").to_owned()),
        Err(_) => (0, String::new()),
    }
}

pub async fn bench(args: &TakeoverArgs, stack: &mut Stack) -> Result<Value, BenchError> {
    stack.store_url = Some(args.store_url.clone());
    let mqtt = stack.mosquitto()?;
    let sim = stack.simulator(0)?;
    // Two slots: a (name, API) each; the killed one starts again under a
    // new name (a process name is its log file).
    let (first, _) = stack.coordinator_as("coordinator-0", &mqtt, "", true)?;
    let (second, _) = stack.coordinator_as("coordinator-1", &mqtt, "", false)?;
    stack.wait_log("coordinator-1", "following coordinator")?;
    stack.node("bench-node-1", &mqtt, &sim, args.agents, 100)?;
    let mut slots = [
        ("coordinator-0".to_owned(), first),
        ("coordinator-1".to_owned(), second),
    ];
    let api = Api::new(&slots[0].1, None, 4);
    api.wait_for("the node online", Duration::from_secs(60), |s| {
        s.summary.nodes_online >= 1
    })
    .await?;
    api.spawn("takeover", args.agents as usize, "llama3.2")
        .await?;
    let want = args.agents as usize;
    api.wait_for("the agents to run", Duration::from_secs(60), |s| {
        s.summary.agents_running >= want
    })
    .await?;

    let (mut to_lead, mut to_chat) = (Vec::new(), Vec::new());
    for run in 1..=args.runs {
        let mut leader = None;
        for (i, (_, url)) in slots.iter().enumerate() {
            if role(&Api::new(url, None, 1)).await == (200, "leader".to_owned()) {
                leader = Some(i);
            }
        }
        let leader = leader.ok_or_else(|| BenchError::new("no coordinator leads"))?;
        let other =
            Api::new(&slots[1 - leader].1, None, 4).polling_every(Duration::from_millis(20));
        stack.signal(&slots[leader].0, rustix::process::Signal::KILL)?;
        let killed = Instant::now();
        while role(&other).await != (200, "leader".to_owned()) {
            if killed.elapsed() > Duration::from_secs(60) {
                return Err(BenchError::new("no takeover within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let led = killed.elapsed();
        let body = json!({"agent": "takeover-1", "messages": [{"role": "user", "content": "are you there?"}]});
        loop {
            if let Ok((200, _)) = other
                .send(reqwest::Method::POST, "/v1/chat", Some(&body))
                .await
            {
                break;
            }
            if killed.elapsed() > Duration::from_secs(60) {
                return Err(BenchError::new("no chat answered within 60 s of the kill"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let chatted = killed.elapsed();
        progress(format!(
            "run {run}: the follower led {:.2} s after the kill, answered a chat after {:.2} s",
            led.as_secs_f64(),
            chatted.as_secs_f64()
        ));
        to_lead.push(led.as_secs_f64());
        to_chat.push(chatted.as_secs_f64());
        // The killed one back, as a follower (with a fresh API port).
        let name = format!("coordinator-{}", run + 1);
        let (url, _) = stack.coordinator_as(&name, &mqtt, "", false)?;
        stack.wait_log(&name, "following coordinator")?;
        slots[leader] = (name, url);
    }
    let (mut lead_sorted, mut chat_sorted) = (to_lead.clone(), to_chat.clone());
    lead_sorted.sort_by(f64::total_cmp);
    chat_sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "bench": "takeover",
        "runs": args.runs,
        "agents": args.agents,
        "lease_secs": 3,
        "leader_after_kill_s": to_lead.iter().map(|s| round3(*s)).collect::<Vec<_>>(),
        "median_leader_after_kill_s": round3(quantile(&lead_sorted, 0.5)),
        "median_first_chat_after_kill_s": round3(quantile(&chat_sorted, 0.5)),
    }))
}
