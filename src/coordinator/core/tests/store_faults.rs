//! The core when its store fails underneath it: unreadable histories,
//! read-only and full disks. Nothing is answered or sent that was not
//! stored, and the core recovers by itself.

use super::*;

/// Runs SQL on the store underneath the running core, as another process
/// (or a failing disk) would.
fn sabotage(sim: &Sim, sql: &str) {
    sim.place.open(3).raw(sql).unwrap();
}

/// Makes writes fail with `message`: each trigger is a name and when it
/// fires (`BEFORE UPDATE ON agents`), in the store's engine's dialect.
fn fail_writes(sim: &Sim, triggers: &[(&str, &str)], message: &str) {
    let sql: String = triggers
        .iter()
        .map(|(name, when)| match sim.place {
            Place::Sqlite(_) => {
                format!("CREATE TRIGGER {name} {when} BEGIN SELECT RAISE(FAIL, '{message}'); END;")
            }
            Place::Postgres(_) => format!(
                "CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION '{message}'; END $$;
                 CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}();"
            ),
        })
        .collect();
    sabotage(sim, &sql);
}

/// Drops what [`fail_writes`] created.
fn allow_writes(sim: &Sim, triggers: &[(&str, &str)]) {
    let sql: String = triggers
        .iter()
        .map(|(name, when)| match sim.place {
            Place::Sqlite(_) => format!("DROP TRIGGER {name};"),
            Place::Postgres(_) => {
                let table = when.rsplit(' ').next().unwrap();
                format!("DROP TRIGGER {name} ON {table}; DROP FUNCTION {name}();")
            }
        })
        .collect();
    sabotage(sim, &sql);
}

#[test]
fn a_chat_whose_history_cannot_be_read_fails_and_sends_no_turn() {
    let mut sim = one_running_on_a();
    sabotage(&sim, "ALTER TABLE messages RENAME TO messages_lost");
    let (tx, mut rx) = oneshot::channel();
    sim.c.chat(
        "x",
        ChatCall::remembered(vec![ChatMessage::new(Role::User, "hi")]),
        tx,
        sim.now,
    );
    sim.deliver();
    let error = rx.try_recv().expect("answered at once").unwrap_err();
    let CoreError::Store(fault) = &error else {
        panic!("expected a store error, got {error:?}");
    };
    assert!(fault.to_string().contains("history of agent x"), "{fault}");
    // The engine's error behind it is kept, for the log.
    let source = std::error::Error::source(fault).expect("a source");
    let source = source.to_string();
    assert!(
        source.contains("no such table") || source.contains("\"messages\" does not exist"),
        "{source}"
    );
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 0);
    // Once the store is readable again, chats go through.
    sabotage(&sim, "ALTER TABLE messages_lost RENAME TO messages");
    let (tx, _rx) = oneshot::channel();
    sim.c.chat(
        "x",
        ChatCall::remembered(vec![ChatMessage::new(Role::User, "hi")]),
        tx,
        sim.now,
    );
    sim.deliver();
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 1);
}

#[test]
fn a_job_whose_history_cannot_be_read_waits_for_the_store_and_then_runs() {
    let mut sim = one_running_on_a();
    sabotage(&sim, "ALTER TABLE messages RENAME TO messages_lost");
    let id = sim
        .c
        .submit_job("x", "work".into(), 0, sim.now)
        .unwrap()
        .job_id;
    sim.run_for(Duration::from_secs(2));
    let job = sim.c.job(&id).unwrap();
    assert_eq!((job.status, job.attempts), (JobState::Queued, 0), "{job:?}");
    assert!(job.error.is_some_and(|e| e.contains("history of agent x")));
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 0);
    sabotage(&sim, "ALTER TABLE messages_lost RENAME TO messages");
    sim.step();
    let job = sim.c.job(&id).unwrap();
    assert_eq!(
        (job.status, job.attempts),
        (JobState::Running, 1),
        "{job:?}"
    );
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 1);
}

#[test]
fn a_delete_whose_state_cannot_be_saved_sends_nothing() {
    let mut sim = one_running_on_a();
    let read_only = [("read_only", "BEFORE UPDATE ON agents")];
    fail_writes(&sim, &read_only, "disk is read-only");
    let error = sim.c.delete_agent("x", sim.now).unwrap_err();
    assert!(
        matches!(&error, CoreError::Store(m) if m.to_string().contains("disk is read-only")),
        "{error:?}"
    );
    sim.deliver();
    assert_eq!(sim.commands_to("a", CommandKind::Release), 0);
    assert_eq!(sim.c.agents["x"].state, AgentState::Running);
    allow_writes(&sim, &read_only);
    assert_eq!(sim.c.delete_agent("x", sim.now).unwrap().state, "stopping");
    sim.deliver();
    assert_eq!(sim.commands_to("a", CommandKind::Release), 1);
    sim.run_until("gone", MINUTE, |s| s.c.agents.is_empty());
}

#[test]
fn a_drain_whose_flags_cannot_be_saved_is_refused_and_moves_nothing() {
    let mut sim = three_on_a_then_b(|_| {});
    let read_only = [("read_only", "BEFORE INSERT ON nodes")];
    fail_writes(&sim, &read_only, "disk is read-only");
    let error = sim.c.drain("a", Some(3), None, sim.now).unwrap_err();
    assert!(matches!(&error, CoreError::Store(_)), "{error:?}");
    sim.run_for(Duration::from_secs(5));
    assert_eq!(sim.running_on("a"), 3);
    assert_eq!(sim.commands_to("a", CommandKind::Drain), 0);
    assert!(!sim.c.node("a", sim.now).unwrap().cordoned);
}

/// Every write the core makes to history, jobs and counters fails.
const DISK_FULL: [(&str, &str); 4] = [
    ("full1", "BEFORE INSERT ON messages"),
    ("full2", "BEFORE UPDATE ON meta"),
    ("full3", "BEFORE INSERT ON jobs"),
    ("full4", "BEFORE INSERT ON meta"),
];

fn disk_full(sim: &Sim) {
    fail_writes(sim, &DISK_FULL, "database or disk is full");
}

fn room_again(sim: &Sim) {
    allow_writes(sim, &DISK_FULL);
}

fn stored_messages(sim: &Sim) -> usize {
    sim.place.open(10_000).history("x").unwrap().len()
}

#[test]
fn a_chat_whose_answer_cannot_be_stored_is_not_answered_and_the_core_recovers_by_itself() {
    let mut sim = one_running_on_a();
    let chat = |sim: &mut Sim| {
        let (tx, rx) = oneshot::channel();
        sim.c.chat(
            "x",
            ChatCall::remembered(vec![ChatMessage::new(Role::User, "hi")]),
            tx,
            sim.now,
        );
        sim.deliver();
        rx
    };
    let mut first = chat(&mut sim);
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 1);
    disk_full(&sim);
    sim.answer_turn_in_batch("a", "hello").unwrap();
    let error = first.try_recv().expect("answered").unwrap_err();
    assert!(
        matches!(&error, CoreError::Store(m) if m.to_string().contains("disk is full")),
        "{error:?}"
    );
    assert_eq!(stored_messages(&sim), 0);
    assert!(sim.c.store_fault().is_some());
    // While the store cannot write, chats are refused before a Pi works.
    let mut refused = chat(&mut sim);
    assert!(matches!(refused.try_recv(), Ok(Err(CoreError::Store(_)))));
    assert_eq!(sim.commands_to("a", CommandKind::Turn), 1);
    assert!(!sim.c.probe_store(sim.now));
    // Room again: the next probe notices, and chats are stored and answered.
    room_again(&sim);
    assert!(sim.c.probe_store(sim.now));
    let mut again = chat(&mut sim);
    sim.answer_turn_in_batch("a", "hello again").unwrap();
    assert_eq!(
        again.try_recv().unwrap().unwrap().message.content,
        "hello again"
    );
    assert_eq!(stored_messages(&sim), 2);
}

#[test]
fn a_job_whose_completion_cannot_be_stored_stays_running_and_completes_once_after_recovery() {
    let mut sim = one_running_on_a();
    let id = sim.submit("x");
    disk_full(&sim);
    sim.answer_turn_in_batch("a", "done").unwrap();
    let job = sim.c.job(&id).unwrap();
    assert_eq!(
        (job.status, job.attempts),
        (JobState::Running, 1),
        "{job:?}"
    );
    sim.run_for(Duration::from_secs(2));
    assert_eq!(
        sim.commands_to("a", CommandKind::Turn),
        1,
        "not run again meanwhile"
    );
    // Once the store takes writes, the same turn is asked for again (the
    // node answers from its memory) and the job completes on attempt 1.
    room_again(&sim);
    assert!(sim.c.probe_store(sim.now));
    sim.deliver();
    let resent: Vec<&Command> = sim
        .sent
        .iter()
        .filter(|(n, c)| n == "a" && c.body.kind() == CommandKind::Turn)
        .map(|(_, c)| c)
        .collect();
    assert_eq!(resent.len(), 2);
    assert_eq!(resent[0].id, resent[1].id, "the same turn, not a new run");
    sim.answer_turn_in_batch("a", "done").unwrap();
    let job = sim.c.job(&id).unwrap();
    assert_eq!(
        (job.status, job.attempts),
        (JobState::Completed, 1),
        "{job:?}"
    );
}
