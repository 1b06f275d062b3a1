//! Message history on the Redis broker, with a real redis-server and real gateway processes:
//! a replica cut off alone fills its gap, Redis restarting empty changes the epoch, clients
//! recover on another replica, seed instances still interoperate, hostile history data is
//! refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;
use wsgate_tests::{
    Client, DEADLINE, ProcessGateway, RedisServer, TcpProxy, fleet, metric, wait_ready,
};

const HISTORY: [&str; 4] = ["--history-topics", "feed,hist:*", "--history-size", "1000"];

/// Every text message `m<i>` a client receives until `marker`, with the positions of the
/// positioned ones.
async fn drain_until_marker(c: &mut Client) -> Vec<(u64, Option<(u64, String)>)> {
    let mut out = Vec::new();
    loop {
        let text = c.next_text().await;
        if text == "marker" {
            return out;
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(json!(null));
        let (message, position) = if v["name"] == "room.message" {
            let d = &v["data"];
            (
                d["message"].as_str().unwrap().to_owned(),
                Some((
                    d["offset"].as_u64().unwrap(),
                    d["epoch"].as_str().unwrap().to_owned(),
                )),
            )
        } else {
            (text.clone(), None)
        };
        let n = message
            .strip_prefix('m')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected frame {text}"));
        out.push((n, position));
    }
}

/// One replica's Redis link is cut for the time of ~300 publishes at 100/s on another replica:
/// once back, every subscriber on the cut replica has every message, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_alone_receives_everything_published_meanwhile() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port()).await;
    let cut_url = format!("redis://127.0.0.1:{}", proxy.port());
    let mut args = vec![
        "--redis-url",
        cut_url.as_str(),
        "--key-prefix",
        "cut",
        "--connect-timeout-ms",
        "1000",
    ];
    args.extend_from_slice(&HISTORY);
    let cut = ProcessGateway::spawn(&args).await;
    let other = fleet(&redis, 1, "cut", &HISTORY).await;
    wait_ready(&cut.http(), 200).await;

    let mut plain = Vec::new();
    let mut positioned = Vec::new();
    for _ in 0..3 {
        let mut c = cut.client().await;
        c.join("feed").await;
        plain.push(c);
        let mut p = cut.client().await;
        p.join_since("feed", json!({})).await;
        positioned.push(p);
    }
    // A topic without history, for comparison: what the cut replica misses is lost.
    let mut no_history = cut.client().await;
    no_history.join("other").await;

    let http = other[0].http();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut next = 1u64;
    let mut send = async |n: &mut u64| {
        tick.tick().await;
        assert_eq!(http.publish_status("feed", &format!("m{n}")).await, 200);
        assert_eq!(http.publish_status("other", &format!("m{n}")).await, 200);
        *n += 1;
    };
    for _ in 0..20 {
        send(&mut next).await;
    }
    // Everything so far arrived live.
    assert_eq!(plain[0].next_text().await, "m1");

    proxy.cut();
    wait_ready(&cut.http(), 503).await;
    let cut_from = next;
    for _ in 0..300 {
        send(&mut next).await;
    }
    let cut_to = next - 1;
    proxy.restore();
    wait_ready(&cut.http(), 200).await;
    for _ in 0..50 {
        send(&mut next).await;
    }
    let last = next - 1;

    for c in plain.iter_mut().chain(positioned.iter_mut()) {
        cut.http().send(&c.socket_id, "marker").await;
    }
    for (i, c) in plain.iter_mut().enumerate() {
        let got: Vec<u64> = drain_until_marker(c)
            .await
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // The first client consumed m1 above.
        let first = if i == 0 { 2 } else { 1 };
        assert_eq!(got, (first..=last).collect::<Vec<_>>(), "plain client {i}");
    }
    for (i, c) in positioned.iter_mut().enumerate() {
        let got = drain_until_marker(c).await;
        let numbers: Vec<u64> = got.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            numbers,
            (1..=last).collect::<Vec<_>>(),
            "positioned client {i}"
        );
        // Positions follow the numbers: one epoch, offsets 1, 2, 3…
        let epoch = &got[0].1.as_ref().unwrap().1;
        for (n, p) in &got {
            assert_eq!(p.as_ref().unwrap(), &(*n, epoch.clone()));
        }
    }
    let scrape = cut.http().metrics().await;
    let filled = metric(&scrape, "wsgate_history_gap_filled_messages_total").unwrap();
    assert!(filled >= 1.0, "nothing was gap-filled");
    // At most what was published before the link came back (some just before the cut may
    // have been in flight).
    assert!(
        filled <= cut_to as f64,
        "{filled} of {}",
        cut_to - cut_from + 1
    );
    assert_eq!(
        metric(&scrape, "wsgate_history_gap_fill_failures_total"),
        Some(0.0)
    );
    // What the history takes in Redis is sampled every few seconds.
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let scrape = cut.http().metrics().await;
        if metric(&scrape, "wsgate_history_bytes").unwrap() > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "wsgate_history_bytes stayed 0"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The topic without history lost what was published while the replica was cut off
    // (documented), and delivers again.
    cut.http().send(&no_history.socket_id, "marker").await;
    let got: Vec<u64> = drain_until_marker(&mut no_history)
        .await
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(got.last(), Some(&last));
    assert!(got.len() < last as usize, "no loss without history?");
}

/// Redis killed and restarted empty: the history is gone, so its epoch changes; a client
/// asking to recover from the old one is told `recovered: false`; nothing is doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_empty_changes_the_epoch_and_recovery_says_so() {
    let mut redis = RedisServer::start();
    let gws = fleet(&redis, 1, "restart", &HISTORY).await;
    let http = gws[0].http();
    let mut c = gws[0].client().await;
    c.join_since("feed", json!({})).await;
    for i in 1..=3 {
        assert_eq!(http.publish_status("feed", &format!("m{i}")).await, 200);
    }
    let mut old = None;
    for i in 1..=3 {
        let p = c.next_positioned().await;
        assert_eq!(p.offset, i);
        old = Some(p);
    }
    let old = old.unwrap();

    redis.kill();
    wait_ready(&http, 503).await;
    redis.restart();
    wait_ready(&http, 200).await;
    // Publishing may wait a moment for the replica barrier; retry until accepted.
    let deadline = std::time::Instant::now() + DEADLINE;
    while http.publish_status("feed", "m4").await != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "publishing never resumed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let p = c.next_positioned().await;
    assert_eq!((p.offset, p.message.as_str()), (1, "m4"));
    assert_ne!(p.epoch, old.epoch, "the epoch did not change");
    http.send(&c.socket_id, "marker").await;
    assert_eq!(c.next_text().await, "marker");

    let mut back = gws[0].client().await;
    let ack = back.join_since("feed", old.since()).await;
    assert_eq!(ack["recovered"], false);
    assert_eq!(
        (ack["offset"].as_u64(), ack["epoch"].as_str()),
        (Some(1), Some(p.epoch.as_str()))
    );
    assert_eq!(http.publish_status("feed", "m5").await, 200);
    let live = back.next_positioned().await;
    assert_eq!((live.offset, live.message.as_str()), (2, "m5"));
    assert_eq!(c.next_positioned().await.offset, 2);
}

/// A client disconnects, 50 messages are published, and it reconnects to another replica with
/// `since`: it gets exactly those 50, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_recovers_on_another_replica() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 2, "move", &HISTORY).await;
    let mut c = gws[0].client().await;
    c.join_since("hist:a", json!({})).await;
    assert_eq!(gws[0].http().publish_status("hist:a", "m1").await, 200);
    let seen = c.next_positioned().await;
    drop(c);
    for i in 2..=51 {
        assert_eq!(
            gws[i % 2]
                .http()
                .publish_status("hist:a", &format!("m{i}"))
                .await,
            200
        );
    }
    let mut back = gws[1].client().await;
    let ack = back.join_since("hist:a", seen.since()).await;
    assert_eq!(ack["recovered"], true);
    assert_eq!(ack["offset"], 51);
    for i in 2..=51 {
        let p = back.next_positioned().await;
        assert_eq!((p.offset, p.message), (i, format!("m{i}")));
    }
    assert_eq!(gws[0].http().publish_status("hist:a", "m52").await, 200);
    assert_eq!(back.next_positioned().await.offset, 52);
    gws[1].http().send(&back.socket_id, "marker").await;
    assert_eq!(back.next_text().await, "marker");
}

/// What the seed's `RedisPubSubProvider` accepts (its documented parsing): a JSON object
/// whose `topic` and `message` are strings and `isBinary` a boolean, other fields ignored
/// once `__proto__`, `constructor` and `prototype` keys are stripped.
fn seed_accepts(payload: &[u8]) -> bool {
    let Ok(serde_json::Value::Object(mut o)) = serde_json::from_slice(payload) else {
        return false;
    };
    for k in ["__proto__", "constructor", "prototype"] {
        o.remove(k);
    }
    o.get("topic").is_some_and(|v| v.is_string())
        && o.get("message").is_some_and(|v| v.is_string())
        && o.get("isBinary").is_some_and(|v| v.is_boolean())
}

/// Seed instances on the same Redis and prefix keep delivering history topics' envelopes,
/// and what they publish (without a position) still reaches every wsgate subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_instances_deliver_positioned_envelopes_and_theirs_reach_everyone() {
    use futures_util::StreamExt;
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "seed", &HISTORY).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub.subscribe("seed:feed").await.unwrap();
    let http = gws[0].http();
    assert_eq!(http.publish_status("feed", "from wsgate").await, 200);
    let r = http
        .post("/api/publish?topic=feed")
        .header("content-type", "application/octet-stream")
        .body(vec![1u8, 2])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut stream = pubsub.on_message();
    for (offset, message, binary) in [(1, "from wsgate", false), (2, "AQI=", true)] {
        let m = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .unwrap()
            .unwrap();
        let payload = m.get_payload_bytes();
        assert!(
            seed_accepts(payload),
            "{}",
            String::from_utf8_lossy(payload)
        );
        let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(
            (&v["topic"], &v["message"], &v["isBinary"], &v["offset"]),
            (
                &json!("feed"),
                &json!(message),
                &json!(binary),
                &json!(offset)
            )
        );
    }
    drop(stream);

    // A seed instance publishes on the history topic: no position.
    let mut plain = gws[0].client().await;
    plain.join("feed").await;
    let mut positioned = gws[0].client().await;
    positioned.join_since("feed", json!({})).await;
    redis.publish(
        "seed:feed",
        br#"{"topic":"feed","message":"from seed","isBinary":false}"#,
    );
    assert_eq!(plain.next_text().await, "from seed");
    // Without a position it cannot be positioned: it arrives as the seed's plain frame.
    assert_eq!(positioned.next_text().await, "from seed");
    assert_eq!(http.publish_status("feed", "m3").await, 200);
    assert_eq!(positioned.next_positioned().await.offset, 3);
}

/// History data in Redis that wsgate did not write — a tampered position, a garbage stream
/// entry — is refused: publishing starts a new epoch, a recovery answers `recovered: false`,
/// and the process and its connections are unharmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_history_data_in_redis_is_refused() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "evil", &HISTORY).await;
    let http = gws[0].http();
    let mut c = gws[0].client().await;
    c.join_since("feed", json!({})).await;
    assert_eq!(http.publish_status("feed", "m1").await, 200);
    let first = c.next_positioned().await;
    let mut conn = redis.connection();
    let mut epochs = vec![first.epoch.clone()];
    for (field, value) in [
        ("epoch", r#"x","offset":1,"evil":"1"#),
        ("offset", "not a number"),
        ("epoch", ""),
    ] {
        let _: () = redis::cmd("HSET")
            .arg("evil:__history_meta__:feed")
            .arg(field)
            .arg(value)
            .query(&mut conn)
            .unwrap();
        assert_eq!(http.publish_status("feed", "next").await, 200);
        let p = c.next_positioned().await;
        assert_eq!((p.offset, p.message.as_str()), (1, "next"));
        assert!(!epochs.contains(&p.epoch), "{field}: epoch kept");
        epochs.push(p.epoch);
    }
    let epoch = epochs.last().unwrap().clone();
    // A garbage entry in the stream: the history is unreadable, not trusted.
    for entry in [
        vec!["m", "not json"],
        vec![
            "m",
            r#"{"topic":"other","message":"x","isBinary":false,"offset":2,"epoch":"e"}"#,
        ],
        vec!["x", "no message field"],
    ] {
        let mut cmd = redis::cmd("XADD");
        cmd.arg("evil:__history__:feed").arg("*");
        for f in &entry {
            cmd.arg(*f);
        }
        let _: String = cmd.query(&mut conn).unwrap();
        let mut r = gws[0].client().await;
        let ack = r
            .join_since("feed", json!({"offset": 0, "epoch": epoch}))
            .await;
        assert_eq!(ack["recovered"], false, "{entry:?}");
        r.assert_alive().await;
        let _: () = redis::cmd("DEL")
            .arg("evil:__history__:feed")
            .query(&mut conn)
            .unwrap();
    }
    let scrape = http.metrics().await;
    assert!(metric(&scrape, "wsgate_broker_payloads_rejected_total").unwrap() >= 3.0);
    assert!(
        metric(
            &scrape,
            r#"wsgate_history_recovery_failures_total{reason="unavailable"}"#
        )
        .unwrap()
            >= 3.0
    );
    c.assert_alive().await;
    assert_eq!(http.publish_status("feed", "after").await, 200);
    let p = c.next_positioned().await;
    assert_eq!(p.message, "after");
}

/// Recoveries on one replica while another publishes as fast as it can: every recovered
/// client receives every offset after its position once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recoveries_racing_publishes_on_another_replica_lose_and_double_nothing() {
    use rand::Rng;
    const TOTAL: u64 = 300;
    let redis = RedisServer::start();
    let gws = fleet(&redis, 2, "race", &HISTORY).await;
    let (joiner, publisher) = (&gws[0], gws[1].http());
    let mut first = joiner.client().await;
    first.join_since("feed", json!({})).await;
    assert_eq!(publisher.publish_status("feed", "m1").await, 200);
    let epoch = first.next_positioned().await.epoch;
    let task = tokio::spawn(async move {
        for i in 2..=TOTAL {
            assert_eq!(
                publisher.publish_status("feed", &format!("m{i}")).await,
                200
            );
        }
    });
    let mut rng = rand::rng();
    let mut recovered = Vec::new();
    for _ in 0..10 {
        let mut probe = joiner.client().await;
        let top = probe.join_since("feed", json!({})).await["offset"]
            .as_u64()
            .unwrap();
        drop(probe);
        let since = top.saturating_sub(rng.random_range(0..30u64)).max(1);
        let mut c = joiner.client().await;
        let ack = c
            .join_since("feed", json!({"offset": since, "epoch": epoch}))
            .await;
        assert_eq!(ack["recovered"], true, "{ack}");
        recovered.push((c, since));
        for _ in 0..rng.random_range(0..50) {
            tokio::task::yield_now().await;
        }
    }
    task.await.unwrap();
    for (mut c, since) in recovered {
        for i in since + 1..=TOTAL {
            let p = c.next_positioned().await;
            assert_eq!((p.offset, p.message), (i, format!("m{i}")));
        }
        joiner.http().send(&c.socket_id, "marker").await;
        assert_eq!(c.next_text().await, "marker");
    }
}

/// Redis frozen while a batch is in flight: no item is answered 2xx; each unanswered item is
/// a 504 (the outcome is unknown), and publishing works again once Redis does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_to_a_frozen_redis_answers_504_for_every_unanswered_item() {
    let redis = RedisServer::start();
    let gws = fleet(&redis, 1, "frozen", &HISTORY).await;
    let http = gws[0].http();
    let items: Vec<serde_json::Value> = (0..50)
        .map(|i| {
            if i % 2 == 0 {
                json!({"topic": "feed", "message": format!("m{i}")})
            } else {
                json!({"topic": "plain", "message": format!("m{i}")})
            }
        })
        .collect();
    // A first batch, so that the publisher connection is up: frozen mid-connect, Redis would
    // make it a 503 (nothing sent), not the case under test.
    let (status, _) = http
        .post_json(
            "/api/batch",
            json!({"messages": [{"topic": "plain", "message": "warm"}]}),
        )
        .await;
    assert_eq!(status, 200);
    redis.signal("-STOP");
    let (status, body) = http
        .post_json("/api/batch", json!({ "messages": items }))
        .await;
    redis.signal("-CONT");
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["accepted"], 0);
    for r in body["results"].as_array().unwrap() {
        assert_eq!(r["error"]["code"], "broker_timeout", "{r}");
    }
    wait_ready(&http, 200).await;
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        let (status, _) = http
            .post_json(
                "/api/batch",
                json!({"messages": [{"topic": "plain", "message": "again"}]}),
            )
            .await;
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "publishing never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
