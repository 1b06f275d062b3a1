//! Connection authentication (`--auth`, DESIGN §10) against a real gateway, with real tokens
//! signed by keys that openssl makes for each run, over real sockets.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use wsgate_tests::{Client, DEADLINE, Received, TestGateway, metric};

/// A folder of keys for one test, removed on drop.
struct Keys {
    dir: PathBuf,
}

const SECRET: &str = "a test secret of more than thirty-two bytes";

impl Keys {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("wsgate-auth-test-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("secret"), format!("{SECRET}\n")).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }

    /// A key pair made by openssl: `{name}.key` (PKCS#8 private) and `{name}.pub` (SPKI).
    fn pair(&self, name: &str, genpkey: &[&str]) -> (Vec<u8>, String) {
        let private = self.dir.join(format!("{name}.key"));
        let public = self.dir.join(format!("{name}.pub"));
        openssl(&[&["genpkey", "-out", private.to_str().unwrap()], genpkey].concat());
        openssl(&[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
        (
            std::fs::read(&private).unwrap(),
            public.to_str().unwrap().to_owned(),
        )
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An algorithm and the key that signs with it.
type Signer = (Algorithm, EncodingKey);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        None,
        claims,
    )
}

fn claims(topics: &[&str]) -> Value {
    json!({"sub": "user-1", "exp": now() + 300, "topics": topics})
}

/// A gateway checking tokens against the HMAC secret of `keys`, with `extra` flags (`mode`:
/// `required` or `optional`).
async fn hmac_gateway(keys: &Keys, mode: &str, extra: &[&str]) -> TestGateway {
    let secret = keys.path("secret");
    let mut args = vec!["--auth", mode, "--jwt-secret-file", &secret];
    args.extend_from_slice(extra);
    TestGateway::start(&args).await
}

async fn auth_failures(gw: &TestGateway, reason: &str) -> f64 {
    let scrape = gw.http().metrics().await;
    metric(
        &scrape,
        &format!("wsgate_auth_failures_total{{reason=\"{reason}\"}}"),
    )
    .unwrap()
}

/// Connects without a token on the upgrade and authenticates the way the seed's browser client
/// does: `{"type":"auth.authenticate","token":…}` as its first frame. Returns `auth.ok`.
async fn authenticate(gw: &TestGateway, token: &str) -> (Client, Value) {
    let mut c = gw.client().await;
    c.send_text(&json!({"type": "auth.authenticate", "token": token}).to_string())
        .await;
    let ok = c.next_json().await;
    assert_eq!(ok["name"], "auth.ok", "{ok}");
    (c, ok)
}

/// Publishes on `topic` and checks that `c` receives it.
async fn receives(gw: &TestGateway, c: &mut Client, topic: &str) {
    let text = format!("to {topic} {}", rand::random::<u32>());
    gw.http().publish(topic, &text).await;
    assert_eq!(c.next_text().await, text);
}

#[tokio::test]
async fn every_key_type_and_every_transport_authenticates() {
    let keys = Keys::new();
    let (rsa, rsa_pub) = keys.pair(
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let (p256, p256_pub) = keys.pair(
        "p256",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let (p384, p384_pub) = keys.pair(
        "p384",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"],
    );
    let (ed, ed_pub) = keys.pair("ed", &["-algorithm", "ed25519"]);
    let secret = keys.path("secret");
    let hmac = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let cases: Vec<(&str, &str, Vec<Signer>)> = vec![
        (
            "--jwt-secret-file",
            &secret,
            vec![
                (Algorithm::HS256, hmac.clone()),
                (Algorithm::HS384, hmac.clone()),
                (Algorithm::HS512, hmac),
            ],
        ),
        (
            "--jwt-public-key-file",
            &rsa_pub,
            vec![
                (Algorithm::RS256, EncodingKey::from_rsa_pem(&rsa).unwrap()),
                (Algorithm::PS256, EncodingKey::from_rsa_pem(&rsa).unwrap()),
            ],
        ),
        (
            "--jwt-public-key-file",
            &p256_pub,
            vec![(Algorithm::ES256, EncodingKey::from_ec_pem(&p256).unwrap())],
        ),
        (
            "--jwt-public-key-file",
            &p384_pub,
            vec![(Algorithm::ES384, EncodingKey::from_ec_pem(&p384).unwrap())],
        ),
        (
            "--jwt-public-key-file",
            &ed_pub,
            vec![(Algorithm::EdDSA, EncodingKey::from_ed_pem(&ed).unwrap())],
        ),
    ];
    for (flag, file, algorithms) in cases {
        let gw = TestGateway::start(&["--auth", "required", flag, file]).await;
        for (alg, key) in algorithms {
            let signed = claims(&["news"]);
            let token = sign(alg, &key, None, &signed);
            // ?token= on the upgrade (browsers).
            let mut c = Client::connect_with(gw.addr, &format!("/ws?token={token}"), None)
                .await
                .unwrap_or_else(|e| panic!("{alg:?} by query: {e:?}"));
            c.join("news").await;
            receives(&gw, &mut c, "news").await;
            // Authorization: Bearer on the upgrade.
            let mut c = Client::connect_with(gw.addr, "/ws", Some(&token))
                .await
                .unwrap_or_else(|e| panic!("{alg:?} by header: {e:?}"));
            c.join("news").await;
            receives(&gw, &mut c, "news").await;
            // The seed client's own message, then a join.
            let (mut c, ok) = authenticate(&gw, &token).await;
            assert_eq!(ok["data"]["userId"], "user-1");
            assert_eq!(
                ok["data"]["expiresAt"].as_u64(),
                signed["exp"].as_u64().map(|s| s * 1000)
            );
            c.join("news").await;
            receives(&gw, &mut c, "news").await;
        }
    }
}

#[tokio::test]
async fn refused_tokens_get_their_own_error_are_counted_and_harm_nobody() {
    let keys = Keys::new();
    let (_, rsa_pub) = keys.pair(
        "rsa",
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    );
    let gw = hmac_gateway(
        &keys,
        "required",
        &[
            "--jwt-audience",
            "app",
            "--jwt-issuer",
            "https://issuer",
            "--jwt-leeway-secs",
            "0",
            "--max-frame-bytes",
            "2097152",
        ],
    )
    .await;
    let good = json!({"sub": "u", "exp": now() + 300, "aud": "app", "iss": "https://issuer", "topics": ["*"]});
    // A connection that is fine throughout, and must stay so.
    let mut bystander = Client::connect_with(gw.addr, &format!("/ws?token={}", hs256(&good)), None)
        .await
        .unwrap();
    bystander.join("calm").await;

    let with = |field: &str, value: Value| {
        let mut c = good.clone();
        c[field] = value;
        hs256(&c)
    };
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let rsa_pub_pem = std::fs::read(&rsa_pub).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("expired", with("exp", json!(now() - 10))),
        ("not_yet_valid", with("nbf", json!(now() + 300))),
        (
            "bad_signature",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"some other secret, also over 32 bytes").unwrap(),
                None,
                &good,
            ),
        ),
        (
            "algorithm",
            format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&good.to_string())
            ),
        ),
        ("audience", with("aud", json!("another-app"))),
        ("issuer", with("iss", json!("https://elsewhere"))),
        ("malformed", "not.a-token.at-all!".to_owned()),
        ("malformed", format!("{}.{}.sig", b64("{]"), b64("{}"))),
        ("claims", with("topics", json!("news"))),
    ];
    // On the upgrade: 401 with the reason, before any WebSocket.
    for (reason, token) in &cases {
        let before = auth_failures(&gw, reason).await;
        let (status, body) = Client::connect_with(gw.addr, &format!("/ws?token={token}"), None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{reason}: accepted"));
        assert_eq!(status, 401, "{reason}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized", "{reason}");
        assert_eq!(auth_failures(&gw, reason).await, before + 1.0, "{reason}");
    }
    // In the message: an `unauthorized` error, then close 1008.
    for (reason, token) in &cases {
        let mut c = gw.client().await;
        c.send_text(&json!({"type": "auth.authenticate", "token": token}).to_string())
            .await;
        let err = c.next_json().await;
        assert_eq!(err["data"]["code"], "unauthorized", "{reason}: {err}");
        assert!(
            matches!(c.next().await, Received::Close(Some(1008), _)),
            "{reason}"
        );
    }
    // An HS256 token signed with the server's RSA public key as the secret: refused by a
    // gateway holding that public key, before any signature is computed.
    let rsa_gw =
        TestGateway::start(&["--auth", "required", "--jwt-public-key-file", &rsa_pub]).await;
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&rsa_pub_pem).unwrap(),
        None,
        &claims(&["*"]),
    );
    let (status, _) = Client::connect_with(rsa_gw.addr, "/ws", Some(&confused))
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
    assert_eq!(auth_failures(&rsa_gw, "algorithm").await, 1.0);

    // A 1 MiB token, in the message (a header that long is refused by the HTTP layer first).
    let huge = "a".repeat(1024 * 1024);
    let mut c = gw.client().await;
    c.send_text(&json!({"type": "auth.authenticate", "token": huge}).to_string())
        .await;
    assert_eq!(c.next_json().await["data"]["code"], "unauthorized");
    assert!(matches!(c.next().await, Received::Close(Some(1008), _)));
    assert_eq!(auth_failures(&gw, "too_large").await, 1.0);

    // Before authenticating, nothing but pings and auth.
    let mut c = gw.client().await;
    c.send_text("2").await;
    assert_eq!(c.next_text().await, "3");
    c.send_text(r#"{"type":"room.join","room":"calm","id":7}"#)
        .await;
    let err = c.next_json().await;
    assert_eq!(
        (err["data"]["code"].as_str(), err["data"]["id"].as_u64()),
        (Some("unauthorized"), Some(7))
    );
    drop(c);

    // The bystander saw none of it.
    receives(&gw, &mut bystander, "calm").await;
}

#[tokio::test]
async fn no_token_in_time_is_a_timeout_and_a_late_token_finds_the_connection_closed() {
    let keys = Keys::new();
    let gw = hmac_gateway(&keys, "required", &["--auth-timeout-ms", "300"]).await;
    let mut c = gw.client().await;
    let err = c.next_json().await;
    assert_eq!(err["data"]["code"], "unauthorized");
    assert_eq!(err["data"]["message"], "authentication timeout");
    assert!(matches!(c.next().await, Received::Close(Some(1008), _)));
    assert_eq!(auth_failures(&gw, "timeout").await, 1.0);
    // Too late: the connection is gone, whatever it sends.
    let _ =
        c.ws.send(tokio_tungstenite::tungstenite::Message::text(
            json!({"type": "auth.authenticate", "token": hs256(&claims(&["*"]))}).to_string(),
        ))
        .await;
    assert!(matches!(
        c.next().await,
        Received::Ended | Received::Close(..)
    ));
    wait_until(|| async {
        let scrape = gw.http().metrics().await;
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"unauthorized\"}",
        ) == Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn joins_follow_the_topics_claim_and_a_refused_join_keeps_the_connection() {
    let keys = Keys::new();
    let gw = hmac_gateway(&keys, "required", &[]).await;
    let (mut c, _) = authenticate(&gw, &hs256(&claims(&["news", "chat:*"]))).await;
    c.join("news").await;
    c.join("chat:1").await;
    c.join("chat:").await;
    for refused in ["other", "newsroom", "chat", "cha"] {
        c.expect_error(
            &json!({"type": "room.join", "room": refused, "id": refused}).to_string(),
            "forbidden",
        )
        .await;
    }
    receives(&gw, &mut c, "chat:1").await;
    // `*` allows every room; no claim allows none.
    let (mut all, _) = authenticate(&gw, &hs256(&claims(&["*"]))).await;
    all.join("anything-at-all").await;
    let (mut none, _) = authenticate(&gw, &hs256(&json!({"sub": "n", "exp": now() + 300}))).await;
    none.expect_error(r#"{"type":"room.join","room":"news"}"#, "forbidden")
        .await;
    let scrape = gw.http().metrics().await;
    assert_eq!(metric(&scrape, "wsgate_forbidden_joins_total"), Some(5.0));
    assert_eq!(
        metric(&scrape, "wsgate_client_errors_total{code=\"forbidden\"}"),
        Some(5.0)
    );
}

#[tokio::test]
async fn a_refresh_keeps_the_connection_past_the_first_expiry_and_expiry_closes_it_with_4001() {
    let keys = Keys::new();
    let gw = hmac_gateway(&keys, "required", &["--jwt-leeway-secs", "0"]).await;
    let first_exp = now() + 2;
    let token =
        |exp: u64, topics: &[&str]| hs256(&json!({"sub": "user-1", "exp": exp, "topics": topics}));
    let (mut c, _) = authenticate(&gw, &token(first_exp, &["a", "b"])).await;
    c.join("a").await;
    c.join("b").await;
    // A fresh token for the same user, allowing only `a`: `b` is left, and the client told.
    let second_exp = first_exp + 2;
    c.send_text(
        &json!({"type": "auth.authenticate", "token": token(second_exp, &["a"])}).to_string(),
    )
    .await;
    let left = c.next_json().await;
    assert_eq!(left["name"], "room.left", "{left}");
    assert_eq!(left["data"], json!({"room": "b", "reason": "forbidden"}));
    let ok = c.next_json().await;
    assert_eq!(ok["data"]["expiresAt"], second_exp * 1000);
    assert_eq!(gw.gateway.topic_subscriber_count("b"), 0);
    // Alive past the first token's expiry, closed at the second's.
    match c.next().await {
        Received::Close(Some(4001), reason) => assert_eq!(reason, "token expired"),
        other => panic!("expected close 4001, got {other:?}"),
    }
    assert!(
        now() >= second_exp,
        "closed before the refreshed token expired"
    );
    drop(c);
    // A refresh for another user is refused.
    let (mut c, _) = authenticate(&gw, &token(now() + 300, &["a"])).await;
    c.send_text(
        &json!({"type": "auth.authenticate", "token": hs256(&json!({"sub": "someone-else", "exp": now() + 300}))})
            .to_string(),
    )
    .await;
    assert_eq!(c.next_json().await["data"]["code"], "unauthorized");
    assert!(matches!(c.next().await, Received::Close(Some(1008), _)));
    // Counted once the closing handshake is over.
    wait_until(|| async {
        let scrape = gw.http().metrics().await;
        metric(
            &scrape,
            "wsgate_connections_closed_total{reason=\"token_expired\"}",
        ) == Some(1.0)
    })
    .await;
    // A token on the upgrade expires the same way.
    let mut c = Client::connect_with(
        gw.addr,
        &format!("/ws?token={}", token(now() + 1, &["a"])),
        None,
    )
    .await
    .unwrap();
    assert!(matches!(c.next().await, Received::Close(Some(4001), _)));
}

#[tokio::test]
async fn a_rotated_jwks_file_takes_effect_without_a_restart() {
    let keys = Keys::new();
    let jwks = keys.dir.join("jwks.json");
    let b64 = |s: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let (k1, k2) = (
        b"the first key of this rotation, 32+ bytes".as_slice(),
        b"the second key of this rotation, 32+ bytes".as_slice(),
    );
    let write = |keys: &[(&str, &[u8])]| {
        let set = json!({"keys": keys.iter().map(|(kid, k)| json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(k)})).collect::<Vec<_>>()});
        // Written aside and renamed, as a ConfigMap update swaps its files.
        let tmp = jwks.with_extension("tmp");
        std::fs::write(&tmp, set.to_string()).unwrap();
        std::fs::rename(&tmp, &jwks).unwrap();
    };
    write(&[("one", k1)]);
    let gw = TestGateway::start(&[
        "--auth",
        "required",
        "--jwt-jwks-file",
        jwks.to_str().unwrap(),
    ])
    .await;
    let token = |kid: &str, key: &[u8]| {
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(key).unwrap(),
            Some(kid),
            &claims(&["*"]),
        )
    };
    let accepted = |kid: &'static str, key: &'static [u8]| {
        let url = format!("/ws?token={}", token(kid, key));
        let addr = gw.addr;
        async move { Client::connect_with(addr, &url, None).await.is_ok() }
    };
    assert!(accepted("one", k1).await);
    assert!(!accepted("two", k2).await);
    assert_eq!(auth_failures(&gw, "unknown_key").await, 1.0);
    // The new key is added: it works once the file is re-read (checked at most every second).
    write(&[("one", k1), ("two", k2)]);
    wait_until(|| accepted("two", k2)).await;
    assert!(accepted("one", k1).await);
    // The old key is removed: new connections with it are refused.
    write(&[("two", k2)]);
    wait_until(|| async { !accepted("one", k1).await }).await;
    assert!(accepted("two", k2).await);
}

/// Polls `check` until it holds, within the deadline.
async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "never happened");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn optional_mode_lets_connections_without_a_token_join_only_anonymous_topics() {
    let keys = Keys::new();
    let gw = hmac_gateway(&keys, "optional", &["--anonymous-topics", "public:*"]).await;
    let mut anon = gw.client().await;
    anon.join("public:lobby").await;
    anon.expect_error(r#"{"type":"room.join","room":"private"}"#, "forbidden")
        .await;
    receives(&gw, &mut anon, "public:lobby").await;
    // Authenticating later adds the token's rooms to the anonymous ones.
    anon.send_text(
        &json!({"type": "auth.authenticate", "token": hs256(&claims(&["private"]))}).to_string(),
    )
    .await;
    assert_eq!(anon.next_json().await["name"], "auth.ok");
    anon.join("private").await;
    anon.join("public:other").await;
    // A bad token on the upgrade is still refused: optional is not "anything goes".
    let (status, _) = Client::connect_with(gw.addr, "/ws?token=nonsense", None)
        .await
        .err()
        .unwrap();
    assert_eq!(status, 401);
}

#[tokio::test]
async fn with_auth_off_nothing_changes() {
    let gw = TestGateway::start(&[]).await;
    let mut c = gw.client().await;
    c.expect_error(
        r#"{"type":"auth.authenticate","token":"x"}"#,
        "unknown_type",
    )
    .await;
    c.join("anything").await;
    // A token on the upgrade is ignored, not checked.
    let mut c = Client::connect_with(gw.addr, "/ws?token=whatever", Some("whatever"))
        .await
        .unwrap();
    c.join("anything").await;
}

#[tokio::test]
async fn bad_auth_settings_are_refused_at_start() {
    let keys = Keys::new();
    let secret = keys.path("secret");
    let short = keys.dir.join("short");
    std::fs::write(&short, "short").unwrap();
    for args in [
        vec!["--auth", "required"],
        vec!["--jwt-secret-file", &secret],
        vec![
            "--auth",
            "required",
            "--jwt-secret-file",
            &secret,
            "--jwt-jwks-file",
            &secret,
        ],
        vec![
            "--auth",
            "required",
            "--jwt-secret-file",
            short.to_str().unwrap(),
        ],
        vec!["--auth", "required", "--jwt-public-key-file", &secret],
        vec![
            "--auth",
            "required",
            "--jwt-secret-file",
            &secret,
            "--anonymous-topics",
            "a",
        ],
        vec![
            "--auth",
            "optional",
            "--jwt-secret-file",
            &secret,
            "--anonymous-topics",
            "a b",
        ],
        vec![
            "--auth",
            "required",
            "--jwt-secret-file",
            &secret,
            "--auth-timeout-ms",
            "0",
        ],
    ] {
        let config = wsgate::Config::parse_args([&["wsgate"][..], &args].concat()).unwrap();
        assert!(wsgate::Gateway::start(config).await.is_err(), "{args:?}");
    }
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused_when_origins_are_listed() {
    let gw = TestGateway::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ])
    .await;
    for allowed in ["https://app.example.com", "https://eu.example.org"] {
        let c = Client::connect_with_headers(gw.addr, "/ws", &[("origin", allowed)]).await;
        assert!(c.is_ok(), "{allowed}: {:?}", c.err());
    }
    for refused in [
        "https://evil.example",
        "http://app.example.com",
        "https://example.org",
        "null",
    ] {
        let (status, body) = Client::connect_with_headers(gw.addr, "/ws", &[("origin", refused)])
            .await
            .err()
            .unwrap_or_else(|| panic!("{refused}: accepted"));
        assert_eq!(status, 403, "{refused}: {body}");
    }
    // Clients that are not browsers send no Origin.
    assert!(Client::connect_with(gw.addr, "/ws", None).await.is_ok());
}

#[tokio::test]
async fn api_keys_rotate_without_a_restart() {
    let keys = Keys::new();
    let file = keys.dir.join("api-keys");
    let write = |lines: &str| {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, lines).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
    };
    write("# the current key\nold-key-0123456789\n");
    let gw = TestGateway::start(&[
        "--api-key",
        "flag-key-0123456789",
        "--api-key",
        "flag-key-9876543210",
        "--api-keys-file",
        file.to_str().unwrap(),
    ])
    .await;
    let status = |key: &'static str| {
        let http = gw.http();
        async move {
            http.post("/api/publish")
                .bearer_auth(key)
                .json(&json!({"topic": "t", "message": "m"}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // Both flag keys and the file's are valid at once.
    assert_eq!(status("flag-key-0123456789").await, 200);
    assert_eq!(status("flag-key-9876543210").await, 200);
    assert_eq!(status("old-key-0123456789").await, 200);
    assert_eq!(status("new-key-0123456789").await, 403);
    // Add the new key, move to it, remove the old one: no moment without a valid key.
    write("old-key-0123456789\nnew-key-0123456789\n");
    wait_until(|| async { status("new-key-0123456789").await == 200 }).await;
    assert_eq!(status("old-key-0123456789").await, 200);
    write("new-key-0123456789\n");
    wait_until(|| async { status("old-key-0123456789").await == 403 }).await;
    assert_eq!(status("new-key-0123456789").await, 200);
}

#[tokio::test]
async fn a_user_is_reached_on_all_its_connections_with_the_memory_broker() {
    let keys = Keys::new();
    let gw = hmac_gateway(&keys, "required", &[]).await;
    let user = |sub: &str| hs256(&json!({"sub": sub, "exp": now() + 300, "topics": ["*"]}));
    let (mut a1, _) = authenticate(&gw, &user("a")).await;
    let mut a2 = Client::connect_with(gw.addr, &format!("/ws?token={}", user("a")), None)
        .await
        .unwrap();
    let (mut b, _) = authenticate(&gw, &user("b")).await;
    let (status, _) = gw
        .http()
        .post_json("/api/send", json!({"user": "a", "message": "to a"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(a1.next_text().await, "to a");
    assert_eq!(a2.next_text().await, "to a");
    // The embedded API does the same.
    gw.gateway
        .send_to_user(
            &wsgate::UserId::new("b").unwrap(),
            wsgate::Message::text("to b"),
        )
        .await
        .unwrap();
    assert_eq!(b.next_text().await, "to b");
    let (status, _) = gw
        .http()
        .post_json("/api/disconnect", json!({"user": "a"}))
        .await;
    assert_eq!(status, 200);
    assert!(matches!(a1.next().await, Received::Close(Some(1000), _)));
    assert!(matches!(a2.next().await, Received::Close(Some(1000), _)));
    b.join("anything").await;
    receives(&gw, &mut b, "anything").await;
}
