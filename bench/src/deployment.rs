//! The gateways a scenario talks to: given with `--target`/`--api`, or started with `--spawn`.
//! Only loopback addresses are accepted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{Context, Result, anyhow, bail};
use reqwest::Url;

use crate::cli::Common;
use crate::client::WsEndpoint;
use crate::procfs::{self, Role, Watched};
use crate::resp::RedisTarget;
use crate::spawn::{self, Cluster, SpawnOptions};

/// Endpoints, publishing API, processes to measure, and what was started for the scenario.
pub struct Deployment {
    pub replicas: Vec<WsEndpoint>,
    pub api: Api,
    pub processes: Vec<Watched>,
    pub redis: Option<RedisTarget>,
    pub key_prefix: String,
    cluster: Option<Cluster>,
}

/// Where and how to publish.
#[derive(Debug, Clone)]
pub struct Api {
    pub base: Url,
    pub key: Option<String>,
}

impl Api {
    pub fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("building the URL for {path}"))
    }
}

impl Deployment {
    /// Resolves the options: starts processes for `--spawn`, checks targets otherwise.
    ///
    /// # Errors
    /// Bad or non-loopback URLs, missing targets, processes that do not start.
    pub async fn open(common: &Common) -> Result<Self> {
        let ws_path = normalise_path(&common.ws_path)?;
        let key_prefix = common.key_prefix.clone().unwrap_or_else(|| "ws".into());
        let mut processes = Vec::new();
        let (replicas, api_base, redis, cluster) = if let Some(n) = common.spawn {
            let opts = SpawnOptions {
                replicas: n,
                with_redis: n >= 2 || common.redis || common.redis_cluster.is_some(),
                cluster_masters: common.redis_cluster,
                wsgate_bin: match &common.wsgate_bin {
                    Some(p) => p.clone(),
                    None => spawn::default_wsgate_bin()?,
                },
                redis_bin: common.redis_server_bin.clone(),
                key_prefix: common.key_prefix.clone(),
                extra_args: common.gateway_args.clone(),
            };
            let cluster = Cluster::start(&opts).await?;
            let replicas = cluster
                .gateways
                .iter()
                .map(|g| WsEndpoint {
                    addr: g.addr,
                    url: format!("ws://{}{ws_path}", g.addr),
                })
                .collect::<Vec<_>>();
            for g in &cluster.gateways {
                processes.push(Watched {
                    name: g.name.clone(),
                    pid: g.pid,
                    role: Role::Gateway,
                });
            }
            for r in cluster.redis.iter().chain(&cluster.redis_nodes) {
                processes.push(Watched {
                    name: r.name.clone(),
                    pid: r.pid,
                    role: Role::Redis,
                });
            }
            let api = Url::parse(&format!("http://{}/", cluster.gateways[0].addr))?;
            let redis = cluster.redis_target();
            (replicas, api, redis, Some(cluster))
        } else {
            if common.targets.is_empty() {
                bail!("give --target ws://127.0.0.1:PORT (once per replica), or --spawn N");
            }
            let replicas = common
                .targets
                .iter()
                .map(|t| ws_endpoint(t, &ws_path))
                .collect::<Result<Vec<_>>>()?;
            let api = match &common.api {
                Some(a) => http_base(a)?,
                None => Url::parse(&format!("http://{}/", replicas[0].addr))?,
            };
            let redis = common.redis_url.as_deref().map(redis_target).transpose()?;
            (replicas, api, redis, None)
        };
        for &pid in &common.pids {
            processes.push(Watched::external(pid)?);
        }
        processes.push(Watched::bench());
        let mut replicas = replicas;
        if let Some(token) = &common.token {
            // Every connection presents it on its upgrade (`--auth` gateways).
            for r in &mut replicas {
                let sep = if r.url.contains('?') { '&' } else { '?' };
                r.url = format!("{}{sep}token={token}", r.url);
            }
        }
        Ok(Self {
            replicas,
            api: Api {
                base: api_base,
                key: common.api_key.clone(),
            },
            processes,
            redis,
            key_prefix,
            cluster,
        })
    }

    /// Gateways (spawned or `--pid`) whose open-file limit is below `needed`.
    pub fn warn_fd_limits(&self, needed_per_gateway: usize) {
        for p in self.processes.iter().filter(|p| p.role != Role::Bench) {
            if p.role == Role::Redis {
                continue;
            }
            if let Some(limit) = procfs::nofile_limit(p.pid)
                && (limit as usize) < needed_per_gateway + 64
            {
                eprintln!(
                    "warning: {} may run out of file descriptors: limit {limit}, needs about {}; \
                     raise the hard limit (`ulimit -Hn`, LimitNOFILE=) before starting it",
                    p.name,
                    needed_per_gateway + 64
                );
            }
        }
    }

    pub fn spawned(&self) -> bool {
        self.cluster.is_some()
    }

    /// Stops whatever was started.
    pub async fn close(mut self) {
        if let Some(c) = self.cluster.take() {
            c.stop().await;
        }
    }
}

fn normalise_path(p: &str) -> Result<String> {
    if !p.starts_with('/') {
        bail!("--ws-path must start with /");
    }
    Ok(p.to_string())
}

/// Loopback only: this tool generates load, and load goes nowhere but this machine.
fn loopback_addr(url: &Url, default_port: u16) -> Result<SocketAddr> {
    let port = url.port().unwrap_or(default_port);
    let host = url.host_str().unwrap_or("");
    let ip = if host.eq_ignore_ascii_case("localhost") {
        Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .ok()
    };
    let Some(ip) = ip.filter(IpAddr::is_loopback) else {
        bail!("{url}: only loopback addresses (127.0.0.0/8, localhost, [::1]) are allowed");
    };
    Ok(SocketAddr::new(ip, port))
}

pub fn ws_endpoint(target: &str, default_path: &str) -> Result<WsEndpoint> {
    let url = Url::parse(target).with_context(|| format!("--target {target}"))?;
    if url.scheme() != "ws" {
        bail!("--target {target}: expected ws://HOST:PORT[/PATH]");
    }
    let addr = loopback_addr(&url, 80)?;
    let path = match url.path() {
        "" | "/" => default_path,
        p => p,
    };
    // A query (e.g. `?token=`) stays: helper processes get the parent's full URLs.
    let query = url.query().map(|q| format!("?{q}")).unwrap_or_default();
    Ok(WsEndpoint {
        addr,
        url: format!("ws://{addr}{path}{query}"),
    })
}

fn http_base(api: &str) -> Result<Url> {
    let url = Url::parse(api).with_context(|| format!("--api {api}"))?;
    if url.scheme() != "http" {
        bail!("--api {api}: expected http://HOST:PORT");
    }
    let addr = loopback_addr(&url, 80)?;
    Url::parse(&format!("http://{addr}/")).map_err(|e| anyhow!("--api {api}: {e}"))
}

fn redis_target(s: &str) -> Result<RedisTarget> {
    let url = Url::parse(s).with_context(|| format!("--redis-url {s}"))?;
    if url.scheme() != "redis" {
        bail!("--redis-url {s}: expected redis://[user:pass@]HOST:PORT");
    }
    let addr = loopback_addr(&url, 6379)?;
    let password = url.password().map(str::to_string);
    let user = Some(url.username())
        .filter(|u| !u.is_empty() && password.is_some())
        .map(str::to_string);
    Ok(RedisTarget {
        addr,
        user,
        password,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_get_the_default_path_and_must_be_loopback() {
        let e = ws_endpoint("ws://127.0.0.1:8080", "/ws").unwrap();
        assert_eq!(e.url, "ws://127.0.0.1:8080/ws");
        let e = ws_endpoint("ws://localhost:9/custom", "/ws").unwrap();
        assert_eq!(e.url, "ws://127.0.0.1:9/custom");
        assert!(ws_endpoint("ws://[::1]:8080", "/ws").is_ok());
        assert!(ws_endpoint("ws://10.0.0.1:8080", "/ws").is_err());
        assert!(ws_endpoint("ws://example.com:8080", "/ws").is_err());
        assert!(ws_endpoint("http://127.0.0.1:8080", "/ws").is_err());
    }

    #[test]
    fn api_and_redis_urls_must_be_loopback() {
        assert_eq!(
            http_base("http://127.0.0.1:8080").unwrap().as_str(),
            "http://127.0.0.1:8080/"
        );
        assert!(http_base("http://192.168.1.2:8080").is_err());
        let r = redis_target("redis://:secret@127.0.0.1:7000").unwrap();
        assert_eq!(r.addr.port(), 7000);
        assert_eq!(r.password.as_deref(), Some("secret"));
        assert_eq!(r.user, None);
        assert!(redis_target("redis://redis.example:6379").is_err());
    }
}
