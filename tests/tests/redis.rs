//! The Redis broker against a real redis-server and several real gateway processes.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use wsgate_tests::churn::{
    expected_numsub, expected_state, simulation, socket_tags, wait_local_counts,
};
use wsgate_tests::hostile::{expect_rejected_then_good, forged_announcements, hostile_envelopes};
use wsgate_tests::{
    Client, DEADLINE, Http, ProcessGateway, RawClient, Received, RedisServer, TcpProxy, fleet,
    metric, wait_ready,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_gateways_deliver_every_publish_to_every_subscriber_exactly_once() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 3, "fleet", &[]).await;
    let mut clients: Vec<(usize, Client)> = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        for _ in 0..3 {
            let mut c = gw.client().await;
            c.join("t").await;
            clients.push((i, c));
        }
    }
    for n in 0..30 {
        let via = &gws[n % 3];
        via.http().publish("t", &format!("m{n}")).await;
    }
    for (_, c) in &mut clients {
        for n in 0..30 {
            assert_eq!(c.next_text().await, format!("m{n}"));
        }
    }
    // Direct sends cross replicas: each client gets its own marker from a *different* gateway,
    // and nothing before it (so no duplicates above).
    for (i, c) in &mut clients {
        let via = &gws[(*i + 1) % 3];
        via.http().send(&c.socket_id, "marker").await;
        assert_eq!(c.next_text().await, "marker");
    }
    // Broadcast from one replica reaches all.
    let (status, _) = gws[1]
        .http()
        .post_json("/api/broadcast", json!({"message": "all"}))
        .await;
    assert_eq!(status, 200);
    for (_, c) in &mut clients {
        assert_eq!(c.next_text().await, "all");
    }
    // Binary survives the Redis round trip (base64 in the envelope).
    let payload: Vec<u8> = (0..=255u8).rev().collect();
    let r = gws[2]
        .http()
        .post("/api/publish?topic=t")
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (_, c) in &mut clients {
        assert_eq!(c.next().await, Received::Binary(payload.clone()));
    }
    // Disconnect reaches a socket on another replica.
    let (_, target) = clients.pop().unwrap();
    let mut target = target;
    let (status, _) = gws[0]
        .http()
        .post_json("/api/disconnect", json!({"socketId": target.socket_id}))
        .await;
    assert_eq!(status, 200);
    assert!(matches!(
        target.next().await,
        Received::Close(Some(1000), _)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_ack_arrives_only_after_redis_confirmed_the_subscribe() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "barrier", &[]).await;
    let mut c = gws[0].client().await;
    for i in 0..20 {
        let topic = format!("b{i}");
        c.join(&topic).await;
        // The ack came back: Redis must already list the subscription.
        assert_eq!(redis.numsub(&format!("barrier:{topic}")), 1, "{topic}");
        // And a publish straight to Redis right now reaches the client.
        let payload = format!(r#"{{"topic":"{topic}","message":"m{i}","isBinary":false}}"#);
        assert_eq!(
            redis.publish(&format!("barrier:{topic}"), payload.as_bytes()),
            1
        );
        assert_eq!(c.next_text().await, format!("m{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleets_with_different_prefixes_never_see_each_others_messages() {
    let redis = RedisServer::start();
    let a = fleet(&redis, 1, "alpha", &[]).await;
    let b = fleet(&redis, 1, "beta", &[]).await;
    let mut ca = a[0].client().await;
    let mut cb = b[0].client().await;
    ca.join("shared").await;
    cb.join("shared").await;
    a[0].http().publish("shared", "for alpha").await;
    b[0].http().publish("shared", "for beta").await;
    let (status, _) = a[0]
        .http()
        .post_json("/api/broadcast", json!({"message": "alpha all"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(ca.next_text().await, "for alpha");
    assert_eq!(ca.next_text().await, "alpha all");
    assert_eq!(cb.next_text().await, "for beta");
    b[0].http().send(&cb.socket_id, "marker").await;
    assert_eq!(cb.next_text().await, "marker");
    assert!(
        redis
            .channels("alpha:*")
            .iter()
            .all(|c| c.starts_with("alpha:"))
    );
    assert_eq!(redis.numsub("alpha:shared"), 1);
    assert_eq!(redis.numsub("beta:shared"), 1);
}

/// Polls Redis until every channel has exactly the expected number of subscribers (and no
/// other channel under the prefix has any).
async fn wait_bookkeeping(redis: &RedisServer, prefix: &str, want: &HashMap<String, i64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = redis.channels(&format!("{prefix}:*"));
        let mut mismatches = Vec::new();
        for ch in seen.iter().chain(want.keys()).collect::<BTreeSet<_>>() {
            let n = redis.numsub(ch);
            let w = want.get(ch).copied().unwrap_or(0);
            if n != w {
                mismatches.push(format!("{ch}: redis {n}, expected {w}"));
            }
        }
        if mismatches.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bookkeeping never converged: {mismatches:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_bookkeeping_matches_local_subscribers_after_thousands_of_random_operations() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 2, "churn", &[]).await;
    let tags = socket_tags(&gws).await;
    let (mut sims, mut churn) = simulation(24, 2, 12, 7);
    for _ in 0..2500 {
        churn.step(&mut sims, &gws, true).await;
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    wait_bookkeeping(
        &redis,
        "churn",
        &expected_numsub("churn", &per, &tags, false),
    )
    .await;
    // Everyone leaves: nothing may be left behind.
    for s in &mut sims {
        s.client = None;
        s.joined.clear();
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    wait_bookkeeping(
        &redis,
        "churn",
        &expected_numsub("churn", &per, &tags, false),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_during_churn_leaves_no_orphaned_or_missing_channels() {
    let redis = RedisServer::start();
    // With a channel per connection, as the seed keeps: the most channels to get right.
    let gws = fleet(
        &redis,
        2,
        "frozen",
        &[
            "--connect-timeout-ms",
            "300",
            "--socket-channels",
            "per-socket",
        ],
    )
    .await;
    let tags = socket_tags(&gws).await;
    let (mut sims, mut churn) = simulation(16, 2, 10, 11);
    for _ in 0..300 {
        churn.step(&mut sims, &gws, true).await;
    }
    // A publish before the freeze opens the publisher connection...
    gws[0]
        .http()
        .publish("nobody-joined", "before the freeze")
        .await;
    redis.signal("-STOP");
    // ... so this one is sent, but never answered: the outcome is unknown, hence 504.
    let status = gws[0]
        .http()
        .publish_status("nobody-joined", "while frozen")
        .await;
    assert_eq!(status, 504, "a publish to a frozen Redis must answer 504");
    // Churn while Redis is frozen (no acks: they could not be confirmed). The gateways must
    // keep serving local operations.
    let frozen_until = Instant::now() + Duration::from_secs(3);
    let mut ops = 0;
    while Instant::now() < frozen_until && ops < 5000 {
        churn.step(&mut sims, &gws, false).await;
        ops += 1;
    }
    for gw in &gws {
        let (status, _) = gw.http().get_json("/api/stats").await;
        assert_eq!(status, 200, "a gateway stalled while Redis was frozen");
    }
    redis.signal("-CONT");
    for _ in 0..200 {
        churn.step(&mut sims, &gws, false).await;
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    for gw in &gws {
        wait_ready(&gw.http(), 200).await;
    }
    wait_bookkeeping(
        &redis,
        "frozen",
        &expected_numsub("frozen", &per, &tags, true),
    )
    .await;
    // And delivery works on every joined topic.
    for s in &mut sims {
        let Some(c) = s.client.as_mut() else { continue };
        for t in s.joined.clone() {
            c.join(&t).await; // idempotent; the ack proves the channel is active
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_no_acknowledged_message_and_resumes_without_rejoining() {
    let mut redis = RedisServer::start();
    let gws = fleet(&redis, 2, "restart", &["--connect-timeout-ms", "500"]).await;
    let topics: Vec<String> = (0..5).map(|i| format!("r{i}")).collect();
    let mut clients = Vec::new();
    for (i, gw) in gws.iter().enumerate() {
        for t in &topics {
            let mut c = gw.client().await;
            c.join(t).await;
            clients.push((i, t.clone(), c));
        }
    }
    let mut late = gws[1].client().await;

    redis.kill();
    for gw in &gws {
        wait_ready(&gw.http(), 503).await;
    }
    // Publishes during the outage are refused, never 2xx.
    for (n, t) in topics.iter().enumerate() {
        let status = gws[n % 2].http().publish_status(t, "during outage").await;
        assert!(
            status == 503 || status == 504,
            "publish during outage answered {status}"
        );
    }
    let scrape = gws[0].http().metrics().await;
    assert_eq!(metric(&scrape, "wsgate_broker_up"), Some(0.0));
    // A topic first joined during the outage: not confirmed now, but not forgotten either.
    late.send_text(r#"{"type":"room.join","room":"late","id":"l"}"#)
        .await;
    let reply = late.next_json().await;
    assert_eq!(reply["data"]["code"], "broker_unavailable", "{reply}");

    redis.restart();
    // From here Redis accepts connections again.
    let restarted = Instant::now();
    // Publish through each gateway to every topic until Redis accepts it again, recording how
    // long each topic took to resume. A gateway refuses to publish until its own subscriber is
    // back and the other replica has announced itself again, so every 2xx-answered message
    // must reach every subscriber on both gateways.
    let mut accepted: Vec<(usize, String, String)> = Vec::new();
    let mut resumed: HashMap<(usize, String), Duration> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut n = 0;
    while resumed.len() < topics.len() * gws.len() {
        assert!(
            Instant::now() < deadline,
            "delivery did not resume everywhere: {resumed:?}"
        );
        for (g, gw) in gws.iter().enumerate() {
            for t in &topics {
                if resumed.contains_key(&(g, t.clone())) {
                    continue;
                }
                let msg = format!("after-{n}");
                n += 1;
                if gw.http().publish_status(t, &msg).await == 200 {
                    accepted.push((g, t.clone(), msg));
                    resumed.insert((g, t.clone()), restarted.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for gw in &gws {
        wait_ready(&gw.http(), 200).await;
    }
    // Once every replica is back, one publish reaches every subscriber, wherever it is.
    for t in &topics {
        gws[0].http().publish(t, &format!("final-{t}")).await;
    }
    // The late topic delivers too, without the client joining again.
    gws[0].http().publish("late", "late works").await;
    assert_eq!(late.next_text().await, "late works");
    for (g, t, c) in &mut clients {
        gws[*g].http().send(&c.socket_id, "marker").await;
        let got = c.texts_until("marker").await;
        // Every 2xx-answered message on this topic, through either gateway, arrived in order:
        // a replica back from the outage publishes only once the others have resubscribed.
        let want: Vec<&String> = accepted
            .iter()
            .filter(|(_, topic, _)| topic == t)
            .map(|(_, _, m)| m)
            .collect();
        let got_accepted: Vec<&String> = got.iter().filter(|m| want.contains(m)).collect();
        assert_eq!(
            got_accepted, want,
            "a 2xx-answered message was lost on {t} (subscriber on gateway {g}); got {got:?}"
        );
        assert!(
            got.contains(&format!("final-{t}")),
            "cross-replica delivery did not resume on {t}: {got:?}"
        );
        // Nothing arrives twice.
        let unique: BTreeSet<&String> = got.iter().collect();
        assert_eq!(unique.len(), got.len(), "duplicates: {got:?}");
    }
    let mut times: Vec<Duration> = resumed.values().copied().collect();
    times.sort();
    println!(
        "resume after restart: median {:?}, slowest {:?} (from Redis accepting connections to the first delivered publish, per gateway and topic)",
        times[times.len() / 2],
        times[times.len() - 1]
    );
    let scrape = gws[1].http().metrics().await;
    assert!(metric(&scrape, "wsgate_broker_reconnects_total").unwrap() >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_envelopes_interoperate_in_both_directions() {
    let redis = RedisServer::start();
    // A mixed fleet with seed instances keeps the seed's channel per connection.
    let gws = fleet(&redis, 1, "seed", &["--socket-channels", "per-socket"]).await;
    let mut c = gws[0].client().await;
    c.join("news").await;
    // A seed instance publishes text and binary.
    let receivers = redis.publish(
        "seed:news",
        br#"{"topic":"news","message":"from seed","isBinary":false}"#,
    );
    assert_eq!(receivers, 1);
    assert_eq!(c.next_text().await, "from seed");
    redis.publish(
        "seed:news",
        br#"{"topic":"news","message":"AAEC/w==","isBinary":true}"#,
    );
    assert_eq!(c.next().await, Received::Binary(vec![0, 1, 2, 255]));
    let direct = format!("seed:__socket__:{}", c.socket_id);
    redis.publish(
        &direct,
        format!(
            r#"{{"topic":"__socket__:{}","message":"direct","isBinary":false}}"#,
            c.socket_id
        )
        .as_bytes(),
    );
    assert_eq!(c.next_text().await, "direct");
    redis.publish(
        "seed:__broadcast__",
        br#"{"topic":"__broadcast__","message":"everyone","isBinary":false}"#,
    );
    assert_eq!(c.next_text().await, "everyone");

    // What wsgate publishes parses as the seed's envelope.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("seed:news").await.unwrap();
    let http = gws[0].http();
    http.publish("news", "to seed").await;
    let r = http
        .post("/api/publish?topic=news")
        .header("content-type", "application/octet-stream")
        .body(vec![9u8, 8, 7])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    use futures_util::StreamExt;
    let mut stream = pubsub.on_message();
    let mut next = async || {
        let m = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .unwrap()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(m.get_payload_bytes()).unwrap()
    };
    assert_eq!(
        next().await,
        json!({"topic": "news", "message": "to seed", "isBinary": false})
    );
    assert_eq!(
        next().await,
        json!({"topic": "news", "message": "CQgH", "isBinary": true})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_redis_payloads_are_counted_and_good_messages_keep_flowing() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "bad", &["--max-message-bytes", "1000"]).await;
    let mut c = gws[0].client().await;
    c.join("t").await;
    let bad = hostile_envelopes();
    for p in &bad {
        assert_eq!(redis.publish("bad:t", p), 1);
    }
    // Forged or broken replica announcements are rejected too.
    let forged = forged_announcements();
    for p in &forged {
        assert_eq!(redis.publish("bad:__replicas__", p), 1);
    }
    // A channel name that is not a valid topic.
    let mut conn = redis.connection();
    let _: i64 = redis::cmd("PUBLISH")
        .arg("bad:t")
        .arg(br#"{"topic":"t","message":"good","isBinary":false}"#.as_slice())
        .query(&mut conn)
        .unwrap();
    expect_rejected_then_good(&gws[0].http(), &mut c, bad.len() + forged.len()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_unsubscribes_everything_and_closes_both_connections_idempotently() {
    let redis = RedisServer::start();
    let url = redis.url();
    let gw = wsgate_tests::TestGateway::start(&["--redis-url", &url, "--key-prefix", "stop"]).await;
    let mut c = gw.client().await;
    c.join("a").await;
    c.join("b").await;
    gw.http().publish("a", "x").await; // opens the publisher connection
    assert_eq!(c.next_text().await, "x");
    let clients = |redis: &RedisServer| -> usize {
        let mut conn = redis.connection();
        let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
        list.lines().count() - 1 // minus the inspecting connection
    };
    assert_eq!(clients(&redis), 2, "a publisher and a subscriber");
    assert!(!redis.channels("stop:*").is_empty());
    let broker = gw.gateway.hub().broker().clone();
    // Starting again is a no-op.
    broker
        .start(std::sync::Arc::new(gw.gateway.hub().clone()))
        .await
        .unwrap();
    assert_eq!(clients(&redis), 2);
    drop(c);
    gw.http()
        .wait_stats("client gone", |s| s["connections"] == 0)
        .await;
    broker.stop().await;
    broker.stop().await;
    let deadline = std::time::Instant::now() + DEADLINE;
    while clients(&redis) != 0 || !redis.channels("stop:*").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "connections or channels left after stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!broker.is_up());
    let status = gw.http().publish_status("a", "after stop").await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_carries_messages_between_replicas() {
    let redis = RedisServer::start_tls();
    let ca = redis.ca_file().unwrap();
    assert!(redis.url().starts_with("rediss://"));
    let gws = fleet(&redis, 2, "tls", &["--redis-ca-file", &ca]).await;
    let mut a = gws[0].client().await;
    let mut b = gws[1].client().await;
    a.join("secure").await;
    b.join("secure").await;
    gws[1].http().publish("secure", "over TLS").await;
    assert_eq!(a.next_text().await, "over TLS");
    assert_eq!(b.next_text().await, "over TLS");
    // Without the CA, the server's certificate cannot be verified: nothing is sent.
    let untrusting = ProcessGateway::spawn(&[
        "--redis-url",
        &redis.url(),
        "--key-prefix",
        "tls",
        "--connect-timeout-ms",
        "300",
    ])
    .await;
    let status = untrusting
        .http()
        .publish_status("secure", "must not arrive")
        .await;
    assert_eq!(status, 503);
    gws[0].http().send(&a.socket_id, "marker").await;
    assert_eq!(a.next_text().await, "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_from_the_url_authenticates_and_a_wrong_password_is_refused() {
    // A user allowed only what the gateway needs, and no default user.
    let redis = RedisServer::start_args(&[
        "--user",
        "default",
        "off",
        "--user",
        "gateway",
        "on",
        ">s3cret-pass",
        "~*",
        "&*",
        "+publish",
        "+subscribe",
        "+unsubscribe",
        "+ping",
        "+hello",
        "+client",
        "+auth",
    ]);
    let port = redis.port();
    let url = format!("redis://gateway:s3cret-pass@127.0.0.1:{port}");
    let gw = ProcessGateway::spawn(&["--redis-url", &url, "--key-prefix", "acl"]).await;
    wait_ready(&gw.http(), 200).await;
    let mut c = gw.client().await;
    c.join("private").await;
    gw.http().publish("private", "authenticated").await;
    assert_eq!(c.next_text().await, "authenticated");

    let wrong = format!("redis://gateway:wrong@127.0.0.1:{port}");
    let denied = ProcessGateway::spawn(&[
        "--redis-url",
        &wrong,
        "--key-prefix",
        "acl",
        "--connect-timeout-ms",
        "300",
    ])
    .await;
    assert_eq!(
        denied
            .http()
            .publish_status("private", "must not arrive")
            .await,
        503
    );
    let (status, _) = denied.http().get_json("/readyz").await;
    assert_eq!(status, 503);
    gw.http().send(&c.socket_id, "marker").await;
    assert_eq!(c.next_text().await, "marker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_is_reachable_from_any_replica_as_soon_as_its_session_arrives() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 2, "session", &[]).await;
    let (a, b) = (gws[0].addr, gws[1].addr);
    // Many connections at once, each addressed from the other replica the moment its session
    // envelope arrives: the session is only sent once the direct channel is live.
    let mut tasks = Vec::new();
    for i in 0..150 {
        let (here, there) = if i % 2 == 0 { (a, b) } else { (b, a) };
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(here).await;
            Http::new(there)
                .send(&c.socket_id, &format!("hello {i}"))
                .await;
            assert_eq!(c.next_text().await, format!("hello {i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = gws[0].client().await;
    let (status, _) = gws[1]
        .http()
        .post_json("/api/disconnect", json!({"socketId": c.socket_id}))
        .await;
    assert_eq!(status, 200);
    assert!(matches!(c.next().await, Received::Close(Some(1000), _)));
}

/// Polls until Redis lists no subscriber on any of `channels`.
async fn wait_unsubscribed(redis: &RedisServer, channels: &[&str]) {
    let deadline = Instant::now() + DEADLINE;
    while channels.iter().any(|c| redis.numsub(c) != 0) {
        assert!(Instant::now() < deadline, "still subscribed: {channels:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_with_a_fin_or_a_reset_is_cleaned_up_at_once() {
    let redis = RedisServer::start();
    // A close timeout far past every deadline below: cleanup must not wait for it.
    let gws = fleet(
        &redis,
        1,
        "abrupt",
        &[
            "--close-timeout-ms",
            "600000",
            "--socket-channels",
            "per-socket",
        ],
    )
    .await;
    let http = gws[0].http();
    for reset in [false, true] {
        let how = if reset { "reset" } else { "fin" };
        let mut c = RawClient::connect(gws[0].addr).await;
        let topic = format!("abrupt:only-{how}");
        c.join(&format!("only-{how}")).await;
        let direct = format!("abrupt:__socket__:{}", c.socket_id);
        assert_eq!(redis.numsub(&direct), 1);
        assert_eq!(redis.numsub(&topic), 1);
        let gone = Instant::now();
        if reset {
            c.drop_with_reset();
        } else {
            c.drop_with_fin();
        }
        http.wait_stats("the connection to be gone", |s| s["connections"] == 0)
            .await;
        let uncounted = gone.elapsed();
        // Its direct channel and the topic it alone had joined are released in Redis too.
        wait_unsubscribed(&redis, &[&direct, &topic]).await;
        println!(
            "{how}: uncounted after {uncounted:?}, unsubscribed in Redis after {:?}",
            gone.elapsed()
        );
    }
    let scrape = http.metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"client\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"io_error\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_publish_during_a_frozen_redis_is_answered_within_its_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(1000);
    // Far above the gateway's own work on a loaded machine, far below the seconds a publish
    // used to wait behind the ones before it.
    const MARGIN: Duration = Duration::from_millis(1500);
    const FREEZE: Duration = Duration::from_secs(10);
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "freeze", &["--connect-timeout-ms", "1000"]).await;
    let addr = gws[0].addr;
    let mut c = gws[0].client().await;
    c.join("t").await;
    // Opens the publisher connection.
    gws[0].http().publish("t", "before").await;
    assert_eq!(c.next_text().await, "before");

    redis.signal("-STOP");
    let frozen = Instant::now();
    // One publish every 100 ms, each from its own caller, as independent backends would.
    let mut calls = Vec::new();
    let mut n = 0;
    while frozen.elapsed() < FREEZE {
        let msg = format!("frozen-{n}");
        n += 1;
        calls.push(tokio::spawn(async move {
            let http = Http::new(addr);
            let sent = frozen.elapsed();
            let status = http.publish_status("t", &msg).await;
            (msg, sent, frozen.elapsed() - sent, status)
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    redis.signal("-CONT");
    let resumed = frozen.elapsed();
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }

    let slowest = results.iter().map(|r| r.2).max().unwrap();
    let count = |s: u16| results.iter().filter(|r| r.3 == s).count();
    println!(
        "{} publishes over a {FREEZE:?} freeze (timeout {TIMEOUT:?}): slowest answer {slowest:?}; 200: {}, 503: {}, 504: {}",
        results.len(),
        count(200),
        count(503),
        count(504)
    );
    for (msg, sent, took, status) in &results {
        assert!(
            *took <= TIMEOUT + MARGIN,
            "{msg} sent {sent:?} into the freeze was answered {status} after {took:?}"
        );
        assert!([200, 503, 504].contains(status), "{msg} answered {status}");
        if *sent + *took < resumed {
            assert_ne!(
                *status, 200,
                "{msg} was answered 200 while Redis was frozen"
            );
        }
    }
    // Once one PUBLISH went unanswered, the connection is declared broken: the publishes after
    // that answer fail fast with 503 instead of queueing behind the frozen server.
    let first_timeout = results
        .iter()
        .filter(|r| r.3 == 504)
        .map(|r| r.1 + r.2)
        .min()
        .expect("no publish timed out");
    for (msg, sent, took, status) in &results {
        if *sent > first_timeout && *sent + *took < resumed {
            assert_eq!(*status, 503, "{msg} sent {sent:?} into the freeze");
        }
    }

    // After the freeze, publishing works again without any help...
    let deadline = Instant::now() + DEADLINE;
    let mut after = 0;
    loop {
        let msg = format!("after-{after}");
        if gws[0].http().publish_status("t", &msg).await == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "publishing never resumed");
        after += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the subscriber got every 2xx-answered message and nothing answered 503 (not sent).
    let mut got = Vec::new();
    loop {
        let m = c.next_text().await;
        if m == format!("after-{after}") {
            break;
        }
        got.push(m);
    }
    for (msg, _, _, status) in &results {
        match status {
            200 => assert!(
                got.contains(msg),
                "{msg} was answered 200 but never arrived"
            ),
            503 => assert!(!got.contains(msg), "{msg} was answered 503 yet delivered"),
            _ => {}
        }
    }
}

/// Polls until Redis and the gateways agree on the channels each gateway is subscribed to:
/// `PUBSUB NUMSUB` of every channel as `want` says, and the `sub=` counts of the subscriber
/// connections in `CLIENT LIST` equal to what each gateway reports it holds.
async fn wait_records_match_redis(
    redis: &RedisServer,
    prefix: &str,
    want: &HashMap<String, i64>,
    gws: &[&Http],
) {
    wait_bookkeeping(redis, prefix, want).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut reported = Vec::new();
        for http in gws {
            reported.push(http.stats().await["broker"]["channels"].as_i64().unwrap());
        }
        reported.sort_unstable();
        let in_redis = redis.subscriber_connections();
        if reported == in_redis {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the gateways report {reported:?} channels, Redis holds {in_redis:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_that_redis_confirms_after_its_topic_was_left_is_undone() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port()).await;
    let url = format!("redis://127.0.0.1:{}", proxy.port());
    // A timeout longer than the freeze: the SUBSCRIBE in flight is answered, not abandoned.
    let gw = ProcessGateway::spawn(&[
        "--redis-url",
        &url,
        "--key-prefix",
        "late",
        "--connect-timeout-ms",
        "20000",
    ])
    .await;
    wait_ready(&gw.http(), 200).await;
    let mut c = gw.client().await;
    c.join("warm").await;

    redis.signal("-STOP");
    c.send_text(r#"{"type":"room.join","room":"brief"}"#).await;
    // The SUBSCRIBE is on its way to the frozen server...
    proxy.wait_sent(b"late:brief").await;
    // ... when the only subscriber leaves (handled before the ping: frames are in order).
    c.send_text(r#"{"type":"room.leave","room":"brief"}"#).await;
    c.assert_alive().await;
    redis.signal("-CONT");

    // Redis confirms a SUBSCRIBE nobody wants any more: the gateway must record it, and undo it.
    let mut want = HashMap::new();
    want.insert("late:warm".to_owned(), 1);
    want.insert(format!("late:__direct__:{}", &c.socket_id[..8]), 1);
    want.insert("late:__broadcast__".to_owned(), 1);
    want.insert("late:__replicas__".to_owned(), 1);
    wait_records_match_redis(&redis, "late", &want, &[&gw.http()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_churn_across_random_freezes_leaves_the_records_equal_to_redis() {
    const TIMEOUT_MS: u64 = 800;
    let seed: u64 = std::env::var("WSGATE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("seed {seed} (replay with WSGATE_TEST_SEED)");
    let redis = RedisServer::start();
    let timeout = TIMEOUT_MS.to_string();
    let gws = fleet(
        &redis,
        2,
        "storm",
        &[
            "--connect-timeout-ms",
            &timeout,
            "--socket-channels",
            "per-socket",
        ],
    )
    .await;
    let tags = socket_tags(&gws).await;
    let (mut sims, mut churn) = simulation(12, 2, 20, seed);
    let mut freezes = StdRng::seed_from_u64(seed ^ 0x5eed);
    for _ in 0..60 {
        churn.step(&mut sims, &gws, false).await;
    }
    for _ in 0..6 {
        // Freezes around the command timeout: shorter ones leave commands in flight that Redis
        // answers late; longer ones make the gateways replace their connections.
        let freeze = Duration::from_millis(freezes.random_range(TIMEOUT_MS / 4..TIMEOUT_MS * 2));
        redis.signal("-STOP");
        let frozen = Instant::now();
        while frozen.elapsed() < freeze {
            churn.step(&mut sims, &gws, false).await;
        }
        redis.signal("-CONT");
        // Keep churning through the resubscribe burst that follows.
        for _ in 0..freezes.random_range(20..120) {
            churn.step(&mut sims, &gws, false).await;
        }
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    let https: Vec<Http> = gws.iter().map(ProcessGateway::http).collect();
    let refs: Vec<&Http> = https.iter().collect();
    wait_records_match_redis(
        &redis,
        "storm",
        &expected_numsub("storm", &per, &tags, true),
        &refs,
    )
    .await;
    // Everyone leaves: nothing may be left behind, in Redis or in the records.
    for s in &mut sims {
        s.client = None;
        s.joined.clear();
    }
    let per = expected_state(&sims, gws.len());
    wait_local_counts(&gws, &per).await;
    wait_records_match_redis(
        &redis,
        "storm",
        &expected_numsub("storm", &per, &tags, true),
        &refs,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_2xx_after_a_freeze_until_a_replica_that_lost_its_subscriber_has_resubscribed() {
    let redis = RedisServer::start();
    // B reaches Redis through a proxy that can hold Redis's replies back.
    let proxy = TcpProxy::start(redis.port()).await;
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port());
    let args = ["--key-prefix", "gap", "--connect-timeout-ms", "1000"];
    let a = ProcessGateway::spawn(&[&["--redis-url", &redis.url()][..], &args].concat()).await;
    let b = ProcessGateway::spawn(&[&["--redis-url", &via_proxy][..], &args].concat()).await;
    for gw in [&a, &b] {
        wait_ready(&gw.http(), 200).await;
        gw.http()
            .wait_stats("the other replica heard", |s| {
                s["broker"]["replicasSeen"] == 1
            })
            .await;
    }
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    ca.join("t").await;
    cb.join("t").await;

    redis.signal("-STOP");
    // B's subscriber has a command go unanswered, so B replaces its connection...
    cb.send_text(r#"{"type":"room.join","room":"other"}"#).await;
    wait_ready(&b.http(), 503).await;
    // ... while A only sees a PUBLISH go unanswered.
    assert_eq!(a.http().publish_status("t", "frozen").await, 504);
    // B cannot resubscribe after the freeze until its replies are let through.
    proxy.hold();
    redis.signal("-CONT");
    let resumed = Instant::now();
    let mut answered = Vec::new();
    let mut n = 0;
    // Well inside the 3 s after which a replica that does not answer is presumed gone.
    while resumed.elapsed() < Duration::from_millis(1500) {
        let msg = format!("held-{n}");
        n += 1;
        let status = a.http().publish_status("t", &msg).await;
        answered.push((msg, status));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.release();
    wait_ready(&b.http(), 200).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let msg = format!("after-{n}");
        n += 1;
        let status = a.http().publish_status("t", &msg).await;
        answered.push((msg.clone(), status));
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "A never published again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let last = answered.last().unwrap().0.clone();
    let accepted: Vec<&String> = answered
        .iter()
        .filter(|(_, s)| *s == 200)
        .map(|(m, _)| m)
        .collect();
    println!(
        "{} publishes while B was resubscribing: {:?}",
        answered.len(),
        answered.iter().map(|(_, s)| *s).collect::<Vec<_>>()
    );
    // Every 2xx reached the subscribers on both replicas.
    for (name, c) in [("A", &mut ca), ("B", &mut cb)] {
        let mut got = Vec::new();
        loop {
            let m = c.next_text().await;
            let done = m == last;
            got.push(m);
            if done {
                break;
            }
        }
        for m in &accepted {
            assert!(
                got.contains(m),
                "{m} was answered 200 but never reached the subscriber on {name}: {got:?}"
            );
        }
    }
}

/// A connection of a seed instance, as Redis sees it: a subscriber on the seed's channel for
/// one socket id (whose first 32 bits name no wsgate replica).
struct SeedSocket {
    id: &'static str,
    messages: std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg> + Send>>,
}

impl SeedSocket {
    const ID: &'static str = "0badf00d-2a53-4a7c-9a8e-1b2c3d4e5f60";

    async fn subscribe(redis: &RedisServer, prefix: &str) -> Self {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub
            .subscribe(format!("{prefix}:__socket__:{}", Self::ID))
            .await
            .unwrap();
        Self {
            id: Self::ID,
            messages: Box::pin(pubsub.into_on_message()),
        }
    }

    /// The next envelope it receives.
    async fn next(&mut self) -> serde_json::Value {
        use futures_util::StreamExt;
        let m = tokio::time::timeout(DEADLINE, self.messages.next())
            .await
            .expect("a message for the seed socket")
            .unwrap();
        serde_json::from_slice(m.get_payload_bytes()).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_sends_reach_every_replica_in_either_channel_mode_and_in_a_mixed_fleet() {
    let redis = RedisServer::start();
    for modes in [
        ["per-replica", "per-replica"],
        ["per-socket", "per-socket"],
        ["per-replica", "per-socket"],
    ] {
        let prefix = format!("direct-{}-{}", modes[0], modes[1]);
        let mut gws = Vec::new();
        for mode in modes {
            gws.extend(fleet(&redis, 1, &prefix, &["--socket-channels", mode]).await);
        }
        let tags = socket_tags(&gws).await;
        assert_ne!(tags[0], tags[1]);
        let mut clients = Vec::new();
        for (gw, tag) in gws.iter().zip(&tags) {
            for _ in 0..3 {
                let c = gw.client().await;
                assert!(c.socket_id.starts_with(tag.as_str()), "{}", c.socket_id);
                clients.push(c);
            }
        }
        // Only per-socket replicas keep a Redis channel per connection.
        for (i, c) in clients.iter().enumerate() {
            let per_socket = modes[i / 3] == "per-socket";
            let channel = format!("{prefix}:__socket__:{}", c.socket_id);
            assert_eq!(redis.numsub(&channel), i64::from(per_socket), "{channel}");
        }
        let mut seed = SeedSocket::subscribe(&redis, &prefix).await;

        // Every replica sends to every connection, one at a time, and to the seed's.
        for (i, gw) in gws.iter().enumerate() {
            for c in &clients {
                gw.http().send(&c.socket_id, &format!("from {i}")).await;
            }
            gw.http().send(seed.id, &format!("from {i}")).await;
        }
        for c in &mut clients {
            for i in 0..gws.len() {
                assert_eq!(c.next_text().await, format!("from {i}"), "{modes:?}");
            }
        }
        for i in 0..gws.len() {
            assert_eq!(seed.next().await["message"], format!("from {i}"));
        }

        // A batch of direct sends, in order per connection, each item answered.
        let mut items = Vec::new();
        for n in 0..2 {
            for c in &clients {
                items.push(json!({"socketId": c.socket_id, "message": format!("batch {n}")}));
            }
        }
        items.push(json!({"socketId": seed.id, "message": "batch to the seed"}));
        let (status, body) = gws[0]
            .http()
            .post_json("/api/batch", json!({"messages": items}))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["results"].as_array().unwrap().len(), items.len());
        for c in &mut clients {
            assert_eq!(c.next_text().await, "batch 0");
            assert_eq!(c.next_text().await, "batch 1");
        }
        assert_eq!(seed.next().await["message"], "batch to the seed");

        // Disconnects cross replicas the same way.
        for (i, c) in clients.iter_mut().enumerate() {
            let from = &gws[(i + 1) % gws.len()];
            let (status, _) = from
                .http()
                .post_json("/api/disconnect", json!({"socketId": c.socket_id}))
                .await;
            assert_eq!(status, 200);
            assert!(matches!(c.next().await, Received::Close(Some(1000), _)));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_topics_that_already_have_subscribers_costs_redis_nothing_per_replica() {
    let redis = RedisServer::start();
    for (mode, free) in [("per-replica", true), ("per-socket", false)] {
        let prefix = format!("connect-{mode}");
        let gws = fleet(&redis, 1, &prefix, &["--socket-channels", mode]).await;
        // The topic, the broadcast channel: subscribed by the first connection.
        let mut first = gws[0].client().await;
        first.join("busy").await;
        let before = ["subscribe", "unsubscribe"].map(|c| redis.command_calls(c));
        let mut clients = Vec::new();
        for _ in 0..50 {
            let mut c = gws[0].client().await;
            c.join("busy").await;
            clients.push(c);
        }
        gws[0].http().publish("busy", "to all").await;
        for c in clients.iter_mut().chain([&mut first]) {
            assert_eq!(c.next_text().await, "to all");
        }
        drop(clients);
        gws[0]
            .http()
            .wait_stats("the 50 to be gone", |s| s["connections"] == 1)
            .await;
        // A new topic's acknowledged join: its SUBSCRIBE comes after every (UN)SUBSCRIBE the
        // connections above caused, if any.
        first.join("marker").await;
        let after = ["subscribe", "unsubscribe"].map(|c| redis.command_calls(c));
        if free {
            assert_eq!(
                after,
                [before[0] + 1, before[1]],
                "SUBSCRIBE and UNSUBSCRIBE calls in {mode} mode"
            );
        } else {
            // The seed's way: a channel per connection, subscribed and unsubscribed.
            assert!(
                after[0] > before[0] && after[1] > before[1],
                "{before:?} {after:?}"
            );
        }
    }
}
