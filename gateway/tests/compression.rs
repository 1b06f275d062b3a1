//! permessage-deflate (RFC 7692) against a real gateway on port 0, over real sockets: the
//! negotiation, compressed fan-out next to plain clients, compressed messages from clients,
//! and the failures RFC 7692 and the size limit call for.
#![allow(clippy::unwrap_used)]

use wsgate::{Connection, Message, MessageHandler};
use wsgate_tests::{RawClient, Received, TestGateway, deflate};

/// The answer to every accepted offer: no context takeover either way.
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// Chrome's and Firefox's offer.
const BROWSER_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// About 1 KiB of JSON, as a backend would publish it.
fn json_message(n: usize) -> String {
    let items: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"id":{i},"symbol":"ACME{i}","price":{}.25,"open":true}}"#,
                100 + i
            )
        })
        .collect();
    format!(r#"{{"name":"prices","data":[{}]}}"#, items.join(","))
}

#[tokio::test]
async fn offers_are_answered_without_context_takeover_and_bad_ones_declined() {
    let gw = TestGateway::start(&[]).await;
    let answers = [
        ("permessage-deflate", Some(ACCEPTED.to_owned())),
        (BROWSER_OFFER, Some(ACCEPTED.to_owned())),
        (
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=9",
            Some(ACCEPTED.to_owned()),
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            Some(format!("{ACCEPTED}; server_max_window_bits=10")),
        ),
        // Declined, not failed: the connection goes on without compression.
        ("permessage-deflate; server_max_window_bits=20", None),
        ("permessage-deflate; mystery_param", None),
        ("x-webkit-deflate-frame", None),
        // The first offer that can be honoured wins.
        (
            "permessage-deflate; bogus, permessage-deflate; client_max_window_bits",
            Some(ACCEPTED.to_owned()),
        ),
    ];
    for (offer, answer) in answers {
        let mut c = RawClient::connect_offering(gw.addr, offer).await;
        assert_eq!(c.extensions(), answer, "offer {offer:?}");
        c.join("t").await;
    }
}

#[tokio::test]
async fn with_compression_off_nothing_is_negotiated() {
    let gw = TestGateway::start(&["--compression", "off"]).await;
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    assert_eq!(c.extensions(), None);
    c.join("t").await;
    let message = json_message(20);
    gw.http().publish("t", &message).await;
    assert_eq!(
        c.next_message().await,
        Some((1, false, message.into_bytes()))
    );
}

#[tokio::test]
async fn one_publish_reaches_deflate_clients_compressed_and_the_others_plain() {
    let gw = TestGateway::start(&[]).await;
    let mut deflating = Vec::new();
    for _ in 0..3 {
        let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
        assert_eq!(c.extensions().as_deref(), Some(ACCEPTED));
        c.join("prices").await;
        deflating.push(c);
    }
    // A real client library without the extension (tungstenite refuses RSV1 frames).
    let mut plain = gw.client().await;
    plain.join("prices").await;
    // A client that limited the server's window gets plain frames too.
    let mut small_window =
        RawClient::connect_offering(gw.addr, "permessage-deflate; server_max_window_bits=9").await;
    small_window.join("prices").await;

    let message = json_message(20);
    assert!(message.len() > 1000);
    gw.http().publish("prices", &message).await;
    let mut frames = Vec::new();
    for c in &mut deflating {
        let (b0, payload) = c.next_frame_bits().await.unwrap();
        assert_eq!(b0, 0x80 | 0x40 | 1, "a final text frame with RSV1");
        assert!(payload.len() < message.len() / 2, "{} bytes", payload.len());
        assert_eq!(wsgate_tests::inflate(&payload), message.as_bytes());
        frames.push(payload);
    }
    // Compressed once: every recipient got the same bytes.
    assert!(frames.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(plain.next().await, Received::Text(message.clone()));
    assert_eq!(
        small_window.next_message().await,
        Some((1, false, message.clone().into_bytes()))
    );

    // Under the threshold, and binary messages above it.
    gw.http().publish("prices", "small").await;
    for c in &mut deflating {
        assert_eq!(c.next_message().await, Some((1, false, b"small".to_vec())));
    }
    assert_eq!(plain.next().await, Received::Text("small".into()));
}

#[tokio::test]
async fn the_threshold_is_configurable() {
    let gw = TestGateway::start(&["--compression-threshold-bytes", "0"]).await;
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    c.join("t").await;
    let small = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    gw.http().publish("t", small).await;
    assert_eq!(c.next_message().await, Some((1, true, small.into())));
    // Still plain when compressing would not make it smaller.
    gw.http().publish("t", "ab").await;
    assert_eq!(c.next_message().await, Some((1, false, b"ab".to_vec())));
}

#[tokio::test]
async fn compressed_commands_are_inflated_whole_or_fragmented() {
    let gw = TestGateway::start(&[]).await;
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    let join = br#"{"type":"room.join","room":"news","id":"j1"}"#;
    assert!(c.send_raw(&RawClient::compressed_frame(1, join)).await);
    let (_, _, ack) = c.next_message().await.unwrap();
    assert!(String::from_utf8(ack).unwrap().contains("room.joined"));

    // The same command compressed, cut into three fragments with a ping in between.
    let packed = deflate(br#"{"type":"room.join","room":"sport","id":"j2"}"#);
    let (a, rest) = packed.split_at(packed.len() / 3);
    let (b, d) = rest.split_at(rest.len() / 2);
    let mut bytes = RawClient::fragment(false, 0x40 | 1, a);
    bytes.extend(RawClient::fragment(false, 0, b));
    bytes.extend(RawClient::frame(9, b"hi"));
    bytes.extend(RawClient::fragment(true, 0, d));
    assert!(c.send_raw(&bytes).await);
    assert_eq!(c.next_message().await, Some((10, false, b"hi".to_vec())));
    let (_, _, ack) = c.next_message().await.unwrap();
    assert!(
        String::from_utf8(ack)
            .unwrap()
            .contains(r#""room":"sport""#)
    );
    gw.http().publish("sport", "goal").await;
    assert_eq!(c.next_message().await, Some((1, false, b"goal".to_vec())));
}

#[tokio::test]
async fn a_zip_bomb_is_refused_with_1009() {
    let gw = TestGateway::start(&["--max-frame-bytes", "65536"]).await;
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    // 16 MiB of spaces compress to about 16 KiB: a frame well under the limit.
    let bomb = deflate(&vec![b' '; 16 << 20]);
    assert!(bomb.len() < 65536, "{}", bomb.len());
    assert!(
        c.send_raw(&RawClient::fragment(true, 0x40 | 1, &bomb))
            .await
    );
    assert_eq!(c.until_close().await, (vec![], Some(1009)));
    // What fits the limit once inflated is fine.
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    let padded = format!(r#"{{"type":"heartbeat","pad":"{}"}}"#, " ".repeat(65000));
    assert!(
        c.send_raw(&RawClient::compressed_frame(1, padded.as_bytes()))
            .await
    );
    c.join("still-here").await;
}

#[tokio::test]
async fn invalid_compressed_data_closes_with_1007() {
    let gw = TestGateway::start(&[]).await;
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    assert!(
        c.send_raw(&RawClient::fragment(true, 0x41, &[0xff; 16]))
            .await
    );
    assert_eq!(c.until_close().await, (vec![], Some(1007)));
}

#[tokio::test]
async fn rsv1_without_the_extension_closes_with_1002() {
    let gw = TestGateway::start(&[]).await;
    let mut c = RawClient::connect(gw.addr).await;
    assert_eq!(c.extensions(), None);
    assert!(c.send_raw(&RawClient::compressed_frame(1, b"{}")).await);
    assert_eq!(c.until_close().await, (vec![], Some(1002)));
    // Nor on a control frame, with the extension.
    let mut c = RawClient::connect_offering(gw.addr, BROWSER_OFFER).await;
    assert!(c.send_raw(&RawClient::fragment(true, 0x40 | 9, b"")).await);
    assert_eq!(c.until_close().await, (vec![], Some(1002)));
}

/// Echoes every message (what `examples/autobahn_echo.rs` runs under the Autobahn suite).
struct Echo;

impl MessageHandler for Echo {
    fn on_message(&self, conn: &Connection<'_>, message: Message) {
        conn.send(message);
    }
}

#[tokio::test]
async fn an_embedders_connections_compress_too() {
    let gw = TestGateway::start_with_handler(&["--ws-path", "/"], Echo).await;
    let mut c = RawClient::handshake_with(gw.addr, "/", Some(BROWSER_OFFER)).await;
    assert_eq!(c.extensions().as_deref(), Some(ACCEPTED));
    let message = json_message(30);
    assert!(
        c.send_raw(&RawClient::compressed_frame(1, message.as_bytes()))
            .await
    );
    assert_eq!(
        c.next_message().await,
        Some((1, true, message.clone().into_bytes()))
    );
    assert!(c.send_raw(&RawClient::frame(2, message.as_bytes())).await);
    assert_eq!(
        c.next_message().await,
        Some((2, true, message.into_bytes()))
    );
}
