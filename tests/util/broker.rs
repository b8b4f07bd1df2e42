//! The test's own Mosquitto broker (Debian's package, on a free port).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;

fn mosquitto_binary() -> PathBuf {
    if let Ok(path) = std::env::var("PIFLEET_TEST_MOSQUITTO") {
        return PathBuf::from(path);
    }
    for candidate in [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/usr/bin/mosquitto",
    ] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("mosquitto is not installed: run the README's test command (scripts/test.sh), which installs it");
}

/// A Mosquitto broker of this test, killed when dropped.
pub struct Mosquitto {
    pub port: u16,
    /// With TLS only (no plain listener): the CA its certificate is signed by.
    pub ca: Option<PathBuf>,
    dir: tempfile::TempDir,
    child: Child,
    /// While killed: the port, bound and not listening, so that connections
    /// are refused and no other test's broker takes it meanwhile (its
    /// clients would then meet that test's daemons).
    held: Option<tokio::net::TcpSocket>,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_in(tempfile::tempdir().expect("temp dir"), None, "")
    }

    /// A broker bridged to the one on `peer`'s port for the fleet's topics,
    /// both ways, as docs/HA.md's bridge pair (reconnecting within a second).
    pub fn start_bridged(peer: &Mosquitto) -> Mosquitto {
        let bridge = format!(
            "connection pair\naddress 127.0.0.1:{}\ntopic pifleet/# both 1\ncleansession true\nrestart_timeout 1\n",
            peer.port
        );
        Self::start_in(tempfile::tempdir().expect("temp dir"), None, &bridge)
    }

    /// A broker with one listener, TLS, whose certificate (for 127.0.0.1)
    /// a fresh CA signed: `ca` is that CA's certificate.
    pub fn start_tls() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = super::tls::make_ca(dir.path(), "broker-ca");
        let tls = super::tls::server_cert(dir.path(), &ca, "127.0.0.1");
        Self::start_in(dir, Some((ca, tls)), "")
    }

    /// A broker in `dir`; `tail` ends its configuration (a bridge).
    fn start_in(
        dir: tempfile::TempDir,
        tls: Option<(super::tls::Ca, String)>,
        tail: &str,
    ) -> Mosquitto {
        let listener_extra = tls
            .as_ref()
            .map(|(_, conf)| conf.clone())
            .unwrap_or_default();
        for _ in 0..10 {
            let port = free_port();
            std::fs::write(
                dir.path().join("mosquitto.conf"),
                format!("listener {port} 127.0.0.1\n{listener_extra}allow_anonymous true\npersistence false\nset_tcp_nodelay true\nlog_dest stderr\n{tail}"),
            )
            .expect("write mosquitto.conf");
            if let Some(child) = Self::spawn(dir.path(), port) {
                let ca = tls.map(|(ca, _)| ca.cert);
                return Mosquitto {
                    port,
                    ca,
                    dir,
                    child,
                    held: None,
                };
            }
        }
        panic!("could not start mosquitto on a free port");
    }

    fn spawn(dir: &Path, port: u16) -> Option<Child> {
        let conf = dir.join("mosquitto.conf");
        let mut child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = child.try_wait() {
                return None; // exited: the port was taken meanwhile
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Someone answers: ours only if it is still running a moment
                // later (another test's broker that got the port first makes
                // this one exit with "Address already in use", and its
                // daemons would meet that test's).
                std::thread::sleep(Duration::from_millis(200));
                if let Ok(Some(_)) = child.try_wait() {
                    return None;
                }
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Kills the broker (SIGKILL) for good: its port stays closed.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.held = Some(hold(self.port));
    }

    /// Stops the broker (SIGKILL) and starts it again on the same port.
    pub fn restart(&mut self) {
        self.restart_after(Duration::ZERO);
    }

    /// Kills the broker, leaves the port closed for `down`, starts it again.
    pub fn restart_after(&mut self, down: Duration) {
        self.kill();
        std::thread::sleep(down);
        self.held = None;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(child) = Self::spawn(self.dir.path(), self.port) {
                self.child = child;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not restart on port {}",
                self.port
            );
        }
    }
}

/// The port bound (with `SO_REUSEADDR`, as the broker's own connections
/// linger in TIME_WAIT) and not listening: connections to it are refused,
/// and `free_port` does not hand it out.
fn hold(port: u16) -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket to hold the broker's port");
    socket.set_reuseaddr(true).expect("SO_REUSEADDR");
    socket
        .bind(([127, 0, 0, 1], port).into())
        .unwrap_or_else(|e| panic!("cannot hold port {port} while its broker is down: {e}"));
    socket
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
