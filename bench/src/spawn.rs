//! Starting a local redis-server and gateway processes, and making sure they die with the
//! bench: every child is `kill_on_drop`, and [`Spawned`]'s own `Drop` kills it too, so an
//! error, a panic unwinding through the scenario or Ctrl-C (which drops the scenario future)
//! all end them. Only a SIGKILL of the bench itself can leave them behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

use crate::resp::{self, RedisTarget};

const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Gateway log lines at WARN or ERROR are forwarded to stderr, up to this many per gateway.
const FORWARDED_LOG_LINES: usize = 20;

/// One child process.
pub struct Spawned {
    pub name: String,
    pub pid: u32,
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Spawned {
    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// What `--spawn` started.
pub struct Cluster {
    pub redis: Option<Spawned>,
    pub gateways: Vec<Spawned>,
}

/// How to start the cluster.
pub struct SpawnOptions {
    pub replicas: u16,
    pub with_redis: bool,
    pub wsgate_bin: PathBuf,
    pub redis_bin: PathBuf,
    pub key_prefix: Option<String>,
    pub extra_args: Vec<String>,
}

/// `wsgate` next to this binary (as `cargo build` lays them out in `target/<profile>/`).
///
/// # Errors
/// When the path of the running binary is unknown.
pub fn default_wsgate_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("this binary has no directory"))?;
    Ok(dir.join("wsgate"))
}

impl Cluster {
    /// Starts redis-server (when asked) and the gateways; returns once every gateway logged
    /// its listening address.
    ///
    /// # Errors
    /// A binary is missing, a process exits early or does not come up in time.
    pub async fn start(opts: &SpawnOptions) -> Result<Self> {
        let redis = if opts.with_redis {
            let r = start_redis(&opts.redis_bin).await?;
            eprintln!("[spawn] redis-server pid {} on {}", r.pid, r.addr);
            Some(r)
        } else {
            None
        };
        let mut cluster = Cluster {
            redis,
            gateways: Vec::new(),
        };
        let redis_url = cluster
            .redis
            .as_ref()
            .map(|r| format!("redis://{}", r.addr));
        for i in 0..opts.replicas {
            let g = start_gateway(opts, usize::from(i), redis_url.as_deref()).await?;
            eprintln!("[spawn] {} pid {} on {}", g.name, g.pid, g.addr);
            cluster.gateways.push(g);
        }
        Ok(cluster)
    }

    pub fn redis_target(&self) -> Option<RedisTarget> {
        self.redis.as_ref().map(|r| RedisTarget {
            addr: r.addr,
            user: None,
            password: None,
        })
    }

    /// Kills everything and reaps it.
    pub async fn stop(self) {
        for g in self.gateways {
            g.stop().await;
        }
        if let Some(r) = self.redis {
            r.stop().await;
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

async fn start_redis(bin: &Path) -> Result<Spawned> {
    // The free port can be taken between our probe and redis' bind: retry with another one.
    for _ in 0..5 {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (install it with `apt-get install redis-server`, or pass \
                     --redis-server-bin)",
                    bin.display()
                )
            })?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("redis-server exited at once"))?;
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        let target = RedisTarget {
            addr,
            user: None,
            password: None,
        };
        loop {
            if child.try_wait()?.is_some() {
                break; // most likely lost the port: try another
            }
            if let Ok(mut c) = resp::Client::connect(&target).await
                && c.command(&["PING"]).await.is_ok()
            {
                return Ok(Spawned {
                    name: "redis-server".into(),
                    pid,
                    addr,
                    child,
                });
            }
            if tokio::time::Instant::now() > deadline {
                bail!("redis-server on {addr} did not answer PING in time");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    bail!("redis-server kept exiting at start-up (5 attempts)")
}

async fn start_gateway(
    opts: &SpawnOptions,
    index: usize,
    redis_url: Option<&str>,
) -> Result<Spawned> {
    let name = format!("gateway-{index}");
    let mut cmd = Command::new(&opts.wsgate_bin);
    // A clean, known configuration: the caller's WSGATE_* variables do not leak in; their
    // flags can still be passed with --gateway-arg.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WSGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("WSGATE_LOG_FORMAT", "text")
        .env("WSGATE_LOG", "info")
        .args(["--listen", "127.0.0.1:0"]);
    if let Some(url) = redis_url {
        cmd.args(["--redis-url", url]);
    }
    if let Some(prefix) = &opts.key_prefix {
        cmd.args(["--key-prefix", prefix]);
    }
    cmd.args(&opts.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} (build it with `cargo build --release -p wsgate`, or pass \
             --wsgate-bin)",
            opts.wsgate_bin.display()
        )
    })?;
    let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| anyhow!("{name}: no stderr pipe"))?;
    let mut spawned = Spawned {
        name: name.clone(),
        pid,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        child,
    };
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(addr) = listen_addr(&line) {
                return Ok::<_, std::io::Error>(Some(addr));
            }
            seen.push(line);
        }
        Ok(None)
    })
    .await;
    match found {
        Ok(Ok(Some(addr))) => spawned.addr = addr,
        Ok(_) => bail!(
            "{name} exited before listening:\n{}",
            seen.iter()
                .rev()
                .take(10)
                .rev()
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        ),
        Err(_) => bail!("{name} logged no `listen=` line within {START_TIMEOUT:?}"),
    }
    tokio::spawn(forward_log(name, lines));
    Ok(spawned)
}

/// Keeps reading the gateway's stderr (a full pipe would block its logging) and forwards
/// warnings and errors.
async fn forward_log(name: String, mut lines: tokio::io::Lines<BufReader<ChildStderr>>) {
    let mut forwarded = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            forwarded += 1;
            if forwarded <= FORWARDED_LOG_LINES {
                eprintln!("[{name}] {line}");
            } else if forwarded == FORWARDED_LOG_LINES + 1 {
                eprintln!("[{name}] (further warnings not shown)");
            }
        }
    }
}

/// The address in a `listen=127.0.0.1:PORT` field of a text log line.
fn listen_addr(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .and_then(|v| v.trim_matches('"').parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listen_field_is_found_in_a_text_log_line() {
        let line = "2026-11-28T08:00:00.000000Z  INFO wsgate: wsgate listening \
                    listen=127.0.0.1:40123 metrics=None broker=\"memory\" key_prefix=ws";
        assert_eq!(listen_addr(line), Some("127.0.0.1:40123".parse().unwrap()));
        assert_eq!(listen_addr("metrics_listen=127.0.0.1:1 nothing"), None);
        assert_eq!(listen_addr("INFO wsgate: starting"), None);
    }
}
