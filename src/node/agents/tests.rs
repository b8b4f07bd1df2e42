use super::*;
use crate::protocol::{ChatMessage, Role};

fn command(id: &str, generation: u64, body: CommandBody) -> Command {
    Command {
        id: id.into(),
        node: "pi-1".into(),
        generation,
        body,
    }
}

fn assign(id: &str, name: &str, placement: u64) -> Command {
    command(
        id,
        1,
        CommandBody::Assign {
            agent: AgentSpec {
                name: name.into(),
                model: "llama3.2".into(),
                system: Some("be brief".into()),
                labels: BTreeMap::new(),
            },
            placement,
        },
    )
}

fn turn(id: &str, agent: &str) -> Command {
    command(
        id,
        1,
        CommandBody::Turn(TurnRequest {
            agent: agent.into(),
            messages: vec![ChatMessage::new(Role::User, "hi")],
            system: None,
            timeout_ms: None,
            job: None,
            stream: false,
        }),
    )
}

fn ack_of(effects: &[Effect]) -> &Ack {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::Ack { ack, .. } => Some(ack),
            _ => None,
        })
        .expect("an ack")
}

#[test]
fn a_fourth_agent_is_refused_with_a_reason_naming_the_capacity() {
    let mut t = AgentTable::new("pi-1", 3);
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let effects = t.apply(assign(&format!("c{i}"), name, i as u64 + 1), At::default());
        assert!(ack_of(&effects).ok);
        assert!(effects.contains(&Effect::CapacityChanged));
    }
    let effects = t.apply(assign("c9", "d", 9), At::default());
    let ack = ack_of(&effects);
    assert!(!ack.ok);
    let reason = ack.reason.as_deref().unwrap();
    assert!(reason.contains("agent_capacity is 3"), "{reason}");
    assert_eq!(t.len(), 3);
}

#[test]
fn a_repeated_command_id_is_applied_once() {
    let mut t = AgentTable::new("pi-1", 1);
    assert!(ack_of(&t.apply(assign("same", "a", 1), At::default())).ok);
    t.apply(
        command(
            "r",
            1,
            CommandBody::Release {
                agent: "a".into(),
                placement: 1,
            },
        ),
        At::default(),
    );
    let effects = t.apply(assign("same", "a", 1), At::default());
    assert!(matches!(effects[..], [Effect::Ignored { .. }]));
    assert!(
        t.is_empty(),
        "the redelivered assign must not bring the agent back"
    );
}

#[test]
fn commands_of_an_older_generation_are_ignored() {
    let mut t = AgentTable::new("pi-1", 2);
    let mut newer = assign("n", "a", 1);
    newer.generation = 5;
    t.apply(newer, At::default());
    let effects = t.apply(assign("o", "b", 2), At::default());
    assert!(matches!(&effects[..], [Effect::Ignored { reason, .. }] if reason.contains("stale")));
    assert_eq!(t.names(), vec!["a"]);
}

#[test]
fn a_late_release_of_an_older_placement_keeps_the_newer_one() {
    let mut t = AgentTable::new("pi-1", 2);
    t.apply(assign("a1", "a", 4), At::default());
    let effects = t.apply(
        command(
            "r",
            1,
            CommandBody::Release {
                agent: "a".into(),
                placement: 3,
            },
        ),
        At::default(),
    );
    assert!(!ack_of(&effects).ok);
    assert_eq!(t.names(), vec!["a"]);
    let effects = t.apply(assign("a0", "a", 2), At::default());
    assert!(
        !ack_of(&effects).ok,
        "an older assign does not downgrade the placement"
    );
    assert_eq!(t.views()[0].placement, 4);
}

#[test]
fn turns_of_one_agent_run_one_at_a_time_in_order() {
    let mut t = AgentTable::new("pi-1", 2);
    t.apply(assign("a", "alice", 1), At::default());
    let first = t.apply(turn("t1", "alice"), At::default());
    assert!(
        matches!(&first[..], [Effect::StartTurn { turn, system, .. }] if turn.id == "t1" && system.as_deref() == Some("be brief"))
    );
    assert_eq!(
        t.apply(turn("t2", "alice"), At::default()),
        vec![Effect::Queued]
    );
    assert_eq!(
        t.apply(turn("t3", "alice"), At::default()),
        vec![Effect::Queued]
    );
    assert_eq!(t.turns_in_flight(), 3);
    assert!(
        t.turn_finished("alice", "t2", 0).is_empty(),
        "only the running turn can finish"
    );
    let next = t.turn_finished("alice", "t1", 0);
    assert!(matches!(&next[..], [Effect::StartTurn { turn, .. }] if turn.id == "t2"));
    let next = t.turn_finished("alice", "t2", 0);
    assert!(matches!(&next[..], [Effect::StartTurn { turn, .. }] if turn.id == "t3"));
    assert!(t.turn_finished("alice", "t3", 0).is_empty());
    assert_eq!(t.turns_in_flight(), 0);
    assert_eq!(t.views()[0].turns_completed, 3);
    assert_eq!(
        t.views()[0].model,
        "llama3.2:latest",
        "model names are normalised"
    );
}

#[test]
fn a_turn_for_an_unknown_agent_fails_with_a_reason() {
    let mut t = AgentTable::new("pi-1", 2);
    let effects = t.apply(turn("t", "ghost"), At::default());
    match &effects[..] {
        [Effect::TurnFailed { result, .. }] => {
            let error = result.error.as_ref().unwrap();
            assert_eq!(error.code, TurnErrorCode::AgentNotAssigned);
            assert!(error.reason.contains("ghost"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_repeated_turn_is_ignored_while_held_and_answered_forgotten_once_done() {
    let mut t = AgentTable::new("pi-1", 1);
    t.apply(assign("a", "alice", 1), At::default());
    t.apply(turn("t1", "alice"), At::default());
    let again = t.apply(turn("t1", "alice"), At::default());
    assert!(matches!(&again[0], Effect::Ignored { .. }), "{again:?}");
    t.turn_finished("alice", "t1", 0);
    let again = t.apply(turn("t1", "alice"), At::default());
    assert!(
        matches!(&again[0], Effect::TurnFailed { result, .. } if result.error.as_ref().unwrap().code == TurnErrorCode::Forgotten),
        "{again:?}"
    );
}

#[test]
fn queued_turns_past_their_budget_fail_as_expired_whatever_the_wall_clock() {
    let mut t = AgentTable::new("pi-1", 1);
    let at = |wall_ms, mono_ms| At { wall_ms, mono_ms };
    t.apply(assign("a", "alice", 1), At::default());
    t.apply(turn("t1", "alice"), At::default());
    let budget = |id, ms| {
        let mut c = turn(id, "alice");
        if let CommandBody::Turn(r) = &mut c.body {
            r.timeout_ms = Some(ms);
        }
        c
    };
    // Arrives at monotonic 50 ms with 100 ms left: due at 150 ms. The
    // node's wall clock is a day ahead; it plays no part.
    t.apply(budget("t2", 100), at(86_400_000, 50));
    // A wall clock a day behind does not expire a turn with budget left.
    t.apply(budget("t3", 10_000), at(0, 60));
    let next = t.turn_finished("alice", "t1", 200);
    assert!(
        matches!(&next[0], Effect::TurnFailed { result, .. } if result.error.as_ref().unwrap().code == TurnErrorCode::Expired)
    );
    assert!(matches!(&next[1], Effect::StartTurn { turn, .. } if turn.id == "t3"));
}

#[test]
fn releasing_an_agent_fails_its_queued_turns_and_frees_the_slot() {
    let mut t = AgentTable::new("pi-1", 1);
    t.apply(assign("a", "alice", 1), At::default());
    t.apply(turn("t1", "alice"), At::default());
    t.apply(turn("t2", "alice"), At::default());
    let effects = t.apply(
        command(
            "r",
            1,
            CommandBody::Release {
                agent: "alice".into(),
                placement: 1,
            },
        ),
        At::default(),
    );
    assert!(ack_of(&effects).ok);
    assert!(effects
        .iter()
        .any(|e| matches!(e, Effect::TurnFailed { turn, .. } if turn.id == "t2")));
    assert!(t.is_empty());
    assert!(
        ack_of(&t.apply(assign("b", "bob", 2), At::default())).ok,
        "the slot is free again"
    );
    assert!(t.turn_finished("alice", "t1", 0).is_empty());
}

#[test]
fn a_cancelled_turn_fails_if_queued_and_is_stopped_by_the_node_if_running() {
    let mut t = AgentTable::new("pi-1", 1);
    t.apply(assign("a", "alice", 1), At::default());
    t.apply(turn("t1", "alice"), At::default());
    t.apply(turn("t2", "alice"), At::default());
    let cancel = |id: &str, turn: &str| {
        let body = CommandBody::Cancel {
            agent: "alice".into(),
            turn: turn.into(),
        };
        command(id, 1, body)
    };
    let effects = t.apply(cancel("c2", "t2"), At::default());
    assert!(matches!(
        &effects[..],
        [Effect::TurnFailed { turn, result }]
            if turn.id == "t2" && result.error.as_ref().unwrap().code == TurnErrorCode::Cancelled
    ));
    let effects = t.apply(cancel("c1", "t1"), At::default());
    assert!(matches!(
        &effects[..],
        [Effect::CancelRunning { agent, turn }] if agent == "alice" && turn == "t1"
    ));
    // Nothing is left to start once the running one ends.
    assert!(t.turn_finished("alice", "t1", 0).is_empty());
    let effects = t.apply(cancel("c3", "t1"), At::default());
    assert!(matches!(&effects[..], [Effect::Ignored { .. }]));
}

#[test]
fn draining_and_stopping_refuse_new_agents_and_stopping_refuses_turns() {
    let mut t = AgentTable::new("pi-1", 4);
    t.apply(assign("a", "alice", 1), At::default());
    let effects = t.apply(
        command("d", 1, CommandBody::Drain { draining: true }),
        At::default(),
    );
    assert!(effects.contains(&Effect::CapacityChanged));
    assert!(t.draining());
    assert!(ack_of(&t.apply(assign("b", "bob", 2), At::default()))
        .reason
        .as_deref()
        .unwrap()
        .contains("draining"));
    t.set_stopping();
    let effects = t.apply(turn("t", "alice"), At::default());
    assert!(
        matches!(&effects[..], [Effect::TurnFailed { result, .. }] if result.error.as_ref().unwrap().code == TurnErrorCode::ShuttingDown)
    );
}

#[test]
fn the_dedup_memory_is_bounded() {
    let mut ids = RecentIds::new();
    for i in 0..(REMEMBERED_COMMANDS * 3) {
        assert!(ids.insert(&format!("id-{i}")));
    }
    assert_eq!(ids.set.len(), REMEMBERED_COMMANDS);
    assert!(!ids.insert(&format!("id-{}", REMEMBERED_COMMANDS * 3 - 1)));
    assert!(ids.insert("id-0"), "the oldest ids are forgotten");
}
