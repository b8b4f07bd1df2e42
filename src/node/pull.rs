//! Model pulls asked by the coordinator (a `pull` command): Ollama's
//! `/api/pull` streamed through ollama-rs, at most `ollama.max_pulls` at
//! once (the rest wait for a slot), one per model. Progress goes back as
//! [`PullProgress`] replies: when a pull starts, about once a second while
//! bytes arrive, at least every [`PROGRESS_AT_LEAST`] while it waits or
//! Ollama is quiet (the coordinator takes a silent pull for a lost one),
//! and when it ends. An Ollama that says nothing for [`OLLAMA_SILENT`]
//! fails the pull. The node lists a pulled model in its capacity at once
//! (the next probe confirms it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::ollama::OllamaClient;
use super::stream::ReplySink;
use crate::protocol::{PullProgress, PullState, ReplyBody};

/// Progress replies while bytes arrive are this far apart at least.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// ...and at most this far apart, whatever happens.
const PROGRESS_AT_LEAST: Duration = Duration::from_secs(10);
/// A pull whose Ollama says nothing for this long has failed.
const OLLAMA_SILENT: Duration = Duration::from_secs(300);

/// A pull that ended.
pub(super) struct PullDone {
    pub model: String,
    pub ok: bool,
}

pub(super) struct Pulls {
    slots: Arc<Semaphore>,
    active: HashSet<String>,
    done_tx: mpsc::UnboundedSender<PullDone>,
    /// Pulls that ended, for the node's main loop.
    pub done: mpsc::UnboundedReceiver<PullDone>,
}

impl Pulls {
    pub fn new(max_pulls: u32) -> Pulls {
        let (done_tx, done) = mpsc::unbounded_channel();
        Pulls {
            slots: Arc::new(Semaphore::new(max_pulls as usize)),
            active: HashSet::new(),
            done_tx,
            done,
        }
    }

    /// Starts pulling `model`, unless it is being pulled already (the
    /// coordinator hears of that pull's progress).
    pub fn start(&mut self, model: String, ollama: OllamaClient, replies: ReplySink) -> bool {
        if !self.active.insert(model.clone()) {
            return false;
        }
        let (slots, done) = (self.slots.clone(), self.done_tx.clone());
        tokio::spawn(async move {
            let ok = pull(&ollama, &model, &replies, &slots).await;
            let _ = done.send(PullDone { model, ok });
        });
        true
    }

    pub fn finished(&mut self, model: &str) {
        self.active.remove(model);
    }
}

fn progress(model: &str, state: PullState, status: &str) -> PullProgress {
    PullProgress {
        model: model.to_owned(),
        state,
        status: status.to_owned(),
        completed: 0,
        total: 0,
        error: None,
    }
}

/// One pull to its end; whether it succeeded.
async fn pull(ollama: &OllamaClient, model: &str, replies: &ReplySink, slots: &Semaphore) -> bool {
    let send = |p: &PullProgress| replies.send(ReplyBody::PullProgress(p.clone()));
    let mut now = progress(model, PullState::Pulling, "waiting for a pull slot");
    send(&now);
    let slot = loop {
        match tokio::time::timeout(PROGRESS_AT_LEAST, slots.acquire()).await {
            Ok(Ok(slot)) => break slot,
            Ok(Err(_)) => return false,
            Err(_) => send(&now), // still waiting: say so
        }
    };
    let _slot = slot;
    let fail = |mut now: PullProgress, error: String| {
        log::warn!("pull of {model} failed: {error}");
        now.state = PullState::Failed;
        now.error = Some(error);
        send(&now);
        false
    };
    log::info!("pulling {model} from {}", ollama.url());
    let mut stream = match ollama.pull_stream(model).await {
        Ok(stream) => stream,
        Err(e) => return fail(now, e),
    };
    let mut sent = Instant::now();
    let mut heard = Instant::now();
    loop {
        let item = match tokio::time::timeout(PROGRESS_AT_LEAST, stream.next()).await {
            Err(_) if heard.elapsed() >= OLLAMA_SILENT => {
                let error = format!("Ollama said nothing for {}s", OLLAMA_SILENT.as_secs());
                return fail(now, error);
            }
            Err(_) => {
                sent = Instant::now();
                send(&now);
                continue;
            }
            Ok(None) => break,
            Ok(Some(item)) => item,
        };
        heard = Instant::now();
        let status = match item {
            Ok(status) => status,
            Err(e) => return fail(now, ollama.pull_error(e, model)),
        };
        now.status = status.message;
        now.completed = status.completed.unwrap_or(now.completed);
        now.total = status.total.unwrap_or(now.total);
        if now.status == "success" {
            log::info!("pulled {model}");
            now.state = PullState::Done;
            send(&now);
            return true;
        }
        if sent.elapsed() >= PROGRESS_EVERY {
            sent = Instant::now();
            send(&now);
        }
    }
    fail(now, "Ollama's pull stream ended before \"success\"".into())
}
