//! A TCP relay on loopback that can be cut and healed: the partition of
//! `pifleet bench failover --mode partition` and of the fault tests. This
//! kernel has no netem, so the link is played in user space.
//!
//! A cut is a blackhole, not a reset: nothing is forwarded either way and no
//! FIN or RST is sent, so neither end can tell a cut from a silent peer
//! (a pulled cable, a Wi-Fi dropout). Bytes sent meanwhile wait and arrive
//! after the heal, in order, as TCP retransmissions would bring them. New
//! connections wait too (as a SYN would go unanswered) until the heal.
//!
//! It can also slow the link: with a delay set, every chunk waits that long
//! before it is passed on (a congested or distant link, one way).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Blackhole {
    pub port: u16,
    cut: watch::Sender<bool>,
    /// Milliseconds each chunk waits before it is passed on.
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Blackhole {
    /// Relays connections on a free loopback port to `target_port`.
    pub async fn start(target_port: u16) -> io::Result<Blackhole> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (cut, watch) = watch::channel(false);
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            let mut relays = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let mut open = watch.clone();
                let delay = delay.clone();
                relays.spawn(async move {
                    if open.wait_for(|cut| !*cut).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                        return; // the client sees its connection close
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = relay(cr, sw, open.clone(), delay.clone()) => {}
                        _ = relay(sr, cw, open, delay) => {}
                    }
                });
                while relays.try_join_next().is_some() {}
            }
        });
        Ok(Blackhole {
            port,
            cut,
            delay_ms,
            task,
        })
    }

    /// Makes every chunk wait `delay` (zero: none) before it is passed on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Cuts (`true`) or heals (`false`) every connection, present and future.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

/// One direction; returns when either side closes.
async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut open: watch::Receiver<bool>,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if open.wait_for(|cut| !*cut).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // Cut while waiting to read: stop reading until the heal.
            _ = open.wait_for(|cut| *cut) => continue,
        };
        let delay = delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Cut after reading: hold the bytes until the heal.
        if open.wait_for(|cut| !*cut).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cut_holds_bytes_without_closing_and_a_heal_delivers_them_in_order() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap().port();
        let hole = Blackhole::start(target).await.unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", hole.port)).await.unwrap();
        let (mut upstream, _) = server.accept().await.unwrap();
        client.write_all(b"one ").await.unwrap();
        let mut buf = [0u8; 16];
        let n = upstream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one ");
        hole.set_cut(true);
        client.write_all(b"two").await.unwrap();
        let held = tokio::time::timeout(Duration::from_millis(300), upstream.read(&mut buf)).await;
        assert!(held.is_err(), "nothing crosses a cut, and nothing closes");
        hole.set_cut(false);
        let n = upstream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"two");
        hole.set_delay(Duration::from_millis(300));
        let sent = std::time::Instant::now();
        client.write_all(b"three").await.unwrap();
        let n = upstream.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"three");
        assert!(
            sent.elapsed() >= Duration::from_millis(300),
            "{:?}",
            sent.elapsed()
        );
    }
}
