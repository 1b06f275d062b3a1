//! Messages and disconnects addressed to a user (a token's `sub`) reach every connection of
//! that user on every replica: three gateway processes on a real redis-server.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use wsgate_tests::{Client, DEADLINE, Received, RedisServer, fleet};

const SECRET: &str = "the users test secret, at least 32 bytes long";

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp, "topics": ["*"]}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// The secret in a file of its own, removed on drop.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("wsgate-users-secret-{}", rand::random::<u64>()));
        std::fs::write(&path, SECRET).unwrap();
        Self(path)
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_reached_and_disconnected_on_every_replica() {
    let redis = RedisServer::start();
    let secret = SecretFile::new();
    let gws = fleet(
        &redis,
        3,
        "users",
        &[
            "--auth",
            "required",
            "--jwt-secret-file",
            secret.0.to_str().unwrap(),
        ],
    )
    .await;
    let alice = token("alice@example.com");
    // Alice: two connections on the first replica (token on the upgrade), one on the second
    // (the seed client's auth message). Bob: one on the third.
    let mut alices = Vec::new();
    for _ in 0..2 {
        alices.push(
            Client::connect_with(gws[0].addr, &format!("/ws?token={alice}"), None)
                .await
                .unwrap(),
        );
    }
    let mut c = gws[1].client().await;
    c.send_text(&json!({"type": "auth.authenticate", "token": alice}).to_string())
        .await;
    // auth.ok comes once messages to the user reach this connection.
    assert_eq!(c.next_json().await["name"], "auth.ok");
    alices.push(c);
    let mut bob = Client::connect_with(gws[2].addr, "/ws", Some(&token("bob")))
        .await
        .unwrap();
    assert_eq!(redis.numsub("users:__user__:alice@example.com"), 2);

    // From the replica where Alice has no connection.
    let (status, body) = gws[2]
        .http()
        .post_json(
            "/api/send",
            json!({"user": "alice@example.com", "message": "hi alice"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for c in &mut alices {
        assert_eq!(c.next_text().await, "hi alice");
    }
    // In a batch, with other kinds of item.
    let (status, body) = gws[1]
        .http()
        .post_json(
            "/api/batch",
            json!({"messages": [
                {"user": "bob", "message": "hi bob"},
                {"user": "alice@example.com", "name": "note", "data": {"n": 1}},
                {"socketId": bob.socket_id, "message": "to bob's socket"},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(bob.next_text().await, "hi bob");
    assert_eq!(bob.next_text().await, "to bob's socket");
    for c in &mut alices {
        assert_eq!(c.next_json().await["name"], "note");
    }

    // Disconnect Alice everywhere; Bob stays.
    let (status, _) = gws[2]
        .http()
        .post_json("/api/disconnect", json!({"user": "alice@example.com"}))
        .await;
    assert_eq!(status, 200);
    for c in &mut alices {
        assert!(matches!(c.next().await, Received::Close(Some(1000), _)));
    }
    drop(alices);
    gws[0].http().send(&bob.socket_id, "still here").await;
    assert_eq!(bob.next_text().await, "still here");
    // Her channel is released on both replicas that held it.
    let deadline = Instant::now() + DEADLINE;
    while redis.numsub("users:__user__:alice@example.com") != 0 {
        assert!(
            Instant::now() < deadline,
            "alice's channel is still subscribed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(redis.numsub("users:__user__:bob"), 1);

    // Bad user ids are refused with the field named.
    for (body, field) in [
        (json!({"user": "", "message": "x"}), "user"),
        (json!({"user": "a\nb", "message": "x"}), "user"),
        (json!({"user": "x".repeat(257), "message": "x"}), "user"),
    ] {
        let (status, answer) = gws[0].http().post_json("/api/send", body).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(field));
    }
    let (status, _) = gws[0]
        .http()
        .post_json(
            "/api/send",
            json!({"user": "bob", "socketId": bob.socket_id, "message": "x"}),
        )
        .await;
    assert_eq!(status, 400, "a user and a socket at once");
}
