//! The client protocol and server API against a real gateway on port 0, over real sockets.
#![allow(clippy::unwrap_used)]

use wsgate_tests as common;

use common::{RawClient, Received, TestGateway, metric};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

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
    for path in [
        "/api/nope",
        "/api",
        "/api/",
        "/api/publish/more",
        "/api/topics/a/b",
    ] {
        let (status, body) = http.get_json(path).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    let r = http.get("/api/publish").send().await.unwrap();
    assert_eq!(r.status(), 405, "a known path with the wrong method");
    // The gateway is still healthy.
    assert_eq!(http.get("/healthz").send().await.unwrap().status(), 200);
    http.publish("a", "fine").await;
    // Every error answer was counted by its code.
    let scrape = http.metrics().await;
    let errors = |code: &str| {
        metric(
            &scrape,
            &format!("wsgate_http_errors_total{{code=\"{code}\"}}"),
        )
        .unwrap()
    };
    assert_eq!(errors("unsupported_media_type"), 2.0);
    assert_eq!(errors("not_found"), 5.0);
    assert!(errors("payload_too_large") >= 2.0);
    assert_eq!(errors("bad_request"), 9.0);
    assert_eq!(errors("invalid_field"), 5.0);
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
    // Paths that do not exist say so only to callers with the key.
    let r = http.get("/api/nope").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.get("/api/nope").bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 404);
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
    // Refusals are counted by code.
    let scrape = http.metrics().await;
    let errors = |code: &str| {
        metric(
            &scrape,
            &format!("wsgate_http_errors_total{{code=\"{code}\"}}"),
        )
    };
    assert_eq!(errors("unauthorized"), Some(3.0));
    assert_eq!(errors("forbidden"), Some(1.0));
    assert_eq!(errors("broker_unavailable"), Some(0.0));
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

/// Sends `frame` on a fresh raw connection and returns the code of the server's close frame,
/// after checking that the server then ends the stream.
async fn close_answer(gw: &TestGateway, frame: &[u8]) -> Option<u16> {
    let mut c = RawClient::connect(gw.addr).await;
    assert!(c.send_raw(frame).await);
    let (_, code) = c.until_close().await;
    c.wait_end().await;
    code
}

#[tokio::test]
async fn a_close_frame_with_a_forbidden_code_fails_the_connection_with_1002() {
    let gw = TestGateway::start(&[]).await;
    let invalid = [
        0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];
    for code in invalid {
        let got = close_answer(&gw, &RawClient::close_frame(code, b"")).await;
        assert_eq!(got, Some(1002), "client close code {code}");
    }
    // A payload of one byte cannot hold a code; a reason that is not UTF-8 is invalid data.
    assert_eq!(
        close_answer(&gw, &RawClient::frame(8, &[3])).await,
        Some(1002)
    );
    let bad_reason = RawClient::close_frame(1000, &[0xCE, 0xBA, 0xE1, 0xBD]);
    assert_eq!(close_answer(&gw, &bad_reason).await, Some(1007));
    gw.http()
        .wait_stats("every connection closed", |s| s["connections"] == 0)
        .await;
    let scrape = gw.http().metrics().await;
    assert_eq!(
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"protocol_error\"}"
        ),
        Some((invalid.len() + 2) as f64)
    );
}

#[tokio::test]
async fn a_close_frame_with_an_allowed_code_is_echoed() {
    let gw = TestGateway::start(&[]).await;
    let valid = (1000u16..=1003)
        .chain(1007..=1014)
        .chain([3000, 3999, 4000, 4999]);
    for code in valid {
        let got = close_answer(&gw, &RawClient::close_frame(code, b"bye")).await;
        assert_eq!(got, Some(code), "client close code {code}");
    }
    // No code at all is a normal closure.
    assert_eq!(
        close_answer(&gw, &RawClient::frame(8, &[])).await,
        Some(1000)
    );
}

#[tokio::test]
async fn a_flooding_client_that_keeps_sending_still_receives_its_errors_and_the_1008_close() {
    let gw = TestGateway::start(&["--max-inbound-rate", "5"]).await;
    let mut c = RawClient::connect(gw.addr).await;
    // Written in one go before reading anything: when the gateway decides to close, most of
    // it is still unread on its side.
    let flood: Vec<u8> = (0..20_000)
        .flat_map(|_| RawClient::frame(1, br#"{"type":"heartbeat"}"#))
        .collect();
    assert!(
        c.send_raw(&flood).await,
        "the gateway reset the connection instead of reading to the end"
    );
    let (before, code) = c.until_close().await;
    assert_eq!(code, Some(1008));
    assert!(
        before.iter().any(|(_, p)| {
            serde_json::from_slice::<serde_json::Value>(p)
                .is_ok_and(|v| v["data"]["code"] == "rate_limited")
        }),
        "no rate_limited error before the close"
    );
    // Answering the close handshake ends the stream.
    assert!(c.send_raw(&RawClient::close_frame(1000, b"")).await);
    c.wait_end().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_keeps_sending_still_receives_the_1008_close() {
    let gw = TestGateway::start(&[
        "--outbound-queue-messages",
        "16",
        "--idle-timeout-secs",
        "0",
    ])
    .await;
    let http = gw.http();
    let mut c = RawClient::connect(gw.addr).await;
    c.join("firehose").await;
    // The client reads nothing while the topic fills its socket buffers and then its queue.
    let deadline = std::time::Instant::now() + common::DEADLINE;
    loop {
        let r = http
            .post("/api/publish?topic=firehose")
            .header("content-type", "application/octet-stream")
            .body(vec![7u8; 64 * 1024])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let scrape = http.metrics().await;
        if metric(
            &scrape,
            "wsgate_messages_dropped_total{reason=\"slow_consumer\"}",
        )
        .is_some_and(|n| n > 0.0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never cut off as a slow consumer"
        );
    }
    // Cut off; it keeps sending (pings, as a client's keep-alive would), then reads.
    let pings: Vec<u8> = (0..2000).flat_map(|_| RawClient::frame(1, b"2")).collect();
    assert!(c.send_raw(&pings).await);
    let (before, code) = c.until_close().await;
    assert_eq!(code, Some(1008));
    assert!(
        before.iter().all(|(op, _)| *op == 2),
        "only data before the close"
    );
    assert!(c.send_raw(&RawClient::close_frame(1000, b"")).await);
    c.wait_end().await;
    http.wait_stats("the slow consumer gone", |s| s["connections"] == 0)
        .await;
}
