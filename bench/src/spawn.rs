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
    /// With `--redis-cluster`: the Redis Cluster's masters (and no `redis`).
    pub redis_nodes: Vec<Spawned>,
    pub gateways: Vec<Spawned>,
}

/// How to start the cluster.
pub struct SpawnOptions {
    pub replicas: u16,
    pub with_redis: bool,
    /// A Redis Cluster of this many masters instead of one redis-server.
    pub cluster_masters: Option<u16>,
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
        let redis_nodes = match opts.cluster_masters {
            Some(n) => start_redis_cluster(&opts.redis_bin, n).await?,
            None => Vec::new(),
        };
        let redis = if opts.with_redis && redis_nodes.is_empty() {
            let r = start_redis(&opts.redis_bin, &[], "redis-server".into()).await?;
            eprintln!("[spawn] redis-server pid {} on {}", r.pid, r.addr);
            Some(r)
        } else {
            None
        };
        let mut cluster = Cluster {
            redis,
            redis_nodes,
            gateways: Vec::new(),
        };
        let redis_args: Vec<String> = if let Some(r) = &cluster.redis {
            vec!["--redis-url".into(), format!("redis://{}", r.addr)]
        } else if !cluster.redis_nodes.is_empty() {
            let nodes: Vec<String> = cluster
                .redis_nodes
                .iter()
                .map(|r| r.addr.to_string())
                .collect();
            vec!["--redis-cluster-nodes".into(), nodes.join(",")]
        } else {
            Vec::new()
        };
        for i in 0..opts.replicas {
            let g = start_gateway(opts, usize::from(i), &redis_args).await?;
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
        for r in self.redis.into_iter().chain(self.redis_nodes) {
            r.stop().await;
        }
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

/// `n` cluster-enabled redis-servers joined by `redis-cli --cluster create` as masters
/// without replicas; returns once every node says the cluster is ok.
async fn start_redis_cluster(bin: &Path, n: u16) -> Result<Vec<Spawned>> {
    let dir = std::env::temp_dir().join(format!("wsgate-bench-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let bus = free_port()?;
        let extra = vec![
            "--cluster-enabled".to_owned(),
            "yes".into(),
            "--cluster-config-file".into(),
            format!("nodes-{i}-{bus}.conf"),
            "--cluster-port".into(),
            bus.to_string(),
            "--dir".into(),
            dir.to_string_lossy().into_owned(),
        ];
        let node = start_redis(bin, &extra, format!("redis-shard-{i}")).await?;
        eprintln!(
            "[spawn] redis-server (cluster node {i}) pid {} on {}",
            node.pid, node.addr
        );
        nodes.push(node);
    }
    let cli = bin.with_file_name(
        bin.file_name()
            .map(|f| f.to_string_lossy().replace("redis-server", "redis-cli"))
            .unwrap_or_else(|| "redis-cli".into()),
    );
    let out = Command::new(&cli)
        .args(["--cluster", "create"])
        .args(nodes.iter().map(|n| n.addr.to_string()))
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .await
        .with_context(|| format!("cannot run {}", cli.display()))?;
    if !out.status.success() {
        bail!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let deadline = tokio::time::Instant::now() + START_TIMEOUT * 2;
    for node in &nodes {
        let target = RedisTarget {
            addr: node.addr,
            user: None,
            password: None,
        };
        loop {
            let ok = match resp::Client::connect(&target).await {
                Ok(mut c) => c.command(&["CLUSTER", "INFO"]).await.ok().is_some_and(|v| {
                    matches!(v, resp::Reply::Bulk(Some(t))
                            if String::from_utf8_lossy(&t).contains("cluster_state:ok"))
                }),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the Redis Cluster on {} never became ok", node.addr);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(nodes)
}

async fn start_redis(bin: &Path, extra: &[String], name: String) -> Result<Spawned> {
    // The free port can be taken between our probe and redis' bind: retry with another one.
    for _ in 0..5 {
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(extra)
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
                    name,
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
    redis_args: &[String],
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
    cmd.args(redis_args);
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
