//! Pure scheduler throughput: placement decisions per second on a fleet of
//! 300 nodes, against a plain linear scan measured in the same run (the
//! obvious implementation, as a ratio anchor).
//!
//!     cargo bench --bench scheduler
//!
//! Results are recorded in docs/BENCHMARKS.md.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Instant;

use pifleet::coordinator::scheduler::{NodeSlots, Request, Scheduler};

const NODES: usize = 300;
const CAPACITY: u32 = 100;
const MODELS: [&str; 4] = [
    "llama3.2:latest",
    "phi3.5:latest",
    "gemma2:latest",
    "deepseek-coder:latest",
];

fn fleet() -> Vec<NodeSlots> {
    (0..NODES)
        .map(|i| NodeSlots {
            id: format!("pi-{i:03}"),
            agent_capacity: CAPACITY,
            load: 0,
            load_per_core: (i % 17) as f64 / 17.0,
            // Every node has the first model; each has one more.
            models: vec![MODELS[0].to_owned(), MODELS[1 + i % 3].to_owned()],
            labels: BTreeMap::from([("room".to_owned(), format!("r{}", i % 5))]),
            blocked: None,
        })
        .collect()
}

/// The obvious implementation: scan every node for the least-loaded one.
fn linear_place(nodes: &mut [NodeSlots], request: &Request<'_>) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, n) in nodes.iter().enumerate() {
        let fits = n.blocked.is_none()
            && n.load < n.agent_capacity
            && n.models.iter().any(|m| m == request.model)
            && request
                .labels
                .iter()
                .all(|(k, v)| n.labels.get(k) == Some(v));
        if !fits {
            continue;
        }
        let better = match best {
            None => true,
            Some(b) => {
                let o = &nodes[b];
                let (l, r) = (
                    u64::from(n.load) * u64::from(o.agent_capacity),
                    u64::from(o.load) * u64::from(n.agent_capacity),
                );
                l < r
                    || (l == r
                        && (n.agent_capacity - n.load, -n.load_per_core)
                            > (o.agent_capacity - o.load, -o.load_per_core))
            }
        };
        if better {
            best = Some(i);
        }
    }
    if let Some(b) = best {
        nodes[b].load += 1;
    }
    best
}

/// Fills the fleet `rounds` times; returns decisions per second.
fn measure(
    rounds: usize,
    labelled: bool,
    mut place: impl FnMut(&Request<'_>, bool) -> bool,
) -> f64 {
    let none = BTreeMap::new();
    let room = BTreeMap::from([("room".to_owned(), "r2".to_owned())]);
    let mut decisions = 0u64;
    let start = Instant::now();
    for round in 0..rounds {
        let slots = NODES as u32 * CAPACITY;
        for i in 0..slots {
            let model = if i % 4 == 0 {
                MODELS[1 + (i as usize / 4) % 3]
            } else {
                MODELS[0]
            };
            let labels = if labelled && i % 10 == 0 {
                &room
            } else {
                &none
            };
            let request = Request {
                model,
                labels,
                avoid: None,
            };
            black_box(place(&request, i == 0 && round > 0));
            decisions += 1;
        }
    }
    decisions as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rounds = 20;
    let mut scheduler = Scheduler::new(fleet());
    let fast = measure(rounds, false, |request, reset| {
        if reset {
            scheduler = Scheduler::new(fleet());
        }
        scheduler.place(request).is_ok()
    });
    let mut scheduler = Scheduler::new(fleet());
    let fast_labels = measure(rounds, true, |request, reset| {
        if reset {
            scheduler = Scheduler::new(fleet());
        }
        scheduler.place(request).is_ok()
    });
    let mut nodes = fleet();
    let linear = measure(2, false, |request, reset| {
        if reset {
            nodes = fleet();
        }
        linear_place(&mut nodes, request).is_some()
    });
    // Building a scheduler from the fleet view happens once per
    // reconciliation pass: time it too.
    let start = Instant::now();
    for _ in 0..1000 {
        black_box(Scheduler::new(black_box(fleet())));
    }
    let build_us = start.elapsed().as_secs_f64() * 1e6 / 1000.0;

    println!(
        "scheduler, {NODES} nodes x {CAPACITY} slots, filling the fleet repeatedly (mixed models)"
    );
    println!(
        "  ordered set (pifleet):          {:>12.0} decisions/s",
        fast
    );
    println!(
        "  ordered set, 10% with labels:   {:>12.0} decisions/s",
        fast_labels
    );
    println!(
        "  linear scan (baseline):         {:>12.0} decisions/s",
        linear
    );
    println!("  ratio pifleet / linear scan:    {:>12.1}x", fast / linear);
    println!("  building the scheduler (incl. the fleet vector): {build_us:.0} us per pass");
}
