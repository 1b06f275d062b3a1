//! Redis Sentinel: one master, one replica and three sentinels, all real redis-server
//! processes on loopback. The master is killed while two gateways publish steadily: delivery
//! resumes on the promoted replica without any client action, and every message answered 2xx
//! reaches every subscriber.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use wsgate_tests::{Client, ProcessGateway, RedisServer, wait_ready};

const MASTER: &str = "wsgate-master";

/// Polls `check` every 50 ms until it holds, within `limit`.
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn info_field(server: &RedisServer, section: &str, field: &str) -> Option<String> {
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
        .arg(MASTER)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_loses_no_acknowledged_message() {
    let mut master = RedisServer::start();
    let replica = RedisServer::start_replica_of(master.port());
    wait_for("the replica's link", Duration::from_secs(20), || {
        info_field(&replica, "replication", "master_link_status").as_deref() == Some("up")
    });
    let sentinels: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start_sentinel(master.port(), MASTER))
        .collect();
    // Sentinels find each other and the replica through the master (hello every 2 s).
    for s in &sentinels {
        wait_for("the sentinels' view", Duration::from_secs(30), || {
            sentinel_view(s) == Some((2, 1))
        });
    }
    let addrs: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port()))
        .collect();
    let list = addrs.join(",");
    let args = [
        "--redis-sentinels",
        list.as_str(),
        "--redis-sentinel-master",
        MASTER,
        "--key-prefix",
        "sent",
        "--connect-timeout-ms",
        "500",
    ];
    let gws = vec![
        ProcessGateway::spawn(&args).await,
        ProcessGateway::spawn(&args).await,
    ];
    for gw in &gws {
        wait_ready(&gw.http(), 200).await;
    }
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            let mut c = gw.client().await;
            c.join("t").await;
            clients.push(c);
        }
    }

    // Publish steadily, alternating replicas; kill the master after 20 messages; stop once
    // 20 messages were accepted after the kill (bounded by count and time).
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut killed_at = None;
    let mut resumed_after = None;
    let limit = Instant::now() + Duration::from_secs(60);
    let mut n = 0u32;
    while Instant::now() < limit {
        if n == 20 && killed_at.is_none() {
            master.kill();
            killed_at = Some(Instant::now());
        }
        let text = format!("m{n}");
        let status = gws[(n % 2) as usize]
            .http()
            .publish_status("t", &text)
            .await;
        match status {
            200 => {
                accepted.push(text);
                if let Some(k) = killed_at
                    && resumed_after.is_none()
                {
                    resumed_after = Some(k.elapsed());
                }
            }
            503 | 504 => refused += 1,
            other => panic!("publish answered {other}"),
        }
        n += 1;
        if resumed_after.is_some() && accepted.len() >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed_after.expect("publishing never resumed after the failover");
    println!(
        "failover: publishes accepted again {resumed:?} after the master was killed; {refused} \
         refused (503/504) meanwhile, {} accepted in all",
        accepted.len()
    );
    // Every message answered 2xx reaches every subscriber; nothing twice.
    let want: BTreeSet<String> = accepted.iter().cloned().collect();
    for c in &mut clients {
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            let text = c.next_text().await;
            assert!(got.insert(text.clone()), "{text} twice");
        }
    }
    // The promoted replica holds exactly the gateways' subscriptions.
    assert_eq!(replica.numsub("sent:t"), 2);
    assert_eq!(
        info_field(&replica, "replication", "role").as_deref(),
        Some("master")
    );
    let _: Vec<Client> = clients;
}
