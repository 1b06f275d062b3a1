//! A real Redis Sentinel group on loopback: one master, one replica, three sentinels.

use std::time::Duration;

use crate::{RedisServer, wait_for};

/// The name the sentinels know the master by.
pub const SENTINEL_MASTER: &str = "wsgate-master";

/// One master, one replica and three sentinels that agree on them.
pub struct SentinelGroup {
    pub master: RedisServer,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
}

/// A field of `INFO section` on `server`.
pub fn info_field(server: &RedisServer, section: &str, field: &str) -> Option<String> {
    let mut c = redis::Client::open(server.url())
        .ok()?
        .get_connection()
        .ok()?;
    let info: String = redis::cmd("INFO").arg(section).query(&mut c).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
}

/// What a sentinel knows of the master: (other sentinels, replicas).
fn sentinel_view(sentinel: &RedisServer) -> Option<(i64, i64)> {
    let mut c = redis::Client::open(sentinel.url())
        .ok()?
        .get_connection()
        .ok()?;
    let fields: Vec<String> = redis::cmd("SENTINEL")
        .arg("MASTER")
        .arg(SENTINEL_MASTER)
        .query(&mut c)
        .ok()?;
    let get = |name: &str| {
        fields
            .chunks(2)
            .find(|kv| kv[0] == name)
            .and_then(|kv| kv[1].parse().ok())
    };
    Some((get("num-other-sentinels")?, get("num-slaves")?))
}

impl SentinelGroup {
    /// Starts the group; returns once the replica is linked and every sentinel knows the
    /// other two and the replica.
    pub fn start() -> Self {
        let master = RedisServer::start();
        let replica = RedisServer::start_replica_of(master.port());
        wait_for("the replica's link", Duration::from_secs(20), || {
            info_field(&replica, "replication", "master_link_status").as_deref() == Some("up")
        });
        let sentinels: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_sentinel(master.port(), SENTINEL_MASTER))
            .collect();
        // Sentinels find each other and the replica through the master (hello every 2 s).
        for s in &sentinels {
            wait_for("the sentinels' view", Duration::from_secs(30), || {
                sentinel_view(s) == Some((2, 1))
            });
        }
        Self {
            master,
            replica,
            sentinels,
        }
    }

    /// The port of the master the first sentinel names now.
    pub fn named_master_port(&self) -> Option<u16> {
        let mut c = redis::Client::open(self.sentinels[0].url())
            .ok()?
            .get_connection()
            .ok()?;
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SENTINEL_MASTER)
            .query(&mut c)
            .ok()?;
        Some(port)
    }

    /// A gateway process on this group (key prefix `prefix`, 500 ms Redis timeout), ready.
    pub async fn gateway(&self, prefix: &str, extra: &[&str]) -> crate::ProcessGateway {
        let list = self.sentinel_list();
        let mut args = vec![
            "--redis-sentinels",
            list.as_str(),
            "--redis-sentinel-master",
            SENTINEL_MASTER,
            "--key-prefix",
            prefix,
            "--connect-timeout-ms",
            "500",
        ];
        args.extend_from_slice(extra);
        let gw = crate::ProcessGateway::spawn(&args).await;
        crate::wait_ready(&gw.http(), 200).await;
        gw
    }

    /// `host:port` of every sentinel, comma-separated (for `--redis-sentinels`).
    pub fn sentinel_list(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port()))
            .collect::<Vec<_>>()
            .join(",")
    }
}
