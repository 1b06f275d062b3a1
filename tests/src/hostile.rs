//! Hostile payloads from Redis, shared by the tests of every Redis topology.

/// Envelopes for topic `t` that must be dropped and counted (never a panic): not JSON, cut
/// short, wrong types, missing fields, another topic, bad base64, `__proto__`, nested 50,000
/// deep, 100 kB (over a 1,000-byte message limit), not UTF-8.
pub fn hostile_envelopes() -> Vec<Vec<u8>> {
    let deep = format!(
        r#"{{"topic":"t","message":{}1{},"isBinary":false}}"#,
        "[".repeat(50_000),
        "]".repeat(50_000)
    );
    let huge = format!(
        r#"{{"topic":"t","message":"{}","isBinary":false}}"#,
        "x".repeat(100_000)
    );
    vec![
        b"not json".to_vec(),
        b"{\"topic\":\"t\"".to_vec(),
        br#"{"topic":"t","message":42,"isBinary":false}"#.to_vec(),
        br#"{"topic":"t","message":"m","isBinary":"no"}"#.to_vec(),
        br#"{"topic":"t","isBinary":false}"#.to_vec(),
        br#"{"topic":"other","message":"m","isBinary":false}"#.to_vec(),
        br#"{"topic":"t","message":"%%%","isBinary":true}"#.to_vec(),
        br#"{"topic":"t","message":"m","isBinary":false,"__proto__":{"admin":true}}"#.to_vec(),
        deep.into_bytes(),
        huge.into_bytes(),
        vec![0xFF; 64],
    ]
}

/// Forged or broken announcements on the replicas channel.
pub fn forged_announcements() -> Vec<Vec<u8>> {
    [
        &b"{}"[..],
        br#"{"replica":"not-a-uuid"}"#,
        br#"{"replica":"3f2b6f8e-2a53-4a7c-9a8e-1b2c3d4e5f60","admin":true}"#,
        b"[1,2,3]",
    ]
    .iter()
    .map(|p| p.to_vec())
    .collect()
}

/// After `rejected` hostile payloads and then a good message `good` to `client`'s topic: the
/// good one arrives, each hostile one was counted once, and the client is still served.
pub async fn expect_rejected_then_good(
    http: &crate::Http,
    client: &mut crate::Client,
    rejected: usize,
) {
    assert_eq!(client.next_text().await, "good");
    let scrape = http.metrics().await;
    assert_eq!(
        crate::metric(&scrape, "wsgate_broker_payloads_rejected_total"),
        Some(rejected as f64)
    );
    assert_eq!(
        crate::metric(
            &scrape,
            "wsgate_messages_dropped_total{reason=\"invalid_payload\"}"
        ),
        Some(rejected as f64)
    );
    client.assert_alive().await;
}
