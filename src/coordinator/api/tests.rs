use super::*;

#[test]
fn domain_errors_map_to_http_statuses() {
    let turn = |code| CoreError::Turn {
        code,
        message: "m".into(),
        retry_after_secs: None,
    };
    for (error, status, code) in [
        (CoreError::NotFound("m".into()), 404, "not_found"),
        (CoreError::Store(StoreFault::new("m")), 503, "store"),
        (CoreError::TooLarge("m".into()), 413, "too_large"),
        (CoreError::Stopping, 503, "stopping"),
        (turn(TurnErrorCode::Timeout), 504, "timeout"),
        (turn(TurnErrorCode::OllamaBusy), 503, "ollama_busy"),
        (turn(TurnErrorCode::ModelMissing), 502, "model_missing"),
    ] {
        let api = ApiError::from(error);
        assert_eq!((api.status.as_u16(), api.code), (status, code));
    }
    let conflict = CoreError::Conflict {
        code: "exists",
        message: "m".into(),
    };
    let not_running = CoreError::NotRunning {
        message: "m".into(),
        retry_after_secs: Some(3),
    };
    let moving = CoreError::Turn {
        code: TurnErrorCode::Released,
        message: "m".into(),
        retry_after_secs: Some(5),
    };
    let queue_full = CoreError::QueueFull {
        message: "m".into(),
        retry_after_secs: 7,
    };
    for (error, status, code, retry) in [
        (conflict, 409, "exists", None),
        (not_running, 503, "agent_not_running", Some(3)),
        (moving, 503, "released", Some(5)),
        (queue_full, 429, "queue_full", Some(7)),
    ] {
        let api = ApiError::from(error);
        assert_eq!(
            (api.status.as_u16(), api.code, api.retry_after),
            (status, code, retry)
        );
    }
}

#[test]
fn agent_names_follow_the_contract() {
    for ok in ["a", "alice", "agent-7", "x_1", &"a".repeat(63)] {
        assert!(validate_agent_name(ok).is_ok(), "{ok}");
    }
    for bad in ["", "Alice", "-a", "_a", "a b", "a/b", &"a".repeat(64), "ä"] {
        assert!(validate_agent_name(bad).is_err(), "{bad}");
    }
}

#[test]
fn messages_need_known_roles_and_content() {
    let m = |role: &str, content: &str| RawMessage {
        role: role.into(),
        content: content.into(),
    };
    assert!(validate_messages(vec![]).is_err());
    let e = validate_messages(vec![m("user", "hi"), m("robot", "x")]).unwrap_err();
    assert!(e.message.contains("messages[1].role"), "{}", e.message);
    assert!(validate_messages(vec![m("user", "  ")]).is_err());
    assert_eq!(
        validate_messages(vec![m("user", "hi")]).unwrap()[0].role,
        Role::User
    );
}

#[test]
fn new_agents_get_normalised_models() {
    let spec = validate_new_agent(NewAgent {
        name: "alice".into(),
        model: "llama3.2".into(),
        system: None,
        labels: BTreeMap::new(),
    })
    .unwrap();
    assert_eq!(spec.model, "llama3.2:latest");
}
