//! A slow, lossy link on loopback, as TCP sees one. This kernel has no
//! `netem`, so a proxy plays the link in user space: every chunk read from
//! one side is delivered to the other after `delay ± jitter`, and a
//! `loss` share of them waits one more retransmission timeout first (200
//! to 600 ms, as Linux resends a lost segment), holding back what follows,
//! since TCP delivers in order. Nothing is dropped: a lost packet costs a
//! TCP connection time, not data.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct LinkShape {
    pub delay: Duration,
    pub jitter: Duration,
    /// Share of chunks that wait a retransmission timeout more.
    pub loss: f64,
}

pub struct LossyLink {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LossyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LossyLink {
    /// Accepts connections on a free loopback port and relays each to
    /// `target_port` through the shaped link, both ways.
    pub async fn start(target_port: u16, shape: LinkShape) -> LossyLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut seed = 0;
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                seed += 2;
                tokio::spawn(relay(cr, sw, shape, seed));
                tokio::spawn(relay(sr, cw, shape, seed + 1));
            }
        });
        LossyLink { port, task }
    }
}

/// One direction: read, stamp a delivery time (never before the previous
/// one), deliver in order.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shape: LinkShape,
    seed: u64,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut last = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let jitter = shape.jitter.as_secs_f64();
        let mut delay = shape.delay.as_secs_f64() + rng.random_range(-jitter..=jitter);
        if rng.random_bool(shape.loss) {
            delay += rng.random_range(0.2..0.6);
        }
        let at = (Instant::now() + Duration::from_secs_f64(delay.max(0.0))).max(last);
        last = at;
        if tx.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
