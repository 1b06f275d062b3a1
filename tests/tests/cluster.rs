//! Redis Cluster with sharded pub/sub: three masters and three replicas made by `redis-cli
//! --cluster create`, all real redis-server processes on loopback, and gateway processes
//! side by side.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rand::Rng;
use wsgate_tests::{Client, ProcessGateway, RedisCluster, wait_ready};

const PREFIX: &str = "cl";

/// Polls `check` every 50 ms until it holds, within `limit`.
async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: never happened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn channel(topic: &str) -> String {
    format!("{PREFIX}:{{{topic}}}")
}

async fn gateways(cluster: &RedisCluster, n: usize, extra: &[&str]) -> Vec<ProcessGateway> {
    let seeds = cluster.seeds();
    let mut args = vec![
        "--redis-cluster-nodes",
        seeds.as_str(),
        "--key-prefix",
        PREFIX,
        "--connect-timeout-ms",
        "500",
    ];
    args.extend_from_slice(extra);
    let mut gws = Vec::new();
    for _ in 0..n {
        let gw = ProcessGateway::spawn(&args).await;
        wait_ready(&gw.http(), 200).await;
        gws.push(gw);
    }
    gws
}

/// Topics whose channels land on every master (at least `per_master` each).
fn topics_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<String> {
    let masters = cluster.masters();
    let mut count: HashMap<usize, usize> = HashMap::new();
    let mut topics = Vec::new();
    for i in 0.. {
        if masters
            .iter()
            .all(|m| count.get(m).copied().unwrap_or(0) >= per_master)
        {
            break;
        }
        let t = format!("t{i}");
        *count.entry(cluster.master_of(&channel(&t))).or_default() += 1;
        topics.push(t);
    }
    topics
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_on_every_shard_reach_every_replica() {
    let cluster = RedisCluster::start(3, 1);
    let gws = gateways(&cluster, 2, &[]).await;
    let topics = topics_on_every_master(&cluster, 3);
    // On each replica a client joined to every topic.
    let mut clients = Vec::new();
    for gw in &gws {
        let mut c = gw.client().await;
        for t in &topics {
            c.join(t).await;
        }
        clients.push(c);
    }
    // Every topic's channel is subscribed on its own master only, by both replicas.
    for t in &topics {
        let ch = channel(t);
        let owner = cluster.master_of(&ch);
        for m in cluster.masters() {
            let n = cluster.shard_numsub(m, std::slice::from_ref(&ch))[&ch];
            assert_eq!(n, if m == owner { 2 } else { 0 }, "{ch} on node {m}");
        }
    }
    // Publishing on either replica reaches both.
    let mut want = BTreeSet::new();
    for (i, t) in topics.iter().enumerate() {
        let text = format!("{t}-m{i}");
        gws[i % 2].http().publish(t, &text).await;
        want.insert(text);
    }
    for c in &mut clients {
        let mut got = BTreeSet::new();
        while got.len() < want.len() {
            let text = c.next_text().await;
            assert!(got.insert(text.clone()), "{text} twice");
        }
        assert_eq!(got, want);
    }
    // Direct messages and broadcasts cross replicas too.
    let id = clients[1].socket_id.clone();
    gws[0].http().send(&id, "direct").await;
    assert_eq!(clients[1].next_text().await, "direct");
    let (status, _) = gws[1]
        .http()
        .post_json("/api/broadcast", serde_json::json!({"message": "all"}))
        .await;
    assert_eq!(status, 200);
    for c in &mut clients {
        assert_eq!(c.next_text().await, "all");
    }
    let _: Vec<Client> = clients;
}
