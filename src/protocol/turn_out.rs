//! A turn command encoded from borrowed parts: the agent's history as the
//! JSON the coordinator keeps of each message, then the turn's new
//! messages. The bytes are those of [`super::Command`] with a
//! [`super::CommandBody::Turn`] body (a test holds them equal), without
//! copying the history into a [`super::TurnRequest`] first.

use serde::ser::SerializeSeq;
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

use super::ChatMessage;

/// A turn command, borrowed.
#[derive(Serialize)]
pub struct TurnOut<'a> {
    pub id: &'a str,
    pub node: &'a str,
    pub generation: u64,
    #[serde(rename = "type")]
    pub kind: TurnTag,
    pub agent: &'a str,
    pub messages: MessagesOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

/// The `type` of a turn command.
#[derive(Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnTag {
    Turn,
}

/// `history` (each message's JSON) followed by `new`.
pub struct MessagesOut<'a> {
    pub history: &'a [&'a RawValue],
    pub new: &'a [ChatMessage],
}

impl Serialize for MessagesOut<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.history.len() + self.new.len()))?;
        for m in self.history {
            seq.serialize_element(m)?;
        }
        for m in self.new {
            seq.serialize_element(m)?;
        }
        seq.end()
    }
}

impl TurnOut<'_> {
    /// The encoded command; the oldest history left out as needed to stay
    /// within `max` bytes (None if even no history does not fit).
    pub fn encode_within(mut self, max: usize) -> Result<Vec<u8>, usize> {
        let mut payload = super::encode(&self);
        if payload.len() <= max {
            return Ok(payload);
        }
        // Each message left out takes its JSON and a comma with it.
        let mut size = payload.len();
        let mut skip = 0;
        while size > max && skip < self.messages.history.len() {
            size -= self.messages.history[skip].get().len() + 1;
            skip += 1;
        }
        self.messages.history = &self.messages.history[skip..];
        payload = super::encode(&self);
        if payload.len() > max {
            return Err(payload.len());
        }
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode_command, encode, Command, CommandBody, Role, TurnRequest};

    fn json(m: &ChatMessage) -> Box<RawValue> {
        RawValue::from_string(String::from_utf8(encode(m)).unwrap()).unwrap()
    }

    fn turn(history: &[ChatMessage], new: &[ChatMessage], full: bool) -> (Command, Vec<u8>) {
        let command = Command {
            id: "t1-2".into(),
            node: "pi-1".into(),
            generation: 1,
            body: CommandBody::Turn(TurnRequest {
                agent: "alice".into(),
                messages: history.iter().chain(new).cloned().collect(),
                system: full.then(|| "be \"brief\"".into()),
                timeout_ms: full.then_some(30_000),
                job: full.then(|| "j-1".into()),
                stream: full,
            }),
        };
        let kept: Vec<Box<RawValue>> = history.iter().map(json).collect();
        let refs: Vec<&RawValue> = kept.iter().map(|m| &**m).collect();
        let out = TurnOut {
            id: "t1-2",
            node: "pi-1",
            generation: 1,
            kind: TurnTag::Turn,
            agent: "alice",
            messages: MessagesOut {
                history: &refs,
                new,
            },
            system: full.then_some("be \"brief\""),
            timeout_ms: full.then_some(30_000),
            job: full.then_some("j-1"),
            stream: full,
        };
        (command, out.encode_within(usize::MAX).unwrap())
    }

    #[test]
    fn the_bytes_are_those_of_the_owned_command() {
        let history = [
            ChatMessage::new(Role::User, "hi\n\"there\""),
            ChatMessage::new(Role::Assistant, "héllo"),
        ];
        let new = [ChatMessage::new(Role::User, "again")];
        for full in [false, true] {
            let (command, bytes) = turn(&history, &new, full);
            assert_eq!(
                String::from_utf8(bytes.clone()).unwrap(),
                String::from_utf8(encode(&command)).unwrap()
            );
            assert_eq!(decode_command(&bytes, 1 << 20, "pi-1").unwrap(), command);
        }
    }

    #[test]
    fn the_oldest_history_is_left_out_to_fit_and_the_new_messages_never() {
        let history: Vec<ChatMessage> = (0..10)
            .map(|i| ChatMessage::new(Role::User, format!("message {i} {}", "x".repeat(50))))
            .collect();
        let new = [ChatMessage::new(Role::User, "now")];
        let (_, whole) = turn(&history, &new, false);
        let kept: Vec<Box<RawValue>> = history.iter().map(json).collect();
        let refs: Vec<&RawValue> = kept.iter().map(|m| &**m).collect();
        let out = |max| {
            TurnOut {
                id: "t1-2",
                node: "pi-1",
                generation: 1,
                kind: TurnTag::Turn,
                agent: "alice",
                messages: MessagesOut {
                    history: &refs,
                    new: &new,
                },
                system: None,
                timeout_ms: None,
                job: None,
                stream: false,
            }
            .encode_within(max)
        };
        let max = whole.len() - 100;
        let cut = out(max).unwrap();
        assert!(cut.len() <= max);
        let command = decode_command(&cut, 1 << 20, "pi-1").unwrap();
        let CommandBody::Turn(request) = command.body else {
            panic!()
        };
        // Two of ~89 bytes each had to go, the oldest: 8 and "now" stay.
        assert_eq!(request.messages.len(), 9);
        assert!(request.messages[0].content.starts_with("message 2 "));
        assert_eq!(request.messages[8].content, "now");
        assert!(out(60).is_err(), "not even the new message fits");
    }
}
