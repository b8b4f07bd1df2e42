//! Merging the publishes that wait at the same time into batches: each
//! batchable payload joins the open batch of its topic, as one JSON array
//! of payloads within the payload limit. A request that may not be batched
//! (a retained message, a subscription, a command that must keep its place)
//! closes every open batch, so nothing overtakes it or is overtaken by it;
//! between topics, order was never kept by MQTT anyway.

use std::collections::HashMap;
use std::time::Instant;

use super::Outbound;

enum Slot {
    One(Outbound),
    Batch {
        topic: String,
        payloads: Vec<Vec<u8>>,
        /// Bytes of the array: brackets, payloads and commas.
        bytes: usize,
    },
}

/// `requests`, in order, with the batchable publishes of each topic merged
/// into arrays of at most `max` bytes, and those that expired by `now`
/// left out. A batch of one payload goes out as that payload.
pub(super) fn merge(requests: Vec<Outbound>, max: usize, now: Instant) -> Vec<Outbound> {
    let mut out: Vec<Slot> = Vec::with_capacity(requests.len());
    let mut open: HashMap<String, usize> = HashMap::new();
    for request in requests {
        match request {
            Outbound::Publish {
                expires: Some(expires),
                ..
            } if expires <= now => {
                log::debug!("dropped a message that expired while the broker was away");
            }
            Outbound::Publish {
                topic,
                payload,
                batch: true,
                ..
            } => {
                if let Some(Slot::Batch {
                    payloads, bytes, ..
                }) = open.get(&topic).map(|&i| &mut out[i])
                {
                    if *bytes + 1 + payload.len() <= max {
                        *bytes += 1 + payload.len();
                        payloads.push(payload);
                        continue;
                    }
                }
                open.insert(topic.clone(), out.len());
                out.push(Slot::Batch {
                    topic,
                    bytes: payload.len() + 2,
                    payloads: vec![payload],
                });
            }
            other => {
                open.clear();
                out.push(Slot::One(other));
            }
        }
    }
    out.into_iter().map(into_request).collect()
}

fn into_request(slot: Slot) -> Outbound {
    let (topic, mut payloads, bytes) = match slot {
        Slot::One(request) => return request,
        Slot::Batch {
            topic,
            payloads,
            bytes,
        } => (topic, payloads, bytes),
    };
    let payload = if payloads.len() == 1 {
        payloads.pop().unwrap_or_default()
    } else {
        let mut array = Vec::with_capacity(bytes);
        array.push(b'[');
        for (i, p) in payloads.iter().enumerate() {
            if i > 0 {
                array.push(b',');
            }
            array.extend_from_slice(p);
        }
        array.push(b']');
        array
    };
    Outbound::Publish {
        topic,
        payload,
        retain: false,
        expires: None,
        batch: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn publish(topic: &str, payload: &str, batch: bool) -> Outbound {
        Outbound::Publish {
            topic: topic.into(),
            payload: payload.as_bytes().to_vec(),
            retain: false,
            expires: None,
            batch,
        }
    }

    /// Each request as `topic payload`.
    fn shown(requests: Vec<Outbound>) -> Vec<String> {
        requests
            .into_iter()
            .map(|r| match r {
                Outbound::Publish { topic, payload, .. } => {
                    format!("{topic} {}", String::from_utf8(payload).unwrap())
                }
                Outbound::Subscribe(f) => format!("subscribe {}", f.join(",")),
                Outbound::Disconnect => "disconnect".into(),
            })
            .collect()
    }

    #[test]
    fn batchable_payloads_of_a_topic_go_as_one_array_in_order() {
        let requests = vec![
            publish("a", r#"{"n":1}"#, true),
            publish("b", r#"{"n":2}"#, true),
            publish("a", r#"{"n":3}"#, true),
            publish("a", r#"{"n":4}"#, true),
        ];
        assert_eq!(
            shown(merge(requests, 1000, Instant::now())),
            [r#"a [{"n":1},{"n":3},{"n":4}]"#, r#"b {"n":2}"#]
        );
    }

    #[test]
    fn nothing_overtakes_a_request_that_may_not_be_batched() {
        let requests = vec![
            publish("a", "1", true),
            publish("a", "2", false),
            publish("a", "3", true),
            Outbound::Subscribe(vec!["x".into()]),
            publish("a", "4", true),
            publish("a", "5", true),
        ];
        assert_eq!(
            shown(merge(requests, 1000, Instant::now())),
            ["a 1", "a 2", "a 3", "subscribe x", "a [4,5]"]
        );
    }

    #[test]
    fn a_batch_stays_within_the_payload_limit() {
        let requests: Vec<Outbound> = (0..5).map(|_| publish("a", "12345", true)).collect();
        // [12345,12345] is 13 bytes: two fit in 13, not three.
        assert_eq!(
            shown(merge(requests, 13, Instant::now())),
            ["a [12345,12345]", "a [12345,12345]", "a 12345"]
        );
    }

    #[test]
    fn expired_publishes_are_left_out() {
        let now = Instant::now();
        let mut late = publish("a", "1", true);
        if let Outbound::Publish { expires, .. } = &mut late {
            *expires = Some(now - Duration::from_millis(1));
        }
        let mut due = publish("a", "2", true);
        if let Outbound::Publish { expires, .. } = &mut due {
            *expires = Some(now + Duration::from_secs(1));
        }
        assert_eq!(shown(merge(vec![late, due], 100, now)), ["a 2"]);
    }
}
