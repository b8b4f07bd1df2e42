//! The store's tests, each run on SQLite and on a real PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

#[path = "../../../tests/util/postgres.rs"]
pub(crate) mod pg;

/// Where a test's store lives: opening it again reaches the same data.
pub(crate) enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Place {
    pub(crate) fn sqlite() -> Place {
        Place::Sqlite(tempfile::tempdir().unwrap())
    }

    pub(crate) fn postgres() -> Place {
        Place::Postgres(pg::database())
    }

    /// SQLite, or PostgreSQL when `PIFLEET_TEST_STORE=postgres` (how
    /// scripts/test.sh runs the core's tests a second time).
    pub(crate) fn from_env() -> Place {
        match std::env::var("PIFLEET_TEST_STORE").as_deref() {
            Ok("postgres") => Place::postgres(),
            Ok("sqlite") | Err(_) => Place::sqlite(),
            Ok(other) => panic!("PIFLEET_TEST_STORE={other}: expected sqlite or postgres"),
        }
    }

    pub(crate) fn open(&self, history_limit: usize) -> Store {
        match self {
            Place::Sqlite(dir) => Store::open(&dir.path().join("sub/c.db"), history_limit),
            Place::Postgres(url) => Store::connect(url, history_limit),
        }
        .unwrap()
    }
}

/// A test run once on each engine: `name::sqlite` and `name::postgres`.
macro_rules! on_both_engines {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn sqlite() {
                let body: fn(Place) = $body;
                body(Place::sqlite())
            }
            #[test]
            fn postgres() {
                let body: fn(Place) = $body;
                body(Place::postgres())
            }
        }
    };
}

fn spec(name: &str) -> AgentSpec {
    AgentSpec {
        name: name.into(),
        model: "llama3.2:latest".into(),
        system: Some("be brief".into()),
        labels: BTreeMap::from([("room".into(), "attic".into())]),
    }
}

fn queued_job(id: &str, agent: &str) -> JobRow {
    JobRow {
        id: id.into(),
        agent: agent.into(),
        message: "do it".into(),
        priority: 0,
        seq: 0,
        state: JobState::Queued,
        attempts: 0,
        node: None,
        created_ms: 1,
        updated_ms: 1,
        answer: None,
        error: None,
        usage: None,
    }
}

on_both_engines!(agents_and_counters_survive_reopening, |place| {
    {
        let s = place.open(3);
        assert!(s.insert_agent(&spec("alice"), 10).unwrap());
        assert!(
            !s.insert_agent(&spec("alice"), 11).unwrap(),
            "names are unique"
        );
        let p = s.next_placement().unwrap();
        s.set_agent_state("alice", StoredState::Assigned, Some("pi-1"), p)
            .unwrap();
        assert_eq!(s.begin_generation(1000).unwrap(), 1000);
    }
    let s = place.open(3);
    let agents = s.agents().unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].spec, spec("alice"));
    assert_eq!(
        (
            agents[0].state.as_str(),
            agents[0].node.as_deref(),
            agents[0].placement
        ),
        ("assigned", Some("pi-1"), 1)
    );
    assert_eq!(
        s.next_placement().unwrap(),
        2,
        "placement ids are never reused"
    );
    assert_eq!(
        s.begin_generation(5).unwrap(),
        1001,
        "generations grow even if the clock goes back"
    );
});

on_both_engines!(
    batches_nest_commit_once_and_hold_the_writes_that_open_their_own,
    |place| {
        let s = place.open(3);
        s.begin();
        s.begin(); // a placement pass inside a batch of link messages
        s.insert_agents(&[spec("a"), spec("b")], 0).unwrap();
        assert_eq!(s.commit(), Ok(()), "the inner end commits nothing yet");
        s.append_history("a", &[ChatMessage::new(Role::User, "hi")], 0)
            .unwrap();
        s.delete_agent("b", 0).unwrap();
        // Another connection sees nothing before the outer commit.
        let other = place.open(3);
        assert!(other.agents().unwrap().is_empty());
        assert_eq!(s.commit(), Ok(()));
        let names: Vec<String> = other
            .agents()
            .unwrap()
            .into_iter()
            .map(|a| a.spec.name)
            .collect();
        assert_eq!(names, ["a"]);
        assert_eq!(other.history("a").unwrap().len(), 1);
        // Outside a batch, each write commits at once.
        s.insert_agent(&spec("c"), 0).unwrap();
        assert_eq!(other.agents().unwrap().len(), 2);
    }
);

/// Makes the next big history write fail: SQLite's file may not grow (a
/// full disk); PostgreSQL refuses it by a constraint.
fn writes_fail(place: &Place, s: &Store, fail: bool) {
    match (place, fail) {
        (Place::Sqlite(_), true) => {
            let pages = s
                .rows("count pages", "PRAGMA page_count", &[], |r| {
                    r.int(0, "pages")
                })
                .unwrap()[0];
            s.raw(&format!("PRAGMA max_page_count = {pages}")).unwrap();
        }
        (Place::Sqlite(_), false) => s.raw("PRAGMA max_page_count = 1000000").unwrap(),
        (Place::Postgres(url), true) => {
            let other = Store::connect(url, 3).unwrap();
            other
                .raw("ALTER TABLE messages ADD CONSTRAINT small CHECK (length(content) < 1000)")
                .unwrap();
        }
        (Place::Postgres(_), false) => {}
    }
}

on_both_engines!(
    a_failed_write_fails_its_whole_batch_and_refuses_the_writes_after_it,
    |place| {
        let s = place.open(10_000);
        s.insert_agent(&spec("first"), 0).unwrap();
        writes_fail(&place, &s, true);
        s.begin();
        s.insert_agent(&spec("before"), 0).unwrap();
        let big = ChatMessage::new(Role::User, "x".repeat(64 * 1024));
        // SQLite reports the failed write at once; PostgreSQL pipelines it
        // with the next statement, which reports it.
        let failed = s.append_history("first", &[big], 0);
        assert_eq!(
            failed.is_err(),
            matches!(place, Place::Sqlite(_)),
            "{failed:?}"
        );
        writes_fail(&place, &s, false);
        let refused = s.insert_agent(&spec("after"), 0).unwrap_err();
        assert!(refused.to_string().contains("earlier write"), "{refused}");
        let fault = s.commit().unwrap_err();
        let named = fault.contains("append history") || fault.contains("INSERT INTO messages");
        assert!(named, "{fault} ({failed:?})");
        let other = place.open(3);
        let names: Vec<String> = other
            .agents()
            .unwrap()
            .into_iter()
            .map(|a| a.spec.name)
            .collect();
        assert_eq!(names, ["first"], "nothing of the batch is stored");
        // The next batch starts clean.
        s.begin();
        s.insert_agent(&spec("later"), 0).unwrap();
        assert!(s.commit().is_ok());
        assert_eq!(other.agents().unwrap().len(), 2);
    }
);

on_both_engines!(
    a_failed_write_sent_with_the_commit_fails_the_commit,
    |place| {
        let s = place.open(10_000);
        s.insert_agent(&spec("first"), 0).unwrap();
        writes_fail(&place, &s, true);
        s.begin();
        let said = |text: &str| [ChatMessage::new(Role::User, text)];
        let _ = s.append_history("first", &said("before"), 0);
        let big = ChatMessage::new(Role::User, "x".repeat(64 * 1024));
        let _ = s.append_history("first", &[big], 0);
        let _ = s.append_history("first", &said("after"), 0);
        writes_fail(&place, &s, false);
        let fault = s.commit().unwrap_err();
        let named = match place {
            Place::Sqlite(_) => fault.contains("full"),
            Place::Postgres(_) => fault.contains("\"small\""),
        };
        assert!(named, "{fault}");
        assert!(place.open(3).history("first").unwrap().is_empty());
        assert!(s.history("first").unwrap().is_empty());
        // The connection serves the next batch.
        s.begin();
        s.append_history("first", &said("hi"), 0).unwrap();
        assert!(s.commit().is_ok());
        assert_eq!(place.open(3).history("first").unwrap().len(), 1);
    }
);

on_both_engines!(history_is_capped_to_the_newest_messages, |place| {
    let s = place.open(3);
    s.insert_agent(&spec("a"), 0).unwrap();
    let texts = |s: &Store| -> Vec<String> {
        s.history("a")
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect()
    };
    for i in 0..5 {
        s.append_history("a", &[ChatMessage::new(Role::User, format!("m{i}"))], 0)
            .unwrap();
    }
    assert_eq!(texts(&s), ["m2", "m3", "m4"]);
    for i in 5..40 {
        let said = [ChatMessage::new(Role::User, format!("m{i}"))];
        s.append_history("a", &said, 0).unwrap();
        // From memory, and from the store as another coordinator reads it.
        let newest: Vec<String> = (i - 2..=i).map(|n| format!("m{n}")).collect();
        assert_eq!(texts(&s), newest);
        assert_eq!(texts(&place.open(3)), newest);
    }
    let sql = "SELECT COUNT(*) FROM messages WHERE agent = $1";
    let stored = s
        .rows("count", sql, &["a".into()], |r| r.int(0, "n"))
        .unwrap()[0];
    let bound = 3 + i64::from(history::TRIM_EVERY);
    assert!(stored <= bound, "{stored} rows kept, more than {bound}");
    s.delete_agent("a", 0).unwrap();
    assert!(s.history("a").unwrap().is_empty());
});

on_both_engines!(jobs_keep_their_submission_order_and_outcome, |place| {
    let s = place.open(3);
    let mut job = JobRow {
        priority: 5,
        ..queued_job("j1", "a")
    };
    s.insert_job(&mut job).unwrap();
    let mut second = JobRow {
        id: "j2".into(),
        ..job.clone()
    };
    s.insert_job(&mut second).unwrap();
    assert!(second.seq > job.seq);
    assert!(
        s.insert_job(&mut second.clone()).is_err(),
        "a job id is stored once"
    );
    job.state = JobState::Completed;
    job.answer = Some("done".into());
    job.usage = Some(Usage {
        eval_count: 3,
        ..Usage::default()
    });
    s.update_job(&job).unwrap();
    assert_eq!(s.job("j1").unwrap().unwrap(), job);
    assert_eq!(s.open_jobs().unwrap().len(), 1);
    assert_eq!(s.jobs(Some("a"), Some("completed"), 10).unwrap(), [job]);
    s.delete_agent("a", 9).unwrap();
    assert_eq!(s.job("j2").unwrap().unwrap().state, JobState::Failed);
});

on_both_engines!(
    only_finished_jobs_older_than_the_limit_are_pruned,
    |place| {
        let s = place.open(3);
        let job = |id: &str, state: JobState, updated_ms: u64| JobRow {
            state,
            attempts: 1,
            updated_ms,
            ..queued_job(id, "a")
        };
        for mut j in [
            job("old-done", JobState::Completed, 100),
            job("old-failed", JobState::Failed, 100),
            job("old-queued", JobState::Queued, 100),
            job("old-running", JobState::Running, 100),
            job("new-done", JobState::Completed, 300),
        ] {
            s.insert_job(&mut j).unwrap();
        }
        assert_eq!(s.prune_finished_jobs(200).unwrap(), 2);
        let left: Vec<String> = s
            .jobs(None, None, 10)
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(left, ["new-done", "old-running", "old-queued"]);
    }
);

on_both_engines!(node_flags_are_kept_and_replaced, |place| {
    let s = place.open(3);
    let flags = NodeFlags {
        cordoned: true,
        draining: true,
        drain_deadline_ms: Some(1_700_000_000_000),
        drain_max_parallel: Some(2),
    };
    s.set_node_flags("pi-1", &flags).unwrap();
    s.set_node_flags("pi-2", &NodeFlags::default()).unwrap();
    s.set_node_flags("pi-2", &flags).unwrap();
    s.delete_node_flags("pi-1").unwrap();
    let stored = place.open(3).node_flags().unwrap();
    assert_eq!(stored, BTreeMap::from([("pi-2".to_owned(), flags)]));
});

on_both_engines!(
    unknown_values_in_the_store_are_errors_that_name_them,
    |place| {
        let s = place.open(3);
        s.insert_agent(&spec("alice"), 10).unwrap();
        let hi = [ChatMessage::new(Role::User, "hi")];
        s.append_history("alice", &hi, 11).unwrap();
        let mut job = queued_job("j1", "alice");
        s.insert_job(&mut job).unwrap();
        s.raw(
            "UPDATE agents SET state = 'dancing';
         UPDATE messages SET role = 'robot';
         UPDATE jobs SET state = 'lost'",
        )
        .unwrap();
        let errors = [
            s.agents().unwrap_err().to_string(),
            s.history("alice").unwrap_err().to_string(),
            s.job("j1").unwrap_err().to_string(),
        ];
        for (error, (column, value)) in errors.iter().zip([
            ("agents.state", "dancing"),
            ("messages.role", "robot"),
            ("jobs.state", "lost"),
        ]) {
            assert!(
                error.contains(column) && error.contains(value),
                "{error} should name {column} {value}"
            );
        }
        s.raw("UPDATE agents SET state = 'running', labels = '[oops'")
            .unwrap();
        let error = s.agents().unwrap_err().to_string();
        assert!(error.contains("agents.labels"), "{error}");
    }
);

const LEASE: Duration = Duration::from_millis(400);

#[test]
fn one_coordinator_leads_at_a_time_and_terms_only_grow() {
    let url = pg::database();
    let a = Store::connect(&url, 3).unwrap();
    let b = Store::connect(&url, 3).unwrap();
    a.set_counter("generation", 5_000).unwrap();
    let first = a.try_lead("a", "http://a", LEASE, 10).unwrap();
    assert_eq!(first, Some(5_001), "the term is above the last generation");
    assert_eq!(b.try_lead("b", "http://b", LEASE, 10).unwrap(), None);
    assert!(a.renew(LEASE).unwrap());
    let leader = b.leader().unwrap();
    assert_eq!(
        (
            leader.holder.as_str(),
            leader.api.as_str(),
            leader.term,
            leader.live
        ),
        ("a", "http://a", 5_001, true)
    );
    std::thread::sleep(LEASE + Duration::from_millis(100));
    assert!(!b.leader().unwrap().live, "the lease expired");
    let second = b.try_lead("b", "http://b", LEASE, 10).unwrap();
    assert_eq!(second, Some(5_002));
    assert!(!a.renew(LEASE).unwrap(), "a's term no longer leads");
    assert_eq!(
        b.begin_generation(1).unwrap(),
        5_002,
        "the term is the generation"
    );
    b.resign().unwrap();
    assert!(
        !a.leader().unwrap().live,
        "resigning ends the lease at once"
    );
}

#[test]
fn a_deposed_leader_can_store_nothing_not_even_in_a_batch_begun_before() {
    let url = pg::database();
    let a = Store::connect(&url, 3).unwrap();
    let b = Store::connect(&url, 3).unwrap();
    a.try_lead("a", "http://a", LEASE, 1).unwrap().unwrap();
    a.insert_agent(&spec("while-leading"), 0).unwrap();
    a.begin();
    a.insert_agent(&spec("batch-of-old-term"), 0).unwrap();
    std::thread::sleep(LEASE + Duration::from_millis(100));
    b.try_lead("b", "http://b", LEASE, 1).unwrap().unwrap();
    let fault = a.commit().unwrap_err();
    assert!(fault.contains("deposed: term"), "{fault}");
    assert!(a.deposed());
    let alone = a.insert_agent(&spec("outside-a-batch"), 0).unwrap_err();
    assert!(alone.to_string().contains("deposed"), "{alone}");
    let names: Vec<String> = b
        .agents()
        .unwrap()
        .into_iter()
        .map(|a| a.spec.name)
        .collect();
    assert_eq!(names, ["while-leading"]);
}

#[test]
fn a_leader_reads_the_history_other_leaders_wrote_and_not_its_own_rolled_back_writes() {
    let url = pg::database();
    let a = Store::connect(&url, 3).unwrap();
    let b = Store::connect(&url, 3).unwrap();
    let say = |text: &str| [ChatMessage::new(Role::User, text)];
    let texts = |s: &Store| -> Vec<String> {
        s.history("x")
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect()
    };
    a.try_lead("a", "http://a", LEASE, 1).unwrap().unwrap();
    a.insert_agent(&spec("x"), 0).unwrap();
    a.append_history("x", &say("a1"), 0).unwrap();
    assert_eq!(texts(&a), ["a1"]);
    // Deposed in the middle of a batch: its pipelined write is not stored,
    // and not remembered either.
    a.begin();
    a.append_history("x", &say("a-deposed"), 0).unwrap();
    std::thread::sleep(LEASE + Duration::from_millis(100));
    b.try_lead("b", "http://b", LEASE, 1).unwrap().unwrap();
    assert!(a.commit().unwrap_err().contains("deposed"));
    assert_eq!(
        texts(&a),
        ["a1"],
        "the rolled-back message is not remembered"
    );
    b.append_history("x", &say("b1"), 0).unwrap();
    b.resign().unwrap();
    a.try_lead("a", "http://a", LEASE, 1).unwrap().unwrap();
    assert_eq!(texts(&a), ["a1", "b1"], "what b wrote while a followed");
}

on_both_engines!(
    a_rolled_back_batch_leaves_no_message_in_the_history_read_after,
    |place| {
        let s = place.open(10_000);
        s.insert_agent(&spec("x"), 0).unwrap();
        s.append_history("x", &[ChatMessage::new(Role::User, "kept")], 0)
            .unwrap();
        assert_eq!(s.history("x").unwrap().len(), 1);
        writes_fail(&place, &s, true);
        s.begin();
        let _ = s.append_history("x", &[ChatMessage::new(Role::User, "lost")], 0);
        let big = ChatMessage::new(Role::User, "x".repeat(64 * 1024));
        let _ = s.append_history("x", &[big], 0);
        writes_fail(&place, &s, false);
        assert!(s.commit().is_err());
        let texts: Vec<String> = s
            .history("x")
            .unwrap()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(texts, ["kept"]);
    }
);

#[test]
fn commits_wait_for_the_wal_flush_only_when_asked_and_the_lease_always_does() {
    let url = pg::database();
    let setting = |s: &Store| -> String {
        let sql = "SELECT current_setting('synchronous_commit')";
        s.rows("read a setting", sql, &[], |r| r.text(0, "setting"))
            .unwrap()
            .remove(0)
    };
    let fast = Store::connect_with(&url, 3, false).unwrap();
    assert_eq!(setting(&fast), "off");
    assert_eq!(setting(&Store::connect_with(&url, 3, true).unwrap()), "on");
    // The lease's statements ask for it in their own transaction, and
    // leave the session's setting as it was.
    assert!(fast.try_lead("a", "http://a", LEASE, 1).unwrap().is_some());
    let inside = fast
        .synchronously("read a setting", || {
            let sql = "SELECT current_setting('synchronous_commit')";
            fast.rows("read a setting", sql, &[], |r| r.text(0, "setting"))
        })
        .unwrap();
    assert_eq!(inside, ["on"]);
    assert!(fast.renew(LEASE).unwrap());
    assert_eq!(setting(&fast), "off");
}

/// Ends `s`'s session on the server, as a restart or a cut would.
fn terminate(url: &str, s: &Store) {
    let sql = "SELECT pg_backend_pid()";
    let pid = s.rows("pid", sql, &[], |r| r.int(0, "pid")).unwrap()[0];
    let other = Store::connect(url, 3).unwrap();
    let sql = "SELECT CASE WHEN pg_terminate_backend(CAST($1 AS INTEGER)) THEN 1 ELSE 0 END";
    let done = other.rows("terminate", sql, &[pid.into()], |r| r.int(0, "done"));
    assert_eq!(done.unwrap(), [1]);
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn a_batch_whose_connection_closed_fails_and_stores_and_remembers_nothing() {
    let url = pg::database();
    let say = |text: &str| [ChatMessage::new(Role::User, text)];
    // Closed before the batch's first write, and after its writes.
    for before_writing in [true, false] {
        let a = Store::connect(&url, 3).unwrap();
        a.try_lead("a", "http://a", LEASE, 1).unwrap().unwrap();
        a.insert_agent(&spec("x"), 0).unwrap();
        assert!(a.history("x").unwrap().is_empty());
        a.begin();
        if before_writing {
            terminate(&url, &a);
        }
        let _ = a.append_history("x", &say("lost"), 0);
        let _ = a.set_counter("placement", 99);
        if !before_writing {
            terminate(&url, &a);
        }
        assert!(
            a.commit().is_err(),
            "closed before writing: {before_writing}"
        );
        let remembered = a.history("x").map(|h| h.len()).unwrap_or(0);
        assert_eq!(remembered, 0, "closed before writing: {before_writing}");
        let other = Store::connect(&url, 3).unwrap();
        assert!(other.history("x").unwrap().is_empty());
        assert_ne!(other.last_placement().unwrap(), 99);
        other.delete_agent("x", 0).unwrap();
        other
            .raw("UPDATE leader SET expires = '-infinity'")
            .unwrap();
    }
}

#[test]
fn a_write_that_cannot_be_sent_stops_the_writes_after_it_and_the_commit() {
    let url = pg::database();
    let s = Store::connect(&url, 3).unwrap();
    s.begin();
    s.set_counter("sent_before", 1).unwrap();
    // An integer for a text column: refused by the client, never sent.
    let bad = "INSERT INTO meta (key, value) VALUES ($1, $2)";
    let _ = s.write("a bad write", bad, &[5.into(), 5.into()]);
    let _ = s.set_counter("sent_after", 2);
    let fault = s.commit().unwrap_err();
    assert!(fault.contains("cannot be bound"), "{fault}");
    let other = Store::connect(&url, 3).unwrap();
    assert_eq!(
        other.counter("sent_before").unwrap(),
        0,
        "nothing committed"
    );
    assert_eq!(other.counter("sent_after").unwrap(), 0);
    // The server's transaction ended too: the next batch stands alone.
    s.begin();
    s.set_counter("next", 3).unwrap();
    s.commit().unwrap();
    assert_eq!(other.counter("next").unwrap(), 3);
    assert_eq!(other.counter("sent_before").unwrap(), 0);
}

#[test]
fn a_postgres_url_password_never_shows() {
    let shown = postgres::redact("postgres://pifleet:s3cret@db:5432/pifleet");
    assert_eq!(shown, "postgres://pifleet:***@db:5432/pifleet");
    let shown = postgres::redact("host=db user=pifleet password=s3cret");
    assert!(!shown.contains("s3cret"), "{shown}");
    let error = Store::connect("postgres://pifleet:s3cret@127.0.0.1:1/x", 3)
        .err()
        .unwrap()
        .to_string();
    assert!(
        !error.contains("s3cret") && error.contains("connect"),
        "{error}"
    );
}
