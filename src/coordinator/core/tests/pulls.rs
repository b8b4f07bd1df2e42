//! Model pulls in the core: `auto_pull` backs off after failures, and a
//! pull its node never reports on fails instead of blocking the node.

use super::*;
use crate::protocol::{PullProgress, PullState};

const MODEL: &str = "qwen2.5:0.5b";

fn with_auto_pull() -> Sim {
    let mut sim = Sim::new(|c| c.scheduler.auto_pull = true);
    sim.join("a", 2);
    sim
}

/// The pull commands sent so far.
fn pulls_sent(sim: &Sim) -> usize {
    sim.commands_to("a", CommandKind::Pull)
}

fn report(sim: &mut Sim, state: PullState, error: Option<&str>) {
    let progress = PullProgress {
        model: MODEL.into(),
        state,
        status: "pulling manifest".into(),
        completed: 0,
        total: 0,
        error: error.map(str::to_owned),
    };
    let id = sim
        .sent
        .iter()
        .rev()
        .find(|(_, c)| c.body.kind() == CommandKind::Pull)
        .unwrap()
        .1
        .id
        .clone();
    sim.reply("a", &id, ReplyBody::PullProgress(progress));
}

#[test]
fn a_failing_auto_pull_is_tried_again_later_and_later_and_shown_on_the_agent() {
    let mut sim = with_auto_pull();
    let spec = AgentSpec {
        name: "q".into(),
        model: MODEL.into(),
        system: None,
        labels: BTreeMap::new(),
    };
    sim.c.create_agent(spec, sim.now).unwrap();
    sim.run_for(Duration::from_secs(1));
    assert_eq!(pulls_sent(&sim), 1);
    let reason = sim.c.agents["q"].pending_reason.clone().unwrap();
    assert!(reason.contains("a is pulling it"), "{reason}");
    // Failures in a row: tried again after 60 s, then after 120 s.
    report(&mut sim, PullState::Failed, Some("file does not exist"));
    sim.run_for(Duration::from_secs(1));
    let reason = sim.c.agents["q"].pending_reason.clone().unwrap();
    assert!(reason.contains("failed: file does not exist"), "{reason}");
    sim.run_for(Duration::from_secs(58));
    assert_eq!(pulls_sent(&sim), 1, "not before 60 s");
    sim.run_for(Duration::from_secs(2));
    assert_eq!(pulls_sent(&sim), 2);
    report(&mut sim, PullState::Failed, Some("file does not exist"));
    sim.run_for(Duration::from_secs(110));
    assert_eq!(pulls_sent(&sim), 2, "the second wait is 120 s");
    sim.run_for(Duration::from_secs(12));
    assert_eq!(pulls_sent(&sim), 3);
}

#[test]
fn a_pull_its_node_never_reports_on_fails_after_a_minute() {
    let mut sim = with_auto_pull();
    let list = sim.c.pull_model(MODEL, vec!["a".into()], sim.now).unwrap();
    assert_eq!(list.pulls.len(), 1);
    sim.deliver();
    // The node reports at least every 10 s while it pulls...
    for _ in 0..3 {
        sim.run_for(Duration::from_secs(30));
        report(&mut sim, PullState::Pulling, None);
    }
    assert_eq!(sim.c.pull_list().pulls[0].state, PullState::Pulling);
    // ...and then says nothing more.
    sim.run_for(Duration::from_secs(61));
    let pull = &sim.c.pull_list().pulls[0];
    assert_eq!(pull.state, PullState::Failed, "{pull:?}");
    assert!(
        pull.error
            .as_deref()
            .unwrap()
            .contains("no word of it from a"),
        "{pull:?}"
    );
    assert!(sim.kinds().contains(&"pull_failed"));
}
