//! A real `redis-server` on a free loopback port, without persistence, killed on drop.

use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// With TLS: the folder holding the test CA and the server's certificate.
    tls: Option<std::path::PathBuf>,
    /// Extra server arguments (kept for restarts).
    extra: Vec<String>,
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
        Self::start_with(None, &[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. ACL users).
    pub fn start_args(extra: &[&str]) -> Self {
        Self::start_with(None, extra)
    }

    /// Starts a server that only speaks TLS (`rediss://`), with a certificate for 127.0.0.1
    /// signed by a throw-away CA (see [`ca_file`](Self::ca_file)).
    pub fn start_tls() -> Self {
        let dir =
            std::env::temp_dir().join(format!("wsgate-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl not found");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let ca = [
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=wsgate test CA",
        ];
        openssl(&[&["req", "-x509"][..], &ec, &ca].concat());
        let csr = [
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ];
        openssl(&[&["req"][..], &ec, &csr].concat());
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        Self::start_with(Some(dir), &[])
    }

    fn start_with(tls: Option<std::path::PathBuf>, extra: &[&str]) -> Self {
        let extra: Vec<String> = extra.iter().map(|s| (*s).to_owned()).collect();
        for _ in 0..20 {
            let port = free_port();
            if let Some(child) = Self::spawn(port, tls.as_deref(), &extra) {
                return Self {
                    port,
                    child: Some(child),
                    tls,
                    extra,
                };
            }
        }
        panic!("could not start redis-server (is it installed? `make test` installs it)");
    }

    /// A replica of the server on `master_port`.
    pub fn start_replica_of(master_port: u16) -> Self {
        Self::start_args(&["--replicaof", "127.0.0.1", &master_port.to_string()])
    }

    /// A Redis Sentinel watching the master on `master_port` as `name` (quorum 2, a master is
    /// down after 500 ms without an answer). Its configuration file lives in the temp folder.
    pub fn start_sentinel(master_port: u16, name: &str) -> Self {
        let conf = std::env::temp_dir().join(format!(
            "wsgate-sentinel-{}-{}.conf",
            std::process::id(),
            free_port()
        ));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor {name} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 5000\n\
                 sentinel parallel-syncs {name} 1\n"
            ),
        )
        .unwrap();
        Self::start_args(&[conf.to_str().unwrap(), "--sentinel"])
    }

    /// A Redis Cluster node (not yet part of a cluster: see `RedisCluster`), keeping its
    /// cluster state in `dir` (so that a restart rejoins). Its cluster bus port is a second
    /// free port, a master is failed over after 1 s without an answer.
    pub fn start_cluster_node(dir: &std::path::Path, extra_args: &[&str]) -> Self {
        for _ in 0..20 {
            let port = free_port();
            let bus = free_port();
            let mut extra: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &format!("nodes-{port}.conf"),
                "--cluster-node-timeout",
                "1000",
                "--cluster-port",
                &bus.to_string(),
                "--dir",
                &dir.to_string_lossy(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            extra.extend(extra_args.iter().map(|s| (*s).to_owned()));
            if let Some(child) = Self::spawn(port, None, &extra) {
                return Self {
                    port,
                    child: Some(child),
                    tls: None,
                    extra,
                };
            }
        }
        panic!("could not start a redis-server cluster node");
    }

    /// Whether the process runs (not killed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The CA certificate (PEM) of a TLS server.
    pub fn ca_file(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|d| d.join("ca.pem").to_string_lossy().into_owned())
    }

    fn spawn(port: u16, tls: Option<&std::path::Path>, extra: &[String]) -> Option<Child> {
        let mut cmd = Command::new("redis-server");
        cmd.args(extra);
        match tls {
            None => {
                cmd.args(["--port", &port.to_string()]);
            }
            Some(dir) => {
                let file = |name: &str| dir.join(name).to_string_lossy().into_owned();
                cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cert-file", &file("server.pem")])
                    .args(["--tls-key-file", &file("server.key")])
                    .args([
                        "--tls-ca-cert-file",
                        &file("ca.pem"),
                        "--tls-auth-clients",
                        "no",
                    ]);
            }
        }
        let mut child = cmd
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
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
            if let Some(child) = Self::spawn(self.port, self.tls.as_deref(), &self.extra) {
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

    /// The `sub=` count (channels subscribed) of every client connection subscribed to at
    /// least one channel, from `CLIENT LIST`, sorted.
    pub fn subscriber_connections(&self) -> Vec<i64> {
        let mut c = self.connection();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut c).unwrap();
        let mut subs: Vec<i64> = list
            .lines()
            .filter_map(|line| {
                line.split(' ')
                    .find_map(|field| field.strip_prefix("sub="))
                    .and_then(|n| n.parse().ok())
            })
            .filter(|n| *n > 0)
            .collect();
        subs.sort_unstable();
        subs
    }

    /// How many times Redis ran `command` (lowercase, e.g. `subscribe`) since it started, from
    /// `INFO commandstats` (0 when never).
    pub fn command_calls(&self, command: &str) -> u64 {
        let mut c = self.connection();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        let key = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|line| line.strip_prefix(&key))
            .and_then(|rest| rest.split(',').next())
            .map_or(0, |n| n.parse().unwrap())
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
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
