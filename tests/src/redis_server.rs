//! A real `redis-server` on a free loopback port, without persistence, killed on drop.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Starts a server on a free port (retrying with a new port if one is lost to a race).
    pub fn start() -> Self {
        for _ in 0..20 {
            let port = free_port();
            if let Some(child) = Self::spawn(port) {
                return Self {
                    port,
                    child: Some(child),
                };
            }
        }
        panic!("could not start redis-server (is it installed? `make test` installs it)");
    }

    fn spawn(port: u16) -> Option<Child> {
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server not found: `make test` installs it (apt-get install redis-server)",
            );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return None; // exited: the port was taken
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(child);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's pid (while running).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("redis-server is not running")
            .id()
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (after [`kill`](Self::kill)).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = Self::spawn(self.port) {
                self.child = Some(child);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("could not restart redis-server on port {}", self.port);
    }

    /// Sends a signal (`-STOP`, `-CONT`, …) to the server.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// A plain connection for inspecting the server (PUBSUB, PUBLISH…).
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// `PUBSUB CHANNELS pattern`, sorted.
    pub fn channels(&self, pattern: &str) -> Vec<String> {
        let mut c = self.connection();
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("CHANNELS")
            .arg(pattern)
            .query(&mut c)
            .unwrap();
        v.sort();
        v
    }

    /// `PUBSUB NUMSUB channel`.
    pub fn numsub(&self, channel: &str) -> i64 {
        let mut c = self.connection();
        let v: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query(&mut c)
            .unwrap();
        v.first().map_or(0, |(_, n)| *n)
    }

    /// `PUBLISH channel payload`, returning the receiver count.
    pub fn publish(&self, channel: &str, payload: &[u8]) -> i64 {
        let mut c = self.connection();
        redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut c)
            .unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen server would ignore SIGKILL's cleanup until continued; SIGKILL works anyway.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}
