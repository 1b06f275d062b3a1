//! Redis Cluster with sharded pub/sub: three masters and three replicas made by `redis-cli
//! --cluster create`, all real redis-server processes on loopback, and gateway processes
//! side by side.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use wsgate_tests::churn::{
    expected_numsub, expected_state, sharded, simulation, socket_tags, wait_local_counts,
};
use wsgate_tests::hostile::{expect_rejected_then_good, forged_announcements, hostile_envelopes};
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

/// Publishes `m{n}` to `topic` every 20 ms, alternating gateways, running `disrupt` after 20
/// messages; stops once 40 messages were accepted after it (bounded by 60 s). Returns the
/// accepted messages, how many were refused (503/504), and how long after the disruption
/// publishing was accepted again.
async fn publish_through(
    gws: &[ProcessGateway],
    topic: &str,
    disrupt: impl FnOnce(),
) -> (Vec<String>, usize, Duration) {
    let mut disrupt = Some(disrupt);
    let mut accepted = Vec::new();
    let mut refused = 0;
    let mut disrupted_at: Option<Instant> = None;
    let mut resumed_after = None;
    let mut after = 0;
    let limit = Instant::now() + Duration::from_secs(60);
    let mut n = 0u32;
    while Instant::now() < limit {
        if n == 20
            && let Some(d) = disrupt.take()
        {
            d();
            disrupted_at = Some(Instant::now());
        }
        let text = format!("m{n}");
        match gws[(n % 2) as usize]
            .http()
            .publish_status(topic, &text)
            .await
        {
            200 => {
                accepted.push(text);
                if let Some(at) = disrupted_at {
                    after += 1;
                    resumed_after.get_or_insert_with(|| at.elapsed());
                }
            }
            503 | 504 => refused += 1,
            other => panic!("publish answered {other}"),
        }
        n += 1;
        if after >= 40 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed = resumed_after.expect("publishing never resumed");
    (accepted, refused, resumed)
}

/// Every message in `want` reaches each client, none twice.
async fn expect_all(clients: &mut [Client], want: &[String]) {
    let want: BTreeSet<String> = want.iter().cloned().collect();
    for c in clients {
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            let text = c.next_text().await;
            assert!(got.insert(text.clone()), "{text} twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_its_topics_lose_no_acknowledged_message() {
    let mut cluster = RedisCluster::start(3, 1);
    let gws = gateways(&cluster, 2, &[]).await;
    let topic = "failover";
    let ch = channel(topic);
    let victim = cluster.master_of(&ch);
    let mut clients = Vec::new();
    for gw in &gws {
        for _ in 0..2 {
            let mut c = gw.client().await;
            c.join(topic).await;
            clients.push(c);
        }
    }
    let (accepted, refused, resumed) = publish_through(&gws, topic, || cluster.kill(victim)).await;
    println!(
        "cluster failover: publishes accepted again {resumed:?} after the master was killed; \
         {refused} refused (503/504) meanwhile, {} accepted in all",
        accepted.len()
    );
    expect_all(&mut clients, &accepted).await;
    // The promoted replica holds exactly the gateways' subscriptions, without any client
    // having done anything.
    let owner = cluster.master_of(&ch);
    assert_ne!(owner, victim);
    wait_until(
        "both replicas subscribed on the new master",
        Duration::from_secs(30),
        || cluster.shard_numsub(owner, std::slice::from_ref(&ch))[&ch] == 2,
    )
    .await;
    let _: Vec<Client> = clients;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_under_live_subscribers_keeps_every_subscription() {
    let cluster = RedisCluster::start(3, 1);
    let gws = gateways(&cluster, 2, &["--history-topics", "hist:*"]).await;
    let plain = "moving";
    let hist = "hist:moving";
    let mut clients = Vec::new();
    for gw in &gws {
        let mut c = gw.client().await;
        c.join(plain).await;
        c.join(hist).await;
        clients.push(c);
    }
    for t in [plain, hist] {
        let ch = channel(t);
        let slot = wsgate::broker::redis::slot_of(ch.as_bytes());
        let from = cluster.master_of(&ch);
        let to = *cluster.masters().iter().find(|m| **m != from).unwrap();
        // A history topic's stream and position move with the slot (same hash tag).
        gws[0].http().publish(t, "before").await;
        for c in &mut clients {
            assert_eq!(c.next_text().await, "before");
        }
        cluster.migrate_slot(slot, to);
        // A batch to another topic of that slot, at once: wherever the gateway's slot map
        // still points, every item is published (a MOVED answer is followed), none refused.
        let neighbour = (0..)
            .map(|i| format!("n{i}"))
            .find(|n| wsgate::broker::redis::slot_of(channel(n).as_bytes()) == slot)
            .unwrap();
        // First an item of a slot the old master keeps: a pipeline routed by a stale map
        // goes there, and the moved slot's items come back MOVED.
        let stays = (0..)
            .map(|i| format!("s{i}"))
            .find(|n| {
                let ch = channel(n);
                wsgate::broker::redis::slot_of(ch.as_bytes()) != slot
                    && cluster.master_of(&ch) == from
            })
            .unwrap();
        let mut items = vec![serde_json::json!({"topic": stays, "message": "stays"})];
        items.extend(
            (0..3).map(|i| serde_json::json!({"topic": neighbour, "message": format!("b{i}")})),
        );
        let (status, body) = gws[1]
            .http()
            .post_json("/api/batch", serde_json::json!({ "messages": items }))
            .await;
        assert_eq!(status, 200, "{body}");
        wait_until(
            "both replicas subscribed on the new master",
            Duration::from_secs(30),
            || {
                cluster.shard_numsub(to, std::slice::from_ref(&ch))[&ch] == 2
                    && cluster.shard_numsub(from, std::slice::from_ref(&ch))[&ch] == 0
            },
        )
        .await;
        for gw in &gws {
            gw.http()
                .publish(t, &format!("after from {}", gw.http().url("")))
                .await;
        }
        for c in &mut clients {
            let mut got = BTreeSet::new();
            got.insert(c.next_text().await);
            got.insert(c.next_text().await);
            assert_eq!(got.len(), 2);
        }
    }
    // The history moved along: a recovery from the first message finds the rest.
    let mut late = gws[1].client().await;
    let ack = late
        .join_since(hist, serde_json::json!({"offset": 0, "epoch": "none"}))
        .await;
    assert_eq!(ack["offset"], 3, "{ack}");
    let _: Vec<Client> = clients;
}

/// Polls every running node until the shard channels under the prefix are exactly `want`,
/// each subscribed on its slot's master only, with the expected number of subscribers.
async fn wait_shard_bookkeeping(cluster: &RedisCluster, want: &HashMap<String, i64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut seen: BTreeSet<(String, usize, i64)> = BTreeSet::new();
        for i in 0..cluster.nodes.len() {
            if !cluster.nodes[i].is_running() {
                continue;
            }
            let chans = cluster.shard_channels(i, &format!("{PREFIX}:*"));
            if chans.is_empty() {
                continue;
            }
            for (ch, n) in cluster.shard_numsub(i, &chans) {
                if n > 0 {
                    seen.insert((ch, i, n));
                }
            }
        }
        let expected: BTreeSet<(String, usize, i64)> = want
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(ch, n)| (ch.clone(), cluster.master_of(ch), *n))
            .collect();
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shard bookkeeping never converged: unexpected {:?}, missing {:?}",
            seen.difference(&expected).collect::<Vec<_>>(),
            expected.difference(&seen).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shard_subscriptions_equal_local_topics_after_random_churn_across_a_frozen_master() {
    let cluster = RedisCluster::start(3, 1);
    let gws = gateways(&cluster, 2, &[]).await;
    let tags = socket_tags(&gws).await;
    let (mut sims, mut churn) = simulation(20, 2, 30, 17);
    let mut ops = 0;
    for _ in 0..800 {
        churn.step(&mut sims, &gws, true).await;
        ops += 1;
    }
    // Freeze a master for 3 s: its replica takes over after 1 s. Churn goes on meanwhile
    // without waiting for acknowledgements (joins on its slots cannot be confirmed).
    let victim = cluster.masters()[0];
    cluster.nodes[victim].signal("-STOP");
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until && ops < 1600 {
        churn.step(&mut sims, &gws, false).await;
        ops += 1;
        // Spread over the whole freeze (bounded by count and time).
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    cluster.nodes[victim].signal("-CONT");
    cluster.wait_settled(Duration::from_secs(60));
    println!(
        "frozen master failed over: {}; {ops} operations so far",
        !cluster.masters().contains(&victim)
    );
    for gw in &gws {
        wait_ready(&gw.http(), 200).await;
    }
    while ops < 2000 {
        churn.step(&mut sims, &gws, true).await;
        ops += 1;
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    let want = sharded(PREFIX, expected_numsub(PREFIX, &per, &tags, false));
    wait_shard_bookkeeping(&cluster, &want).await;
    // Everyone leaves: nothing may be left behind on any node.
    for s in &mut sims {
        s.client = None;
        s.joined.clear();
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    let want = sharded(PREFIX, expected_numsub(PREFIX, &per, &tags, false));
    wait_shard_bookkeeping(&cluster, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_on_shard_channels_are_counted_and_good_messages_keep_flowing() {
    let cluster = RedisCluster::start(3, 1);
    let gws = gateways(&cluster, 1, &["--max-message-bytes", "1000"]).await;
    let mut c = gws[0].client().await;
    c.join("t").await;
    let bad = hostile_envelopes();
    for p in &bad {
        assert_eq!(cluster.spublish(&channel("t"), p), 1);
    }
    let forged = forged_announcements();
    for p in &forged {
        assert_eq!(cluster.spublish(&channel("__replicas__"), p), 1);
    }
    // A plain PUBLISH (a seed instance's) reaches no shard subscriber: not even counted.
    for node in &cluster.nodes {
        let seed = br#"{"topic":"t","message":"seed","isBinary":false}"#;
        assert_eq!(node.publish(&format!("{PREFIX}:t"), seed), 0);
    }
    let good = br#"{"topic":"t","message":"good","isBinary":false}"#;
    cluster.spublish(&channel("t"), good);
    expect_rejected_then_good(&gws[0].http(), &mut c, bad.len() + forged.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_while_a_slot_moves_loses_no_acknowledged_history_message() {
    let cluster = std::sync::Arc::new(RedisCluster::start(3, 1));
    let gws = gateways(&cluster, 2, &["--history-topics", "hist:*"]).await;
    let topics = ["hist:during", "during"];
    let mut clients = Vec::new();
    for gw in &gws {
        let mut c = gw.client().await;
        for t in topics {
            c.join(t).await;
        }
        clients.push(c);
    }
    // Both topics' channels in one slot would be needed to move them together; move each
    // topic's slot in turn while publishing to it (every 5 ms, alternating replicas).
    let mut lost_plain = 0;
    for topic in topics {
        let ch = channel(topic);
        let slot = wsgate::broker::redis::slot_of(ch.as_bytes());
        let from = cluster.master_of(&ch);
        let to = *cluster.masters().iter().find(|m| **m != from).unwrap();
        let mover = {
            let cluster = cluster.clone();
            tokio::task::spawn_blocking(move || cluster.migrate_slot(slot, to))
        };
        let mut accepted = Vec::new();
        let mut n = 0u32;
        let mut after = 0;
        while after < 20 && n < 5000 {
            let text = format!("{topic}-{n}");
            if gws[(n % 2) as usize]
                .http()
                .publish_status(topic, &text)
                .await
                == 200
            {
                accepted.push(text);
            }
            n += 1;
            if mover.is_finished() {
                after += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        mover.await.unwrap();
        if topic.starts_with("hist:") {
            // Whatever the window between the move and the resubscription, the history
            // fills it: every message answered 2xx arrives, once, in order.
            for c in &mut clients {
                let mut got = Vec::new();
                while got.len() < accepted.len() {
                    got.push(c.next_text().await);
                }
                assert_eq!(got, accepted);
            }
        } else {
            // A plain topic has no history: count what the window cost (the last messages,
            // published after the move, must arrive).
            gws[0].http().publish(topic, "last").await;
            for c in &mut clients {
                let got: BTreeSet<String> = c.texts_until("last").await.into_iter().collect();
                lost_plain += accepted.iter().filter(|m| !got.contains(*m)).count();
            }
            println!(
                "slot move under a plain topic: {lost_plain} of {} deliveries of accepted \
                 messages missed ({} messages to 2 replicas)",
                accepted.len() * 2,
                accepted.len()
            );
        }
    }
    let _: Vec<Client> = clients;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_cluster_takes_the_credentials_from_the_url() {
    let cluster = RedisCluster::start_with_password(3, 0, "s3cret-pw");
    // The URL's host is not used: only its credentials.
    let gws = gateways(
        &cluster,
        2,
        &["--redis-url", "redis://:s3cret-pw@not-used.invalid:1"],
    )
    .await;
    let topics = topics_on_every_master(&cluster, 1);
    let mut c = gws[1].client().await;
    for t in &topics {
        c.join(t).await;
    }
    for t in &topics {
        gws[0].http().publish(t, t).await;
        assert_eq!(&c.next_text().await, t);
    }
    // A wrong password: the gateway starts, stays unready, and refuses to publish.
    let seeds = cluster.seeds();
    let wrong = ProcessGateway::spawn(&[
        "--redis-cluster-nodes",
        &seeds,
        "--redis-url",
        "redis://:wrong@not-used.invalid:1",
        "--connect-timeout-ms",
        "500",
    ])
    .await;
    wait_ready(&wrong.http(), 503).await;
    assert_eq!(wrong.http().publish_status("t", "m").await, 503);
}
