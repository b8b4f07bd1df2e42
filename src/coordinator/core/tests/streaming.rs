//! Streamed and stateless chats in the core: chunks reach the client once
//! and in order, the history changes only for a remembered chat answered
//! whole, and a chat whose client went away is cancelled on its node.

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::*;
use crate::protocol::{TurnChunk, TurnRequest};

type Reply = oneshot::Receiver<Result<ChatAnswer, CoreError>>;

fn hi() -> Vec<ChatMessage> {
    vec![ChatMessage::new(Role::User, "hi")]
}

/// A chat with agent x; streamed ones get their text on the receiver.
fn chat(sim: &mut Sim, memory: bool, streamed: bool) -> (Option<UnboundedReceiver<String>>, Reply) {
    let (tx, rx) = oneshot::channel();
    let (deltas, text) = match streamed {
        true => {
            let (d, t) = unbounded_channel();
            (Some(d), Some(t))
        }
        false => (None, None),
    };
    let call = ChatCall {
        messages: hi(),
        memory,
        deltas,
    };
    sim.c.chat("x", call, tx, sim.now);
    sim.deliver();
    (text, rx)
}

/// The oldest turn waiting on node a: its id and request.
fn turn_on_a(sim: &Sim) -> (String, TurnRequest) {
    let turn = &sim.nodes["a"].turns[0];
    let CommandBody::Turn(request) = &turn.body else {
        unreachable!()
    };
    (turn.id.clone(), request.clone())
}

fn chunk(sim: &mut Sim, id: &str, seq: u32, content: &str) {
    let chunk = TurnChunk {
        agent: "x".into(),
        seq,
        content: content.into(),
    };
    sim.reply("a", id, ReplyBody::TurnChunk(chunk));
}

fn received(text: &mut UnboundedReceiver<String>) -> Vec<String> {
    std::iter::from_fn(|| text.try_recv().ok()).collect()
}

fn history(sim: &Sim) -> usize {
    sim.c.store.history("x").unwrap().len()
}

#[test]
fn chunks_reach_the_client_once_and_in_order_and_a_stateless_chat_keeps_no_history() {
    let mut sim = one_running_on_a();
    // One remembered exchange first: two messages in the history.
    let (_, mut first) = chat(&mut sim, true, false);
    sim.answer_turn_in_batch("a", "hello").unwrap();
    assert_eq!(first.try_recv().unwrap().unwrap().message.content, "hello");
    assert_eq!(history(&sim), 2);

    let (text, mut answer) = chat(&mut sim, false, true);
    let mut text = text.unwrap();
    let (id, request) = turn_on_a(&sim);
    assert!(request.stream, "the node is asked to stream");
    assert_eq!(
        request.messages,
        hi(),
        "a stateless chat sends only its own messages"
    );
    // QoS 1 repeats, a reconnection reorders.
    chunk(&mut sim, &id, 0, "The ");
    chunk(&mut sim, &id, 2, "on ");
    chunk(&mut sim, &id, 0, "The ");
    chunk(&mut sim, &id, 1, "answer ");
    chunk(&mut sim, &id, 2, "on ");
    assert_eq!(received(&mut text), ["The ", "answer ", "on "]);
    assert!(answer.try_recv().is_err(), "not answered before the result");
    // The fourth chunk was lost: the result's whole answer fills it in.
    sim.answer_turn_in_batch("a", "The answer on time").unwrap();
    assert_eq!(received(&mut text), ["time"]);
    let done = answer.try_recv().unwrap().unwrap();
    assert_eq!(done.message.content, "The answer on time");
    assert_eq!(done.model, "llama3.2:latest");
    assert_eq!(
        history(&sim),
        2,
        "a stateless chat leaves the history alone"
    );
}

#[test]
fn a_remembered_streamed_chat_is_stored_once_and_a_broken_one_not_at_all() {
    let mut sim = one_running_on_a();
    let (text, mut answer) = chat(&mut sim, true, true);
    let mut text = text.unwrap();
    let (id, _) = turn_on_a(&sim);
    chunk(&mut sim, &id, 0, "part");
    assert_eq!(received(&mut text), ["part"]);
    assert_eq!(history(&sim), 0, "nothing stored before the end");
    sim.answer_turn_in_batch("a", "partial").unwrap();
    assert_eq!(
        answer.try_recv().unwrap().unwrap().message.content,
        "partial"
    );
    assert_eq!(history(&sim), 2);

    // The next stream breaks off: the node reports the failure.
    let (text, mut answer) = chat(&mut sim, true, true);
    let mut text = text.unwrap();
    let (id, _) = turn_on_a(&sim);
    chunk(&mut sim, &id, 0, "half an ");
    assert_eq!(received(&mut text), ["half an "]);
    sim.nodes.get_mut("a").unwrap().turns.remove(0);
    let failed = TurnResult::failed(
        "x",
        None,
        TurnErrorCode::OllamaError,
        "Ollama broke off its stream".into(),
    );
    sim.reply("a", &id, ReplyBody::TurnResult(failed));
    let error = answer.try_recv().unwrap().unwrap_err();
    assert!(error.to_string().contains("broke off"), "{error}");
    assert_eq!(history(&sim), 2, "a broken stream stores nothing");
}

#[test]
fn a_chat_whose_client_went_away_is_cancelled_on_its_node() {
    let mut sim = one_running_on_a();
    let (text, answer) = chat(&mut sim, false, true);
    let (id, _) = turn_on_a(&sim);
    // A second chat waits behind it.
    let (_, mut next) = chat(&mut sim, false, false);
    assert_eq!(
        sim.nodes["a"].turns.len(),
        1,
        "one turn at a time per agent"
    );
    drop((text, answer));
    sim.step();
    assert_eq!(sim.nodes["a"].cancelled, std::slice::from_ref(&id));
    assert_eq!(sim.commands_to("a", CommandKind::Cancel), 1);
    // The waiting chat goes next, and a late chunk of the cancelled turn
    // goes nowhere.
    chunk(&mut sim, &id, 0, "late");
    sim.answer_turn_in_batch("a", "next").unwrap();
    assert_eq!(next.try_recv().unwrap().unwrap().message.content, "next");
}
