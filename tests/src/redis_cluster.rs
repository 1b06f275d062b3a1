//! A real Redis Cluster on loopback: `redis-server` nodes joined by `redis-cli --cluster
//! create`, killed on drop.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use crate::{RedisServer, wait_for};

/// Masters and replicas, every one a `redis-server` child process.
pub struct RedisCluster {
    /// The nodes, in the order given to `redis-cli --cluster create` (masters first).
    pub nodes: Vec<RedisServer>,
    dir: std::path::PathBuf,
    /// The `default` user's password, when the nodes require one.
    password: Option<String>,
}

impl RedisCluster {
    /// `masters` masters with `replicas` replicas each. Returns once every node agrees that
    /// all slots are served and every replica's link to its master is up.
    pub fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None)
    }

    /// The same, with every node requiring `password` (clients and replication alike).
    pub fn start_with_password(masters: usize, replicas: usize, password: &str) -> Self {
        Self::start_with(masters, replicas, Some(password))
    }

    fn start_with(masters: usize, replicas: usize, password: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "wsgate-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let auth: Vec<&str> = match password {
            Some(pw) => vec!["--requirepass", pw, "--masterauth", pw],
            None => Vec::new(),
        };
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_cluster_node(&dir, &auth))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut cli = Command::new("redis-cli");
        if let Some(pw) = password {
            // Through the environment, not the command line.
            cli.env("REDISCLI_AUTH", pw);
        }
        let out = cli
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli not found: `make test` installs it (apt-get install redis-server)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self {
            nodes,
            dir,
            password: password.map(str::to_owned),
        };
        cluster.wait_settled(Duration::from_secs(60));
        cluster
    }

    /// Waits until every running node says the cluster is ok, all of them agree on who
    /// serves which slots, and every replica's link to its master is up.
    pub fn wait_settled(&self, limit: Duration) {
        wait_for("a settled cluster", limit, || {
            let mut maps = Vec::new();
            for (i, n) in self.nodes.iter().enumerate() {
                if !n.is_running() {
                    continue;
                }
                if self.info(i, "cluster", "cluster_state").as_deref() != Some("ok") {
                    return false;
                }
                if self.info(i, "replication", "role").as_deref() == Some("slave")
                    && self.info(i, "replication", "master_link_status").as_deref() != Some("up")
                {
                    return false;
                }
                match self.slot_owners(i) {
                    Some(m) if m.len() == usize::from(wsgate::broker::redis::SLOTS) => {
                        maps.push(m);
                    }
                    _ => return false,
                }
            }
            maps.windows(2).all(|w| w[0] == w[1])
        });
    }

    /// The `host:port` of every node, comma-separated (for `--redis-cluster-nodes`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A field of `INFO section` on node `i`.
    pub fn info(&self, i: usize, section: &str, field: &str) -> Option<String> {
        let mut c = self.try_connection(i)?;
        let text: String = if section == "cluster" {
            redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok()?
        } else {
            redis::cmd("INFO").arg(section).query(&mut c).ok()?
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_owned())
    }

    fn try_connection(&self, i: usize) -> Option<redis::Connection> {
        let n = &self.nodes[i];
        if !n.is_running() {
            return None;
        }
        let url = match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", n.port()),
            None => n.url(),
        };
        let client = redis::Client::open(url).ok()?;
        client
            .get_connection_with_timeout(Duration::from_secs(2))
            .ok()
    }

    /// Node `i`'s view: the port of the master of every slot it knows a master for.
    fn slot_owners(&self, i: usize) -> Option<HashMap<u16, u16>> {
        let mut c = self.try_connection(i)?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut c).ok()?;
        let mut owners = HashMap::new();
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                return None;
            };
            let (Some(redis::Value::Int(first)), Some(redis::Value::Int(last))) =
                (parts.first(), parts.get(1))
            else {
                return None;
            };
            let Some(redis::Value::Array(master)) = parts.get(2) else {
                return None;
            };
            let Some(redis::Value::Int(port)) = master.get(1) else {
                return None;
            };
            for s in *first..=*last {
                owners.insert(u16::try_from(s).ok()?, u16::try_from(*port).ok()?);
            }
        }
        Some(owners)
    }

    /// The index of the node serving `slot`, asked of any running node.
    pub fn master_of_slot(&self, slot: u16) -> usize {
        for i in 0..self.nodes.len() {
            if let Some(port) = self.slot_owners(i).and_then(|m| m.get(&slot).copied()) {
                return self.index_of(port);
            }
        }
        panic!("no node knows who serves slot {slot}");
    }

    /// The index of the node serving channel (or key) `name`.
    pub fn master_of(&self, name: &str) -> usize {
        self.master_of_slot(wsgate::broker::redis::slot_of(name.as_bytes()))
    }

    fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .expect("a node of this cluster")
    }

    /// The indexes of the running masters.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.info(*i, "replication", "role").as_deref() == Some("master"))
            .collect()
    }

    /// `PUBSUB SHARDCHANNELS pattern` on node `i`, sorted.
    pub fn shard_channels(&self, i: usize, pattern: &str) -> Vec<String> {
        let mut c = self.try_connection(i).expect("a running node");
        let mut v: Vec<String> = redis::cmd("PUBSUB")
            .arg("SHARDCHANNELS")
            .arg(pattern)
            .query(&mut c)
            .unwrap();
        v.sort();
        v
    }

    /// `PUBSUB SHARDNUMSUB` of `channels` on node `i`.
    pub fn shard_numsub(&self, i: usize, channels: &[String]) -> HashMap<String, i64> {
        let mut c = self.try_connection(i).expect("a running node");
        let v: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(channels)
            .query(&mut c)
            .unwrap();
        v.into_iter().collect()
    }

    /// `SPUBLISH channel payload` on the channel's master, returning the receiver count.
    pub fn spublish(&self, channel: &str, payload: &[u8]) -> i64 {
        let mut c = self
            .try_connection(self.master_of(channel))
            .expect("a running master");
        redis::cmd("SPUBLISH")
            .arg(channel)
            .arg(payload)
            .query(&mut c)
            .unwrap()
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    fn node_id(&self, i: usize) -> String {
        let mut c = self.try_connection(i).expect("a running node");
        redis::cmd("CLUSTER").arg("MYID").query(&mut c).unwrap()
    }

    /// Moves `slot` to the master `to`, keys and all, the way `redis-cli --cluster reshard`
    /// does: IMPORTING on the target, MIGRATING on the source, MIGRATE the keys, then the
    /// new owner announced to every master.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.master_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let mut src = self.try_connection(from).unwrap();
        let mut dst = self.try_connection(to).unwrap();
        let setslot = |c: &mut redis::Connection, how: &str, id: &str| {
            let () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg(how)
                .arg(id)
                .query(c)
                .unwrap();
        };
        setslot(&mut dst, "IMPORTING", &from_id);
        setslot(&mut src, "MIGRATING", &to_id);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut src)
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(self.nodes[to].port())
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query(&mut src)
                .unwrap();
        }
        setslot(&mut dst, "NODE", &to_id);
        setslot(&mut src, "NODE", &to_id);
        for m in self.masters() {
            if m != from && m != to {
                let mut c = self.try_connection(m).unwrap();
                setslot(&mut c, "NODE", &to_id);
            }
        }
        wait_for(
            "the slot's new owner known everywhere",
            Duration::from_secs(30),
            || {
                (0..self.nodes.len())
                    .filter(|i| self.nodes[*i].is_running())
                    .all(|i| {
                        self.slot_owners(i).and_then(|m| m.get(&slot).copied())
                            == Some(self.nodes[to].port())
                    })
            },
        );
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
