//! `pifleet chat` reading the server-sent events of `POST /v1/chat` with
//! `"stream": true` (docs/API.md): text is printed as it arrives, and the
//! `done` event carries the whole answer, as without streaming.

use std::io::Write;

use serde_json::Value;

use super::Failure;
use crate::protocol::ChatAnswer;

/// Prints the `delta` events' text as it comes; the `done` event's answer.
pub(super) async fn print_events(
    mut response: reqwest::Response,
) -> Result<(Value, ChatAnswer), Failure> {
    let fail = |message: String| Failure { code: 1, message };
    let mut buffer = Vec::new();
    let mut stdout = std::io::stdout();
    loop {
        let chunk = response
            .chunk()
            .await
            .map_err(|e| fail(format!("the answer's stream broke off: {e}")))?;
        let Some(chunk) = chunk else {
            return Err(fail("the answer's stream ended before its end".into()));
        };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = find(&buffer, b"\n\n") {
            let event: Vec<u8> = buffer.drain(..end + 2).collect();
            let (name, data) = parse(&String::from_utf8_lossy(&event));
            let data: Value = serde_json::from_str(&data)
                .map_err(|e| fail(format!("an event of the answer is not JSON: {e}")))?;
            match name.as_str() {
                "delta" => {
                    print!("{}", data["content"].as_str().unwrap_or(""));
                    let _ = stdout.flush();
                }
                "done" => {
                    println!();
                    let view = ChatAnswer::deserialize_from(&data).map_err(fail)?;
                    return Ok((data, view));
                }
                "error" => {
                    println!();
                    let error = data["error"].as_str().unwrap_or("the answer failed");
                    let code = data["code"].as_str().unwrap_or("");
                    return Err(fail(format!("{error} ({code})")));
                }
                _ => {} // unknown events are for newer clients
            }
        }
    }
}

impl ChatAnswer {
    fn deserialize_from(data: &Value) -> Result<ChatAnswer, String> {
        serde::Deserialize::deserialize(data)
            .map_err(|e| format!("the answer's done event is not understood: {e}"))
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// An event's name and data (its `data:` lines joined).
fn parse(event: &str) -> (String, String) {
    let mut name = String::from("message");
    let mut data = Vec::new();
    for line in event.lines() {
        if let Some(value) = line.strip_prefix("event:") {
            name = value.trim().to_owned();
        } else if let Some(value) = line.strip_prefix("data:") {
            data.push(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    (name, data.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_read_by_name_and_data() {
        assert_eq!(
            parse("event: delta\ndata: {\"content\":\"a\"}\n\n"),
            ("delta".into(), "{\"content\":\"a\"}".into())
        );
        assert_eq!(
            parse("data: x\ndata: y\n\n"),
            ("message".into(), "x\ny".into())
        );
        assert_eq!(find(b"ab\n\ncd", b"\n\n"), Some(2));
    }
}
