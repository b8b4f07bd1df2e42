//! The results of recently answered turns, kept so that a turn command that
//! arrives again (the coordinator resends turns in flight after either side
//! reconnects, because a result published while it was away is lost) gets
//! the same answer again instead of silence or a second Ollama call.
//!
//! Bounded by count and by bytes: a Pi keeps at most [`MAX_BYTES`] of
//! answers, dropping the oldest first.

use std::collections::VecDeque;

/// Answers remembered at most.
pub const MAX_ANSWERS: usize = 64;
/// Bytes of encoded replies remembered at most.
pub const MAX_BYTES: usize = 2 * 1024 * 1024;

#[derive(Default)]
pub struct AnsweredTurns {
    answers: VecDeque<(String, Vec<u8>)>,
    bytes: usize,
}

impl AnsweredTurns {
    /// Remembers the encoded reply to turn `id`. A reply larger than
    /// [`MAX_BYTES`] is not kept.
    pub fn insert(&mut self, id: String, reply: Vec<u8>) {
        if reply.len() > MAX_BYTES {
            return;
        }
        self.bytes += reply.len();
        self.answers.push_back((id, reply));
        while self.answers.len() > MAX_ANSWERS || self.bytes > MAX_BYTES {
            match self.answers.pop_front() {
                Some((_, old)) => self.bytes -= old.len(),
                None => break,
            }
        }
    }

    /// The encoded reply to turn `id`, if it is still remembered.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.answers
            .iter()
            .rev()
            .find(|(known, _)| known == id)
            .map(|(_, reply)| reply.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_found_by_its_turn_id() {
        let mut answered = AnsweredTurns::default();
        answered.insert("t-1".into(), b"one".to_vec());
        answered.insert("t-2".into(), b"two".to_vec());
        assert_eq!(answered.get("t-1"), Some(&b"one"[..]));
        assert_eq!(answered.get("t-2"), Some(&b"two"[..]));
        assert_eq!(answered.get("t-3"), None);
    }

    #[test]
    fn the_oldest_answers_go_first_when_count_or_bytes_run_out() {
        let mut answered = AnsweredTurns::default();
        for i in 0..MAX_ANSWERS + 3 {
            answered.insert(format!("t-{i}"), vec![0; 10]);
        }
        assert_eq!(answered.get("t-2"), None);
        assert!(answered.get("t-3").is_some());
        assert_eq!(answered.answers.len(), MAX_ANSWERS);

        let big = MAX_BYTES / 2 + 1;
        answered.insert("big-1".into(), vec![1; big]);
        answered.insert("big-2".into(), vec![2; big]);
        assert_eq!(answered.get("big-1"), None, "two do not fit");
        assert!(answered.get("big-2").is_some());
        assert!(answered.bytes <= MAX_BYTES);
        answered.insert("huge".into(), vec![3; MAX_BYTES + 1]);
        assert_eq!(answered.get("huge"), None);
        assert!(
            answered.get("big-2").is_some(),
            "a reply too big is not kept"
        );
    }
}
