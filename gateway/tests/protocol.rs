//! The client protocol and server API against a real gateway on port 0, over real sockets.
#![allow(clippy::unwrap_used)]

use wsgate_tests as common;

use common::{Received, TestGateway, metric};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test]
async fn join_then_publish_delivers_exactly_that_message() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn two_clients_on_one_topic_both_receive_and_another_topic_receives_nothing() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn leave_stops_delivery() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn join_acknowledgement_carries_the_id_verbatim() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn send_reaches_exactly_the_addressed_socket() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn broadcast_reaches_everyone() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn binary_publish_arrives_as_binary_and_text_as_text() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn name_and_data_publishes_arrive_as_the_seed_envelope() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn disconnecting_cleans_up_every_count_in_stats_and_metrics() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn every_bad_client_message_gets_its_error_and_the_connection_stays_healthy() {
    let gw = TestGateway::start(&[
        "--max-frame-bytes",
        "1024",
        "--max-topics-per-connection",
        "2",
    ])
    .await;
    let mut c = gw.client().await;
    let long = "a".repeat(257);
    let cases = [
        ("{nope".to_owned(), "invalid_json"),
        ("[]".to_owned(), "invalid_message"),
        (
            r#"{"type":"room.kick","room":"a"}"#.to_owned(),
            "unknown_type",
        ),
        (r#"{"type":"room.join"}"#.to_owned(), "missing_room"),
        (
            r#"{"type":"room.join","room":""}"#.to_owned(),
            "invalid_topic",
        ),
        (
            format!(r#"{{"type":"room.join","room":"{long}"}}"#),
            "invalid_topic",
        ),
        (
            r#"{"type":"room.join","room":"a/b"}"#.to_owned(),
            "invalid_topic",
        ),
        (
            r#"{"type":"room.join","room":"__broadcast__"}"#.to_owned(),
            "reserved_topic",
        ),
        (
            format!(
                r#"{{"type":"room.join","room":"__socket__:{}"}}"#,
                c.socket_id
            ),
            "reserved_topic",
        ),
        (
            r#"{"type":"room.join","room":"a","id":[1]}"#.to_owned(),
            "invalid_id",
        ),
        (
            format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, "x".repeat(5000)),
            "message_too_large",
        ),
    ];
    for (frame, code) in &cases {
        c.expect_error(frame, code).await;
        c.assert_alive().await;
    }
    c.ws.send(WsMessage::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(c.next_json().await["data"]["code"], "unsupported_binary");
    c.join("one").await;
    c.join("two").await;
    c.expect_error(
        r#"{"type":"room.join","room":"three","id":"t"}"#,
        "too_many_topics",
    )
    .await;
    // Still subscribed and delivering after all of that.
    gw.http().publish("one", "still here").await;
    assert_eq!(c.next_text().await, "still here");
    let scrape = gw.http().metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_client_errors_total{code=\"invalid_topic\"}"
        ),
        Some(3.0)
    );
}

#[tokio::test]
async fn protocol_level_ping_gets_a_pong() {
    let gw = TestGateway::start(&[]).await;
    let mut c = gw.client().await;
    c.ws.send(WsMessage::Ping(vec![9u8, 8].into()))
        .await
        .unwrap();
    // tungstenite surfaces the pong; read it directly.
    use futures_util::StreamExt;
    let got = tokio::time::timeout(common::DEADLINE, c.ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got, WsMessage::Pong(vec![9u8, 8].into()));
}

#[tokio::test]
async fn api_disconnect_closes_the_socket_with_a_normal_close() {
    let gw = TestGateway::start(&[]).await;
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

#[tokio::test]
async fn every_bad_api_request_gets_a_json_error_with_the_right_status() {
    let gw = TestGateway::start(&["--max-message-bytes", "100"]).await;
    let http = gw.http();
    let cases = [
        (
            "/api/send",
            json!({"socketId": "nope", "message": "x"}),
            400,
        ),
        (
            "/api/send",
            json!({"socketId": "3f2b6f8e-2a53-1a7c-9a8e-1b2c3d4e5f60", "message": "x"}),
            400,
        ),
        ("/api/disconnect", json!({"socketId": 5}), 400),
        ("/api/disconnect", json!({}), 400),
        ("/api/publish", json!({"message": "x"}), 400),
        ("/api/publish", json!({"topic": "a b", "message": "x"}), 400),
        (
            "/api/publish",
            json!({"topic": "__broadcast__", "message": "x"}),
            400,
        ),
        ("/api/publish", json!({"topic": "a"}), 400),
        ("/api/publish", json!({"topic": "a", "message": 5}), 400),
        (
            "/api/publish",
            json!({"topic": "a", "message": "x", "name": "n"}),
            400,
        ),
        ("/api/publish", json!({"topic": "a", "mesage": "typo"}), 400),
        ("/api/broadcast", json!({"topic": "a", "message": "x"}), 400),
        (
            "/api/publish",
            json!({"topic": "a", "message": "x".repeat(101)}),
            413,
        ),
    ];
    for (path, body, status) in cases {
        let (got, err) = http.post_json(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body} -> {err}");
        assert!(err["error"]["code"].as_str().is_some(), "{err}");
        assert!(err["error"]["message"].as_str().is_some(), "{err}");
    }
    // Malformed JSON, wrong content type, oversized raw body.
    let r = http
        .post("/api/publish")
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post("/api/publish")
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"]["code"],
        "unsupported_media_type"
    );
    let r = http.post("/api/publish").body("x").send().await.unwrap();
    assert_eq!(r.status(), 415);
    let r = http
        .post("/api/publish?topic=a")
        .header("content-type", "application/octet-stream")
        .body(vec![0u8; 101])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let r = http
        .post("/api/publish?topic=a")
        .header("content-type", "application/octet-stream")
        .body(vec![0u8; 10_000_000])
        .send()
        .await;
    // A huge body is refused early (413) or the connection is cut while sending; never 2xx.
    if let Ok(r) = r {
        assert_eq!(r.status(), 413);
    }
    let (status, _) = http.get_json("/api/topics/a%20b").await;
    assert_eq!(status, 400);
    let (status, body) = http.get_json("/api/nope").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    // The gateway is still healthy.
    assert_eq!(http.get("/healthz").send().await.unwrap().status(), 200);
    http.publish("a", "fine").await;
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let key = "k3y-0123456789abcdef";
    let gw = TestGateway::start(&["--api-key", key]).await;
    let http = gw.http();
    let body = json!({"topic": "a", "message": "x"});
    let r = http.post("/api/publish").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let r = http
        .post("/api/publish")
        .bearer_auth("wrong-key-0123456789")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http.get("/api/stats").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post("/api/publish")
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Probes and metrics need no key.
    assert_eq!(http.get("/metrics").send().await.unwrap().status(), 200);
    assert_eq!(http.get("/readyz").send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn metrics_expose_every_documented_name_and_move() {
    let gw = TestGateway::start(&[]).await;
    let http = gw.http();
    let scrape = http.metrics().await;
    for name in wsgate::metrics::DOCUMENTED {
        assert!(
            scrape.lines().any(|l| l.starts_with(name)),
            "{name} missing from /metrics"
        );
    }
    // The documented list and docs/metrics.md agree.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .unwrap();
    for name in wsgate::metrics::DOCUMENTED {
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} missing from docs/metrics.md"
        );
    }
    assert_eq!(metric(&scrape, "wsgate_broker_up"), Some(1.0));
    let mut c = gw.client().await;
    c.join("m").await;
    http.publish("m", "x").await;
    c.next_text().await;
    let scrape = http.metrics().await;
    assert_eq!(metric(&scrape, "wsgate_connections"), Some(1.0));
    assert_eq!(metric(&scrape, "wsgate_topics"), Some(1.0));
    assert_eq!(
        metric(&scrape, "wsgate_messages_published_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&scrape, "wsgate_messages_delivered_total"),
        Some(1.0)
    );
    // Broker channels: the topic, the socket's direct channel and the broadcast channel.
    assert_eq!(metric(&scrape, "wsgate_broker_channels"), Some(3.0));
    drop(c);
    http.wait_stats("disconnect", |s| s["connections"] == 0)
        .await;
    let scrape = http.metrics().await;
    assert_eq!(metric(&scrape, "wsgate_connections"), Some(0.0));
    assert_eq!(metric(&scrape, "wsgate_broker_channels"), Some(0.0));
}

#[tokio::test]
async fn connection_limit_refuses_upgrades_with_503() {
    let gw = TestGateway::start(&["--max-connections", "2"]).await;
    let _a = gw.client().await;
    let _b = gw.client().await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", gw.addr))
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 503),
        other => panic!("expected an HTTP 503, got {other:?}"),
    }
}

#[tokio::test]
async fn plain_http_on_the_websocket_path_is_a_clear_400() {
    let gw = TestGateway::start(&[]).await;
    let r = gw.http().get("/ws").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
}

#[tokio::test]
async fn idle_connections_are_closed_with_going_away() {
    let gw = TestGateway::start(&["--idle-timeout-secs", "1"]).await;
    let mut c = gw.client().await;
    assert_eq!(
        c.next().await,
        Received::Close(Some(1001), "idle timeout".into())
    );
    gw.http()
        .wait_stats("idle close", |s| s["connections"] == 0)
        .await;
    let scrape = gw.http().metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn flooding_clients_are_rate_limited_then_closed() {
    let gw = TestGateway::start(&["--max-inbound-rate", "5"]).await;
    let mut c = gw.client().await;
    for _ in 0..200 {
        if c.ws
            .send(WsMessage::text(r#"{"type":"heartbeat"}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut saw_rate_error = false;
    loop {
        match c.next().await {
            Received::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                saw_rate_error |= v["data"]["code"] == "rate_limited";
            }
            Received::Close(code, _) => {
                assert_eq!(code, Some(1008));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_rate_error);
}

#[tokio::test]
async fn embedded_handle_offers_the_seed_provider_operations() {
    let gw = TestGateway::start(&["--key-prefix", "embed", "--connect-timeout-ms", "1500"]).await;
    let h = &gw.gateway;
    assert_eq!(h.key_prefix().as_str(), "embed");
    assert_eq!(h.connect_timeout(), std::time::Duration::from_millis(1500));
    let mut c = gw.client().await;
    let id = wsgate::SocketId::parse(&c.socket_id).unwrap();
    assert!(h.is_connected(id));
    assert_eq!(h.connection_count(), 1);
    h.subscribe(id, "lib").unwrap();
    assert_eq!(h.topic_subscriber_count("lib"), 1);
    h.publish("lib", wsgate::Message::text("from the library"))
        .await
        .unwrap();
    assert_eq!(c.next_text().await, "from the library");
    h.send(id, wsgate::Message::binary(vec![7u8]))
        .await
        .unwrap();
    assert_eq!(c.next().await, Received::Binary(vec![7]));
    h.broadcast(wsgate::Message::text("everyone"))
        .await
        .unwrap();
    assert_eq!(c.next_text().await, "everyone");
    h.unsubscribe(id, "lib").unwrap();
    assert_eq!(h.topic_subscriber_count("lib"), 0);
    h.subscribe(id, "a").unwrap();
    h.subscribe(id, "b").unwrap();
    assert_eq!(h.unsubscribe_all(id).unwrap(), 2);
    assert!(
        h.publish("bad topic", wsgate::Message::text("x"))
            .await
            .is_err()
    );
    assert!(h.subscribe(wsgate::SocketId::generate(), "a").is_err());
}
