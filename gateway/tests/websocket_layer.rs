//! The gateway's WebSocket layer on its own: an embedder's [`wsgate::MessageHandler`] in place
//! of the client protocol (what `examples/autobahn_echo.rs` runs under the Autobahn suite), and
//! regressions found by that suite, reproduced with a raw client.
#![allow(clippy::unwrap_used)]

use wsgate::{Connection, Message, MessageHandler};
use wsgate_tests::{RawClient, TestGateway, metric};

/// Echoes every message; `bye` asks the gateway to close the connection instead.
struct Echo;

impl MessageHandler for Echo {
    fn on_message(&self, conn: &Connection<'_>, message: Message) {
        if message == Message::text("bye") {
            conn.send(Message::Disconnect);
        } else {
            conn.send(message);
        }
    }
}

async fn echo_gateway(extra: &[&str]) -> TestGateway {
    let mut args = vec!["--ws-path", "/"];
    args.extend_from_slice(extra);
    TestGateway::start_with_handler(&args, Echo).await
}

#[tokio::test]
async fn a_message_handler_gets_every_data_message_and_answers_on_the_same_connection() {
    let gw = echo_gateway(&[]).await;
    let mut c = RawClient::handshake(gw.addr, "/").await;
    // No session envelope: the first frame is the answer to the first message.
    assert!(c.send_text("hello").await);
    assert_eq!(c.next_frame().await, Some((1, b"hello".to_vec())));
    assert!(c.send_raw(&RawClient::frame(2, &[0, 1, 255])).await);
    assert_eq!(c.next_frame().await, Some((2, vec![0, 1, 255])));
    // `2` is an ordinary message here, not wsgate's ping.
    assert!(c.send_text("2").await);
    assert_eq!(c.next_frame().await, Some((1, b"2".to_vec())));
    // Reassembly and pings stay with the WebSocket layer: the pong comes first.
    let mut bytes = RawClient::fragment(false, 1, "frag".as_bytes());
    bytes.extend(RawClient::frame(9, b"ping"));
    bytes.extend(RawClient::fragment(true, 0, "mented \u{e9}".as_bytes()));
    assert!(c.send_raw(&bytes).await);
    assert_eq!(c.next_frame().await, Some((10, b"ping".to_vec())));
    assert_eq!(
        c.next_frame().await,
        Some((1, "fragmented \u{e9}".as_bytes().to_vec()))
    );
    assert_eq!(gw.gateway.connection_count(), 1);
    // The closing handshake is the layer's too.
    assert!(c.send_raw(&RawClient::close_frame(1000, b"")).await);
    assert_eq!(c.until_close().await, (vec![], Some(1000)));
    c.wait_end().await;
}

#[tokio::test]
async fn a_message_handler_may_close_its_connection() {
    let gw = echo_gateway(&[]).await;
    let mut c = RawClient::handshake(gw.addr, "/").await;
    assert!(c.send_text("first").await);
    assert!(c.send_text("bye").await);
    assert_eq!(
        c.until_close().await,
        (vec![(1, b"first".to_vec())], Some(1000))
    );
}

#[tokio::test]
async fn with_a_message_handler_an_oversized_message_closes_with_1009_and_sends_no_envelope() {
    let gw = echo_gateway(&["--max-frame-bytes", "1024"]).await;
    let mut c = RawClient::handshake(gw.addr, "/").await;
    assert!(c.send_text(&"x".repeat(1024)).await);
    assert!(c.send_text(&"x".repeat(1025)).await);
    let (before, code) = c.until_close().await;
    assert_eq!(before, vec![(1, vec![b'x'; 1024])]);
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn a_message_handler_answers_within_the_outbound_queue_limits() {
    // A client that sends faster than it reads cannot make the echo queue grow without
    // bound: past the byte bound it is closed as a slow consumer, like any recipient.
    let gw = echo_gateway(&[
        "--max-frame-bytes",
        "1048576",
        "--outbound-queue-bytes",
        "2097152",
        "--max-inbound-rate",
        "0",
    ])
    .await;
    let mut c = RawClient::handshake(gw.addr, "/").await;
    let frame = RawClient::frame(2, &vec![7u8; 1 << 20]);
    let mut sent = 0;
    // Counted at once when the queue overflows (the close is counted once it is over).
    let slow = || {
        let scrape = gw.gateway.hub().metrics().render();
        metric(
            &scrape,
            r#"wsgate_messages_dropped_total{reason="slow_consumer"}"#,
        )
        .unwrap_or(0.0)
    };
    // The client reads nothing: the socket buffers fill, then the queue, and the gateway
    // gives up on it.
    while slow() == 0.0 {
        assert!(sent < 256, "still open after {sent} MiB unread");
        assert!(c.send_raw(&frame).await);
        sent += 1;
    }
    let (_, code) = c.until_close().await;
    assert_eq!(code, Some(1008));
}

#[tokio::test]
async fn invalid_utf8_in_a_fragment_fails_the_connection_before_the_message_ends() {
    // Autobahn 6.4.1 / 6.4.2 (NON-STRICT before): the gateway used to check a text message
    // only once complete, so a client that never sent the last fragment kept the connection
    // open with invalid text pending. The final fragment is never sent here.
    let gw = echo_gateway(&[]).await;
    let mut c = RawClient::handshake(gw.addr, "/").await;
    let mut bytes = RawClient::fragment(false, 1, "\u{3ba}\u{1f79}\u{3c3}".as_bytes());
    bytes.extend(RawClient::fragment(false, 0, &[0xF4, 0x90, 0x80, 0x80]));
    assert!(c.send_raw(&bytes).await);
    assert_eq!(c.until_close().await, (vec![], Some(1007)));
}
