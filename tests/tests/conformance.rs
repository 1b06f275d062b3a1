//! The broker conformance suite: the same behavioural tests, run against the in-process
//! broker and against the Redis broker (with a real redis-server), through a real gateway on
//! port 0 and real WebSocket clients.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;

use serde_json::json;
use wsgate_tests::{Client, Received, RedisServer, TestGateway, metric};

/// Topics under `hist:` keep a history of [`HISTORY_SIZE`] messages; no other topic does,
/// so every other test sees exactly the behaviour without history.
const HISTORY: [&str; 4] = ["--history-topics", "hist:*", "--history-size", "50"];
const HISTORY_SIZE: u64 = 50;

/// A gateway on one broker (and the Redis server behind it, if any).
struct Setup {
    gw: TestGateway,
    _redis: Option<RedisServer>,
}

impl Setup {
    async fn memory() -> Self {
        Self {
            gw: TestGateway::start(&HISTORY).await,
            _redis: None,
        }
    }

    async fn redis() -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let mut args = vec!["--redis-url", &url, "--key-prefix", "conformance"];
        args.extend_from_slice(&HISTORY);
        let gw = TestGateway::start(&args).await;
        Self {
            gw,
            _redis: Some(redis),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&super::Setup::memory().await.gw).await;
                }
            )*
        }
        mod redis_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let setup = super::Setup::redis().await;
                    super::$name(&setup.gw).await;
                }
            )*
        }
        /// Every case in turn on one 3-master Redis Cluster (sharded pub/sub; a cluster takes
        /// seconds to form), each on its own gateway and key prefix.
        mod redis_cluster_broker {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case() {
                let cluster = wsgate_tests::RedisCluster::start(3, 1);
                let seeds = cluster.seeds();
                let base = ["--redis-cluster-nodes", seeds.as_str()];
                let mut n = 0;
                $(
                    n += 1;
                    let gw = super::on_shared_topology(&base, n, stringify!($name)).await;
                    super::$name(&gw).await;
                    gw.shutdown().await;
                )*
            }
        }
        /// Every case in turn on one Sentinel group (a master, a replica, three sentinels).
        mod redis_sentinel_broker {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_case() {
                let group = wsgate_tests::SentinelGroup::start();
                let sentinels = group.sentinel_list();
                let base = [
                    "--redis-sentinels",
                    sentinels.as_str(),
                    "--redis-sentinel-master",
                    wsgate_tests::SENTINEL_MASTER,
                ];
                let mut n = 0;
                $(
                    n += 1;
                    let gw = super::on_shared_topology(&base, n, stringify!($name)).await;
                    super::$name(&gw).await;
                    gw.shutdown().await;
                )*
            }
        }
    };
}

/// A gateway for case number `n` on a topology many cases share: its own key prefix, so that
/// no case sees another's channels or history.
async fn on_shared_topology(base: &[&str], n: usize, case: &str) -> TestGateway {
    println!("case {n}: {case}");
    let prefix = format!("case{n}");
    let mut args = base.to_vec();
    args.extend_from_slice(&["--key-prefix", &prefix]);
    args.extend_from_slice(&HISTORY);
    TestGateway::start(&args).await
}

conformance!(
    join_then_publish_delivers_exactly_that_message,
    two_clients_on_one_topic_both_receive_and_another_topic_receives_nothing,
    leave_stops_delivery,
    join_acknowledgement_carries_the_id_verbatim,
    send_reaches_exactly_the_addressed_socket,
    broadcast_reaches_everyone,
    binary_publish_arrives_as_binary_and_text_as_text,
    name_and_data_publishes_arrive_as_the_seed_envelope,
    disconnecting_cleans_up_every_count_in_stats_and_metrics,
    api_disconnect_closes_the_socket_with_a_normal_close,
    a_fresh_positioned_join_reports_the_position_and_receives_positioned_envelopes,
    recovery_gives_exactly_the_missed_messages_then_live_ones,
    recovery_older_than_the_history_says_so_and_live_delivery_works,
    recovery_from_another_epoch_says_so,
    plain_joins_on_history_topics_see_exactly_the_seed_frames,
    since_on_a_topic_without_history_is_answered_and_delivers_plain_frames,
    invalid_since_is_refused_and_the_connection_stays_open,
    concurrent_publishing_during_recoveries_loses_and_doubles_nothing,
    joining_again_with_since_switches_a_plain_subscriber_to_positions,
    a_batch_delivers_every_kind_of_item_and_answers_each,
    a_batch_keeps_the_order_of_its_items,
    a_batch_with_bad_items_publishes_the_good_ones_and_says_which_failed,
    malformed_batches_publish_nothing,
);

async fn join_then_publish_delivers_exactly_that_message(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("news").await;
    gw.http()
        .publish("news", "hello \u{1F600} \"quoted\"")
        .await;
    assert_eq!(c.next_text().await, "hello \u{1F600} \"quoted\"");
    // Nothing else arrived in between: the next frame is a marker sent afterwards.
    gw.http().send(&c.socket_id, "marker").await;
    assert_eq!(c.next_text().await, "marker");
}

async fn two_clients_on_one_topic_both_receive_and_another_topic_receives_nothing(
    gw: &TestGateway,
) {
    let http = gw.http();
    let (mut a, mut b, mut other) = (gw.client().await, gw.client().await, gw.client().await);
    a.join("room").await;
    b.join("room").await;
    other.join("elsewhere").await;
    http.publish("room", "one").await;
    assert_eq!(a.next_text().await, "one");
    assert_eq!(b.next_text().await, "one");
    http.send(&other.socket_id, "marker").await;
    assert_eq!(other.next_text().await, "marker");
}

async fn leave_stops_delivery(gw: &TestGateway) {
    let http = gw.http();
    let mut c = gw.client().await;
    c.join("t").await;
    http.publish("t", "before").await;
    assert_eq!(c.next_text().await, "before");
    c.leave("t").await;
    http.publish("t", "after").await;
    http.send(&c.socket_id, "marker").await;
    assert_eq!(c.next_text().await, "marker");
}

async fn join_acknowledgement_carries_the_id_verbatim(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.send_text(r#"{"type":"room.join","room":"a","id":"req-42"}"#)
        .await;
    let ack = c.next_json().await;
    assert_eq!(ack["name"], "room.joined");
    assert_eq!(ack["data"], json!({"room": "a", "id": "req-42"}));
    assert!(ack["timestamp"].as_u64().is_some());
    c.send_text(r#"{"type":"room.join","room":"b","id":7}"#)
        .await;
    assert_eq!(c.next_json().await["data"]["id"], 7);
    // Without an id there is no reply (the next frame is a pong).
    c.send_text(r#"{"type":"room.join","room":"c"}"#).await;
    c.assert_alive().await;
    c.send_text(r#"{"type":"heartbeat"}"#).await;
    c.assert_alive().await;
}

async fn send_reaches_exactly_the_addressed_socket(gw: &TestGateway) {
    let http = gw.http();
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    http.send(&a.socket_id, "for a").await;
    http.send(&b.socket_id, "for b").await;
    assert_eq!(a.next_text().await, "for a");
    assert_eq!(b.next_text().await, "for b");
    // Upper-case ids are accepted too.
    http.send(&a.socket_id.to_uppercase(), "again").await;
    assert_eq!(a.next_text().await, "again");
}

async fn broadcast_reaches_everyone(gw: &TestGateway) {
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(gw.client().await);
    }
    let (status, _) = gw
        .http()
        .post_json("/api/broadcast", json!({"message": "all"}))
        .await;
    assert_eq!(status, 200);
    for c in &mut clients {
        assert_eq!(c.next_text().await, "all");
    }
}

async fn binary_publish_arrives_as_binary_and_text_as_text(gw: &TestGateway) {
    let http = gw.http();
    let mut c = gw.client().await;
    c.join("bin").await;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0xFF, 0xFE]).collect();
    let resp = http
        .post("/api/publish?topic=bin")
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(c.next().await, Received::Binary(payload));
    http.publish("bin", "text").await;
    assert_eq!(c.next().await, Received::Text("text".into()));
    let resp = http
        .post(&format!("/api/send?socketId={}", c.socket_id))
        .header("content-type", "application/octet-stream")
        .body(vec![1u8, 2])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(c.next().await, Received::Binary(vec![1, 2]));
}

async fn name_and_data_publishes_arrive_as_the_seed_envelope(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("chat").await;
    let data = json!({"user": "ann", "text": "hi", "n": [1, 2.5, null], "nested": {"ok": true}});
    let (status, _) = gw
        .http()
        .post_json(
            "/api/publish",
            json!({"topic": "chat", "name": "chat.message", "data": data}),
        )
        .await;
    assert_eq!(status, 200);
    let got = c.next_json().await;
    assert_eq!(got["name"], "chat.message");
    assert_eq!(got["data"], data);
    assert!(got["timestamp"].as_u64().unwrap() > 1_600_000_000_000);
    assert_eq!(got.as_object().unwrap().len(), 3);
}

async fn disconnecting_cleans_up_every_count_in_stats_and_metrics(gw: &TestGateway) {
    let http = gw.http();
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("x").await;
    a.join("y").await;
    b.join("x").await;
    let s = http.stats().await;
    assert_eq!(
        (
            s["connections"].as_u64(),
            s["topics"].as_u64(),
            s["subscriptions"].as_u64()
        ),
        (Some(2), Some(2), Some(3))
    );
    let (_, t) = http.get_json("/api/topics/x").await;
    assert_eq!(t, json!({"topic": "x", "subscribers": 2}));
    let scrape = http.metrics().await;
    assert_eq!(metric(&scrape, "wsgate_connections"), Some(2.0));
    assert_eq!(metric(&scrape, "wsgate_subscriptions"), Some(3.0));

    a.ws.close(None).await.unwrap();
    drop(b);
    http.wait_stats("all connections gone", |s| s["connections"] == 0)
        .await;
    let s = http.stats().await;
    assert_eq!(
        (s["topics"].as_u64(), s["subscriptions"].as_u64()),
        (Some(0), Some(0))
    );
    let scrape = http.metrics().await;
    for series in [
        "wsgate_connections",
        "wsgate_topics",
        "wsgate_subscriptions",
    ] {
        assert_eq!(metric(&scrape, series), Some(0.0), "{series}");
    }
    assert_eq!(
        metric(&scrape, "wsgate_connections_opened_total"),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"client\"}"
        ),
        Some(2.0)
    );
    let (_, t) = http.get_json("/api/topics/x").await;
    assert_eq!(t["subscribers"], 0);
}

async fn api_disconnect_closes_the_socket_with_a_normal_close(gw: &TestGateway) {
    let mut c = gw.client().await;
    let (status, _) = gw
        .http()
        .post_json("/api/disconnect", json!({"socketId": c.socket_id}))
        .await;
    assert_eq!(status, 200);
    assert!(matches!(c.next().await, Received::Close(Some(1000), _)));
    gw.http()
        .wait_stats("connection gone", |s| s["connections"] == 0)
        .await;
    let scrape = gw.http().metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"disconnected\"}"
        ),
        Some(1.0)
    );
}

async fn publish_n(gw: &TestGateway, topic: &str, from: u64, to: u64) {
    for i in from..=to {
        gw.http().publish(topic, &format!("m{i}")).await;
    }
}

/// Receives positioned envelopes `from..=to` of one epoch, in order, each once.
async fn expect_positioned(c: &mut Client, topic: &str, epoch: &str, from: u64, to: u64) {
    for i in from..=to {
        let p = c.next_positioned().await;
        assert_eq!(
            (
                p.room.as_str(),
                p.offset,
                p.epoch.as_str(),
                p.message.as_str()
            ),
            (topic, i, epoch, format!("m{i}").as_str())
        );
    }
}

/// Proves nothing else arrived: the next frame is a marker sent now.
async fn expect_nothing_more(gw: &TestGateway, c: &mut Client) {
    gw.http().send(&c.socket_id, "marker").await;
    assert_eq!(c.next_text().await, "marker");
}

async fn a_fresh_positioned_join_reports_the_position_and_receives_positioned_envelopes(
    gw: &TestGateway,
) {
    let mut c = gw.client().await;
    let ack = c.join_since("hist:fresh", json!({})).await;
    assert_eq!(
        ack,
        json!({"room": "hist:fresh", "id": "hist:fresh", "recovered": false, "offset": 0, "epoch": null})
    );
    publish_n(gw, "hist:fresh", 1, 2).await;
    let first = c.next_positioned().await;
    assert_eq!((first.offset, first.message.as_str()), (1, "m1"));
    assert!(!first.is_binary);
    expect_positioned(&mut c, "hist:fresh", &first.epoch, 2, 2).await;
    // Binary travels base64-encoded inside the envelope.
    let r = gw
        .http()
        .post("/api/publish?topic=hist:fresh")
        .header("content-type", "application/octet-stream")
        .body(vec![0u8, 1, 255])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b = c.next_positioned().await;
    assert_eq!(
        (b.offset, b.message.as_str(), b.is_binary),
        (3, "AAH/", true)
    );
    // A second client now starts from where the history stands.
    let mut d = gw.client().await;
    let ack = d.join_since("hist:fresh", json!({})).await;
    assert_eq!(
        (ack["offset"].as_u64(), ack["epoch"].as_str()),
        (Some(3), Some(first.epoch.as_str()))
    );
    expect_nothing_more(gw, &mut d).await;
}

async fn recovery_gives_exactly_the_missed_messages_then_live_ones(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join_since("hist:r", json!({})).await;
    publish_n(gw, "hist:r", 1, 3).await;
    let last = {
        let p = c.next_positioned().await;
        expect_positioned(&mut c, "hist:r", &p.epoch, 2, 3).await;
        p
    };
    let epoch = last.epoch.clone();
    drop(c);
    publish_n(gw, "hist:r", 4, 43).await;
    let mut back = gw.client().await;
    let ack = back
        .join_since("hist:r", json!({"offset": 3, "epoch": epoch}))
        .await;
    assert_eq!(
        ack,
        json!({"room": "hist:r", "id": "hist:r", "recovered": true, "offset": 43, "epoch": epoch})
    );
    expect_positioned(&mut back, "hist:r", &epoch, 4, 43).await;
    publish_n(gw, "hist:r", 44, 45).await;
    expect_positioned(&mut back, "hist:r", &epoch, 44, 45).await;
    expect_nothing_more(gw, &mut back).await;
    // Caught up: recovered, with nothing to send.
    let mut again = gw.client().await;
    let ack = again
        .join_since("hist:r", json!({"offset": 45, "epoch": epoch}))
        .await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(true), Some(45))
    );
    expect_nothing_more(gw, &mut again).await;
    let scrape = gw.http().metrics().await;
    assert!(metric(&scrape, "wsgate_history_recoveries_total").unwrap() >= 2.0);
    assert!(metric(&scrape, "wsgate_history_recovered_messages_total").unwrap() >= 40.0);
}

async fn recovery_older_than_the_history_says_so_and_live_delivery_works(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join_since("hist:old", json!({})).await;
    publish_n(gw, "hist:old", 1, 1).await;
    let epoch = c.next_positioned().await.epoch;
    drop(c);
    // More than the history keeps.
    publish_n(gw, "hist:old", 2, HISTORY_SIZE + 5).await;
    let mut back = gw.client().await;
    let ack = back
        .join_since("hist:old", json!({"offset": 1, "epoch": epoch}))
        .await;
    assert_eq!(ack["recovered"], false);
    assert_eq!(ack["offset"].as_u64(), Some(HISTORY_SIZE + 5));
    // Nothing from the history: the client must resynchronise some other way.
    publish_n(gw, "hist:old", HISTORY_SIZE + 6, HISTORY_SIZE + 6).await;
    expect_positioned(
        &mut back,
        "hist:old",
        &epoch,
        HISTORY_SIZE + 6,
        HISTORY_SIZE + 6,
    )
    .await;
    let scrape = gw.http().metrics().await;
    assert!(
        metric(
            &scrape,
            r#"wsgate_history_recovery_failures_total{reason="too_old"}"#
        )
        .unwrap()
            >= 1.0
    );
}

async fn recovery_from_another_epoch_says_so(gw: &TestGateway) {
    publish_n(gw, "hist:ep", 1, 2).await;
    let mut c = gw.client().await;
    let ack = c
        .join_since("hist:ep", json!({"offset": 1, "epoch": "not-this-one"}))
        .await;
    assert_eq!(ack["recovered"], false);
    assert_eq!(ack["offset"], 2);
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    assert_ne!(epoch, "not-this-one");
    // A position the history never reached is not this history either.
    let ack = c
        .join_since("hist:ep", json!({"offset": 99, "epoch": epoch}))
        .await;
    assert_eq!(ack["recovered"], false);
    publish_n(gw, "hist:ep", 3, 3).await;
    expect_positioned(&mut c, "hist:ep", &epoch, 3, 3).await;
    expect_nothing_more(gw, &mut c).await;
    let scrape = gw.http().metrics().await;
    assert!(
        metric(
            &scrape,
            r#"wsgate_history_recovery_failures_total{reason="epoch_changed"}"#
        )
        .unwrap()
            >= 2.0
    );
}

async fn plain_joins_on_history_topics_see_exactly_the_seed_frames(gw: &TestGateway) {
    let mut plain = gw.client().await;
    let mut positioned = gw.client().await;
    plain.join("hist:mixed").await;
    positioned.join_since("hist:mixed", json!({})).await;
    gw.http().publish("hist:mixed", "hello").await;
    let (status, _) = gw
        .http()
        .post_json(
            "/api/publish",
            json!({"topic": "hist:mixed", "name": "evt", "data": {"a": 1}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(plain.next_text().await, "hello");
    let env = plain.next_json().await;
    assert_eq!(
        (env["name"].as_str(), &env["data"]),
        (Some("evt"), &json!({"a": 1}))
    );
    assert_eq!(positioned.next_positioned().await.message, "hello");
    let p = positioned.next_positioned().await;
    let inner: serde_json::Value = serde_json::from_str(&p.message).unwrap();
    assert_eq!(inner["data"], json!({"a": 1}));
    expect_nothing_more(gw, &mut plain).await;
}

async fn since_on_a_topic_without_history_is_answered_and_delivers_plain_frames(gw: &TestGateway) {
    let mut c = gw.client().await;
    let ack = c
        .join_since("nohist", json!({"offset": 3, "epoch": "e"}))
        .await;
    assert_eq!(
        ack,
        json!({"room": "nohist", "id": "nohist", "recovered": false, "offset": 0, "epoch": null})
    );
    gw.http().publish("nohist", "plain").await;
    assert_eq!(c.next_text().await, "plain");
    let scrape = gw.http().metrics().await;
    assert!(
        metric(
            &scrape,
            r#"wsgate_history_recovery_failures_total{reason="no_history"}"#
        )
        .unwrap()
            >= 1.0
    );
}

async fn invalid_since_is_refused_and_the_connection_stays_open(gw: &TestGateway) {
    let mut c = gw.client().await;
    for since in [
        r#"5"#,
        r#"{"offset":1}"#,
        r#"{"offset":-1,"epoch":"e"}"#,
        r#"{"offset":1,"epoch":"bad epoch"}"#,
        r#"{"offset":1,"epoch":"e","__proto__":{}}"#,
    ] {
        c.expect_error(
            &format!(r#"{{"type":"room.join","room":"hist:x","id":1,"since":{since}}}"#),
            "invalid_since",
        )
        .await;
    }
    c.assert_alive().await;
    // Nothing was joined.
    gw.http().publish("hist:x", "unseen").await;
    expect_nothing_more(gw, &mut c).await;
}

/// Clients join with `since` at random points while messages are published as fast as the
/// API takes them: each receives every offset after its position exactly once, in order.
async fn concurrent_publishing_during_recoveries_loses_and_doubles_nothing(gw: &TestGateway) {
    use rand::Rng;
    const TOTAL: u64 = 400;
    let topic = "hist:seam";
    let mut first = gw.client().await;
    first.join_since(topic, json!({})).await;
    publish_n(gw, topic, 1, 1).await;
    let epoch = first.next_positioned().await.epoch;
    let publisher = {
        let http = gw.http();
        tokio::spawn(async move {
            for i in 2..=TOTAL {
                http.publish(topic, &format!("m{i}")).await;
                if i % 16 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut rng = rand::rng();
    let mut joined = Vec::new();
    for _ in 0..12 {
        // Where the history stands now, then a position somewhere in the recent past (the
        // history keeps the last 50).
        let mut probe = gw.client().await;
        let top = probe.join_since(topic, json!({})).await["offset"]
            .as_u64()
            .unwrap();
        drop(probe);
        let since = top.saturating_sub(rng.random_range(0..20u64)).max(1);
        let mut r = gw.client().await;
        let ack = r
            .join_since(topic, json!({"offset": since, "epoch": epoch}))
            .await;
        if ack["recovered"] == true {
            joined.push((r, since));
        }
        // Vary the timing of the next join against the publisher.
        for _ in 0..rng.random_range(0..50) {
            tokio::task::yield_now().await;
        }
    }
    publisher.await.unwrap();
    assert!(!joined.is_empty(), "no join recovered");
    for (mut c, since) in joined {
        expect_positioned(&mut c, topic, &epoch, since + 1, TOTAL).await;
        expect_nothing_more(gw, &mut c).await;
    }
}

async fn joining_again_with_since_switches_a_plain_subscriber_to_positions(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("hist:switch").await;
    publish_n(gw, "hist:switch", 1, 3).await;
    for i in 1..=3 {
        assert_eq!(c.next_text().await, format!("m{i}"));
    }
    // It knew m1's position from elsewhere (another tab, a previous session).
    let mut probe = gw.client().await;
    let epoch = probe.join_since("hist:switch", json!({})).await["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let ack = c
        .join_since("hist:switch", json!({"offset": 1, "epoch": epoch}))
        .await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(true), Some(3))
    );
    expect_positioned(&mut c, "hist:switch", &epoch, 2, 3).await;
    publish_n(gw, "hist:switch", 4, 4).await;
    expect_positioned(&mut c, "hist:switch", &epoch, 4, 4).await;
    // Still one subscription, and leaving ends it.
    let (_, topic) = gw.http().get_json("/api/topics/hist:switch").await;
    assert_eq!(topic["subscribers"], 2);
    c.leave("hist:switch").await;
    publish_n(gw, "hist:switch", 5, 5).await;
    expect_nothing_more(gw, &mut c).await;
}

async fn post_batch(gw: &TestGateway, messages: serde_json::Value) -> (u16, serde_json::Value) {
    gw.http()
        .post_json("/api/batch", json!({ "messages": messages }))
        .await
}

async fn a_batch_delivers_every_kind_of_item_and_answers_each(gw: &TestGateway) {
    let mut a = gw.client().await;
    let mut b = gw.client().await;
    a.join("batch:a").await;
    b.join("batch:b").await;
    let (status, body) = post_batch(
        gw,
        json!([
            {"topic": "batch:a", "message": "text"},
            {"topic": "batch:b", "name": "evt", "data": {"n": 1}},
            {"topic": "batch:a", "binary": "AAH/"},
            {"socketId": b.socket_id, "message": "direct"},
            {"broadcast": true, "message": "everyone"},
            {"topic": "hist:batch", "message": "kept"},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"ok": true, "accepted": 6, "failed": 0, "results": vec![json!({"ok": true}); 6]})
    );
    // Order is kept per topic; channels on different Redis Cluster shards may interleave.
    let mut got_a = Vec::new();
    for _ in 0..3 {
        got_a.push(a.next().await);
    }
    let text = Received::Text("text".into());
    let binary = Received::Binary(vec![0, 1, 255]);
    let at = |r: &Received| got_a.iter().position(|g| g == r);
    assert!(
        at(&text) < at(&binary) && at(&binary).is_some(),
        "{got_a:?}"
    );
    assert!(
        got_a.contains(&Received::Text("everyone".into())),
        "{got_a:?}"
    );
    let mut got_b = BTreeSet::new();
    for _ in 0..3 {
        let Received::Text(t) = b.next().await else {
            panic!("a binary frame for b")
        };
        got_b.insert(t);
    }
    let evt = json!({"name": "evt", "data": {"n": 1}});
    let envelope = got_b
        .iter()
        .find(|t| t.starts_with('{'))
        .map(|t| serde_json::from_str::<serde_json::Value>(t).unwrap());
    assert_eq!(
        envelope.as_ref().map(|e| (&e["name"], &e["data"])),
        Some((&evt["name"], &evt["data"])),
        "{got_b:?}"
    );
    assert!(
        got_b.contains("direct") && got_b.contains("everyone"),
        "{got_b:?}"
    );
    // The history topic's item got a position like any publish.
    let mut late = gw.client().await;
    let ack = late.join_since("hist:batch", json!({})).await;
    assert_eq!(ack["offset"], 1);
    let scrape = gw.http().metrics().await;
    assert!(metric(&scrape, "wsgate_messages_published_total").unwrap() >= 6.0);
}

async fn a_batch_keeps_the_order_of_its_items(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("batch:order").await;
    let items: Vec<serde_json::Value> = (0..300)
        .map(|i| json!({"topic": "batch:order", "message": format!("m{i}")}))
        .collect();
    let (status, body) = post_batch(gw, json!(items)).await;
    assert_eq!(status, 200, "{body}");
    for i in 0..300 {
        assert_eq!(c.next_text().await, format!("m{i}"));
    }
}

async fn a_batch_with_bad_items_publishes_the_good_ones_and_says_which_failed(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("batch:mixed").await;
    let (status, body) = post_batch(
        gw,
        json!([
            {"topic": "batch:mixed", "message": "first"},
            {"topic": "bad topic", "message": "x"},
            {"topic": "batch:mixed", "socketId": c.socket_id, "message": "two targets"},
            {"message": "no target"},
            {"topic": "batch:mixed"},
            {"topic": "batch:mixed", "message": "x", "name": "both"},
            {"topic": "batch:mixed", "binary": "***"},
            {"topic": "batch:mixed", "message": "x", "unknown": 1},
            {"socketId": "not-a-uuid", "message": "x"},
            {"topic": "__broadcast__", "message": "reserved"},
            "not an object",
            {"topic": "batch:mixed", "message": "last"},
        ]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        (body["accepted"].as_u64(), body["failed"].as_u64()),
        (Some(2), Some(10))
    );
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 12);
    assert_eq!(results[0], json!({"ok": true}));
    assert_eq!(results[11], json!({"ok": true}));
    for r in &results[1..11] {
        assert_eq!(r["ok"], false, "{r}");
        let code = r["error"]["code"].as_str().unwrap();
        assert!(code == "bad_request" || code == "invalid_field", "{r}");
        assert!(!r["error"]["message"].as_str().unwrap().is_empty());
    }
    assert_eq!(c.next_text().await, "first");
    assert_eq!(c.next_text().await, "last");
    expect_nothing_more(gw, &mut c).await;
}

async fn malformed_batches_publish_nothing(gw: &TestGateway) {
    let mut c = gw.client().await;
    c.join("batch:none").await;
    let item = json!({"topic": "batch:none", "message": "x"});
    let too_many: Vec<serde_json::Value> = (0..1001).map(|_| item.clone()).collect();
    for (body, want) in [
        (json!({"messages": []}), 400),
        (json!({"messages": too_many}), 400),
        (json!({"messages": item}), 400),
        (json!([item]), 400),
        (json!({"messages": [item], "extra": 1}), 400),
    ] {
        let (status, answer) = gw.http().post_json("/api/batch", body).await;
        assert_eq!(status, want, "{answer}");
        assert!(answer["error"]["code"].is_string(), "{answer}");
    }
    let http = gw.http();
    let raw = |ct: &'static str, body: Vec<u8>| {
        http.post("/api/batch")
            .header("content-type", ct)
            .body(body)
            .send()
    };
    assert_eq!(
        raw("application/json", b"{not json".to_vec())
            .await
            .unwrap()
            .status(),
        400
    );
    assert_eq!(
        raw("application/octet-stream", b"{}".to_vec())
            .await
            .unwrap()
            .status(),
        400
    );
    // Over --max-batch-bytes (4 MiB by default).
    let huge = format!(
        r#"{{"messages":[{{"topic":"batch:none","message":"{}"}}]}}"#,
        "x".repeat(5 << 20)
    );
    // Refused early (413), or the connection is cut while the body is still being sent.
    if let Ok(r) = raw("application/json", huge.into_bytes()).await {
        assert_eq!(r.status(), 413);
    }
    expect_nothing_more(gw, &mut c).await;
}
