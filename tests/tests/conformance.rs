//! The broker conformance suite: the same behavioural tests, run against the in-process
//! broker and against the Redis broker (with a real redis-server), through a real gateway on
//! port 0 and real WebSocket clients.
#![allow(clippy::unwrap_used)]

use serde_json::json;
use wsgate_tests::{Received, RedisServer, TestGateway, metric};

/// A gateway on one broker (and the Redis server behind it, if any).
struct Setup {
    gw: TestGateway,
    _redis: Option<RedisServer>,
}

impl Setup {
    async fn memory() -> Self {
        Self {
            gw: TestGateway::start(&[]).await,
            _redis: None,
        }
    }

    async fn redis() -> Self {
        let redis = RedisServer::start();
        let url = redis.url();
        let gw = TestGateway::start(&["--redis-url", &url, "--key-prefix", "conformance"]).await;
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
    };
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
