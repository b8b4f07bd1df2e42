//! The MQTT contract shared by the node, the coordinator and simulators:
//! topics ([`topics`]), payloads ([`messages`]) and their bounded decoding.
//! Nothing here does I/O, so a fleet simulator can reuse it as is.

mod listing;
mod messages;
mod topics;
mod turn_out;
mod views;

pub use listing::*;
pub use messages::*;
pub use topics::{validate_node_id, validate_topic_root, NodeTopic, Topics};
pub use turn_out::{MessagesOut, TurnOut, TurnTag};
pub use views::*;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Default bound on an MQTT payload, both directions: 1 MiB holds a turn with
/// 100 history messages of ~10 KB each, or the capacity message of a node
/// hosting ~20,000 agents.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// Why a payload was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("payload is not valid JSON for this topic: {0}")]
    Json(#[from] serde_json::Error),
    #[error("payload names node {payload:?} but arrived on the topic of node {topic:?}")]
    WrongNode { payload: String, topic: String },
}

/// Decodes a JSON payload of at most `max` bytes.
pub fn decode<T: DeserializeOwned>(payload: &[u8], max: usize) -> Result<T, DecodeError> {
    check_size(payload, max)?;
    Ok(serde_json::from_slice(payload)?)
}

/// Decodes a command that arrived on the command topic of `topic_node`,
/// rejecting one addressed to another node.
pub fn decode_command(
    payload: &[u8],
    max: usize,
    topic_node: &str,
) -> Result<Command, DecodeError> {
    check_size(payload, max)?;
    let command = match serde_json::from_slice::<TurnWire>(payload) {
        Ok(TurnWire {
            id,
            node,
            generation,
            kind,
            agent: Some(agent),
            messages: Some(messages),
            system,
            timeout_ms,
            job,
            stream,
        }) if kind == "turn" => Command {
            id,
            node,
            generation,
            body: CommandBody::Turn(TurnRequest {
                agent,
                messages,
                system,
                timeout_ms,
                job,
                stream,
            }),
        },
        // Another command, or one the derived decoder explains the fault of.
        _ => serde_json::from_slice(payload)?,
    };
    if command.node != topic_node {
        return Err(DecodeError::WrongNode {
            payload: command.node,
            topic: topic_node.to_owned(),
        });
    }
    Ok(command)
}

/// Decodes a node's reply of at most `max` bytes.
pub fn decode_reply(payload: &[u8], max: usize) -> Result<Reply, DecodeError> {
    check_size(payload, max)?;
    let envelope = serde_json::from_slice::<Envelope>(payload);
    let body = match envelope.as_ref().map(|e| e.kind.as_str()) {
        Ok("turn_result") => ReplyBody::TurnResult(serde_json::from_slice(payload)?),
        Ok("turn_chunk") => ReplyBody::TurnChunk(serde_json::from_slice(payload)?),
        _ => return Ok(serde_json::from_slice(payload)?),
    };
    let e = envelope.expect("matched Ok above");
    match e.session {
        Some(session) => Ok(Reply {
            id: e.id,
            node: e.node,
            session,
            generation: e.generation,
            body,
        }),
        None => Ok(serde_json::from_slice(payload)?), // names what is missing
    }
}

/// Whether `payload` is a batch: a JSON array of messages, each as it
/// would travel alone (docs/PROTOCOL.md, "Batches").
pub fn is_batch(payload: &[u8]) -> bool {
    payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// The messages of a batch of at most `max` bytes, each to decode alone.
pub fn split_batch(payload: &[u8], max: usize) -> Result<Vec<&[u8]>, DecodeError> {
    check_size(payload, max)?;
    let parts: Vec<&serde_json::value::RawValue> = serde_json::from_slice(payload)?;
    Ok(parts.into_iter().map(|p| p.get().as_bytes()).collect())
}

fn check_size(payload: &[u8], max: usize) -> Result<(), DecodeError> {
    if payload.len() > max {
        return Err(DecodeError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    Ok(())
}

/// The fields around the body of a [`Command`] or a [`Reply`]. The derived
/// decoders of both buffer the whole message first (serde's `flatten` and
/// internal tags), every chat message of a turn's history included: the
/// turn, its result and its chunks, the messages of every chat, are
/// decoded from this and their body instead, without that copy
/// (docs/BENCHMARKS.md, "Cheaper chats").
/// A turn command in one pass: [`Envelope`] and [`TurnRequest`] together.
#[derive(serde::Deserialize)]
struct TurnWire {
    id: String,
    node: String,
    generation: u64,
    #[serde(rename = "type")]
    kind: String,
    agent: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    stream: bool,
}

#[derive(serde::Deserialize)]
struct Envelope {
    id: String,
    node: String,
    #[serde(default)]
    session: Option<String>,
    generation: u64,
    #[serde(rename = "type")]
    kind: String,
}

/// Encodes a payload. Serialising these plain types cannot fail.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("protocol types always serialise")
}

/// Whether `name` can be an Ollama model name: 1 to 200 characters, no
/// whitespace or control characters.
pub fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Normalises an Ollama model name as Ollama does: a name without a tag
/// means `:latest` (`llama3.2` → `llama3.2:latest`).
pub fn normalize_model(name: &str) -> String {
    let name = name.trim();
    let last_segment = name.rsplit('/').next().unwrap_or(name);
    if last_segment.contains(':') {
        name.to_owned()
    } else {
        format!("{name}:latest")
    }
}

/// A new random id: 16 hex digits (64 bits), for sessions and command ids.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Milliseconds on this process's monotonic clock (since its first call):
/// for deadlines and ages that must not jump with the wall clock. Never
/// sent to another machine.
pub fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Unix time in milliseconds: for display only (logs, events, `ts` fields).
/// Never compared with another machine's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
pub fn utc_timestamp(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn timestamps_are_utc_calendar_dates() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc_timestamp(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc_timestamp(1_795_392_000_000), "2026-11-23T00:00:00.000Z");
    }

    #[test]
    fn model_names_without_tag_mean_latest() {
        assert_eq!(normalize_model("llama3.2"), "llama3.2:latest");
        assert_eq!(normalize_model("llama3.2:latest"), "llama3.2:latest");
        assert_eq!(normalize_model("phi3.5:3.8b"), "phi3.5:3.8b");
        assert_eq!(
            normalize_model("registry:5000/me/model"),
            "registry:5000/me/model:latest"
        );
        assert_eq!(normalize_model("me/model:q4"), "me/model:q4");
    }

    #[test]
    fn commands_round_trip_with_their_type_tag() {
        let command = Command {
            id: "c1".into(),
            node: "pi-1".into(),
            generation: 7,
            body: CommandBody::Assign {
                agent: AgentSpec {
                    name: "alice".into(),
                    model: "llama3.2:latest".into(),
                    system: Some("be brief".into()),
                    labels: BTreeMap::new(),
                },
                placement: 3,
            },
        };
        let json = String::from_utf8(encode(&command)).unwrap();
        assert!(json.contains(r#""type":"assign""#), "{json}");
        let back: Command = decode(json.as_bytes(), 1024).unwrap();
        assert_eq!(back, command);
    }

    #[test]
    fn a_turn_result_round_trips_inside_a_reply() {
        let reply = Reply {
            id: "t1".into(),
            node: "pi-1".into(),
            session: "s".into(),
            generation: 2,
            body: ReplyBody::TurnResult(TurnResult::failed(
                "alice",
                None,
                TurnErrorCode::OllamaBusy,
                "busy".into(),
            )),
        };
        let bytes = encode(&reply);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(r#""code":"ollama_busy""#), "{text}");
        assert_eq!(decode::<Reply>(&bytes, 4096).unwrap(), reply);
    }

    /// The direct decoders of turns, results and chunks read what the
    /// derived ones read, every field set.
    #[test]
    fn turns_results_and_chunks_decode_as_the_derived_decoders_do() {
        let turn = Command {
            id: "t9".into(),
            node: "pi-1".into(),
            generation: 4,
            body: CommandBody::Turn(TurnRequest {
                agent: "alice".into(),
                messages: vec![
                    ChatMessage::new(Role::User, "a \"quoted\" line\n"),
                    ChatMessage::new(Role::Assistant, "ok"),
                ],
                system: Some("be brief".into()),
                timeout_ms: Some(1500),
                job: Some("j1".into()),
                stream: true,
            }),
        };
        let bytes = encode(&turn);
        assert_eq!(decode_command(&bytes, 4096, "pi-1").unwrap(), turn);
        assert_eq!(decode::<Command>(&bytes, 4096).unwrap(), turn);
        assert!(matches!(
            decode_command(&bytes, 4096, "pi-2"),
            Err(DecodeError::WrongNode { .. })
        ));
        let mut result = TurnResult::failed(
            "alice",
            Some("j1".into()),
            TurnErrorCode::Timeout,
            "slow".into(),
        );
        result.model = Some("llama3.2:latest".into());
        result.message = Some(ChatMessage::new(Role::Assistant, "hi"));
        result.usage = Some(Usage::default());
        result.chunks = 3;
        let chunk = TurnChunk {
            agent: "alice".into(),
            seq: 2,
            content: "tok".into(),
        };
        for body in [ReplyBody::TurnResult(result), ReplyBody::TurnChunk(chunk)] {
            let reply = Reply {
                id: "t9".into(),
                node: "pi-1".into(),
                session: "s1".into(),
                generation: 4,
                body,
            };
            let bytes = encode(&reply);
            assert_eq!(decode_reply(&bytes, 4096).unwrap(), reply);
        }
        // A reply without its session is refused, as the derived decoder
        // refuses it, naming the field.
        let no_session = br#"{"id":"t9","node":"pi-1","generation":4,"type":"turn_chunk","agent":"a","seq":0,"content":"x"}"#;
        let e = decode_reply(no_session, 4096).unwrap_err().to_string();
        assert!(e.contains("session"), "{e}");
    }

    #[test]
    fn a_batch_splits_into_its_messages_as_sent() {
        let one = br#"{"id":"a","node":"pi-1","generation":1,"type":"drain","draining":true}"#;
        assert!(!is_batch(one));
        let batch = format!(
            " [{}, {}]",
            std::str::from_utf8(one).unwrap(),
            r#"{"x":"]"}"#
        );
        assert!(is_batch(batch.as_bytes()));
        let parts = split_batch(batch.as_bytes(), 1000).unwrap();
        assert_eq!(parts, [&one[..], br#"{"x":"]"}"#]);
        assert!(decode_command(parts[0], 1000, "pi-1").is_ok());
        assert!(matches!(
            split_batch(b"[{}, ", 1000),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            split_batch(batch.as_bytes(), 10),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn decoding_refuses_oversize_garbage_and_foreign_node_payloads() {
        assert!(matches!(
            decode::<Command>(&[b' '; 100], 10),
            Err(DecodeError::TooLarge { size: 100, max: 10 })
        ));
        assert!(matches!(
            decode::<Command>(b"{not json", 100),
            Err(DecodeError::Json(_))
        ));
        let drain = br#"{"id":"x","node":"pi-2","generation":1,"type":"drain","draining":true}"#;
        assert!(matches!(
            decode_command(drain, 1000, "pi-1"),
            Err(DecodeError::WrongNode { .. })
        ));
        assert!(decode_command(drain, 1000, "pi-2").is_ok());
    }
}
