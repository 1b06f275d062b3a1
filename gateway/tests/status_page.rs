//! The built-in status page at `/` over real HTTP: its headers, its self-containment, the flag
//! that turns it off, and where it lives when the probes have their own address.
#![allow(clippy::unwrap_used)]

use base64::Engine;
use sha2::{Digest, Sha256};
use wsgate_tests::{ProcessGateway, TestGateway};

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let (_, rest) = page.split_once(&format!("<{tag}>")).unwrap();
    rest.split_once(&format!("</{tag}>")).unwrap().0
}

fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[tokio::test]
async fn the_root_serves_a_self_contained_page_with_a_strict_policy() {
    let gw = TestGateway::start(&[]).await;
    let resp = gw.http().get("/").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "text/html; charset=utf-8");
    assert_eq!(header(&resp, "x-content-type-options"), "nosniff");
    assert_eq!(header(&resp, "cache-control"), "no-store");
    assert_eq!(header(&resp, "x-frame-options"), "DENY");
    let csp = header(&resp, "content-security-policy").to_owned();
    let page = resp.text().await.unwrap();

    // The policy lets exactly the page's own inline script and style run …
    let directives: Vec<&str> = csp.trim_end_matches(';').split("; ").collect();
    assert!(directives.contains(&"default-src 'none'"), "{csp}");
    let script = format!("script-src {}", sha256_source(inline(&page, "script")));
    let style = format!("style-src {}", sha256_source(inline(&page, "style")));
    assert!(directives.contains(&script.as_str()), "{csp}");
    assert!(directives.contains(&style.as_str()), "{csp}");
    assert!(directives.contains(&"frame-ancestors 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-"), "{csp}");
    // … and connect only to this gateway: HTTP and WebSocket on the same host.
    let host = gw.addr;
    assert!(
        directives.contains(&format!("connect-src 'self' ws://{host} wss://{host}").as_str()),
        "{csp}"
    );

    // Nothing is loaded from anywhere else: no absolute URL, no external asset at all.
    for needle in [
        "http://", "https://", "//cdn", "src=", "href=", "@import", "url(",
    ] {
        assert!(!page.contains(needle), "the page contains {needle:?}");
    }
    assert!(page.contains(r#"<meta name="wsgate-ws-path" content="/ws">"#));
}

#[tokio::test]
async fn head_and_other_methods_and_paths_answer_sanely() {
    let gw = TestGateway::start(&["--ws-path", "/live"]).await;
    let http = gw.http();
    let head = reqwest::Client::new()
        .head(http.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "content-type"), "text/html; charset=utf-8");
    assert!(head.headers().contains_key("content-security-policy"));
    assert!(head.bytes().await.unwrap().is_empty());
    assert_eq!(http.post("/").send().await.unwrap().status(), 405);
    assert_eq!(http.get("/index.html").send().await.unwrap().status(), 404);
    assert_eq!(http.get("/nope").send().await.unwrap().status(), 404);
    // The page opens its WebSocket on the configured path.
    let page = http.get("/").send().await.unwrap().text().await.unwrap();
    assert!(page.contains(r#"content="/live""#));
}

#[tokio::test]
async fn stats_report_the_build_next_to_the_existing_fields() {
    let gw = TestGateway::start(&[]).await;
    let stats = gw.http().stats().await;
    for field in [
        "connections",
        "topics",
        "subscriptions",
        "draining",
        "broker",
    ] {
        assert!(stats.get(field).is_some(), "{field} missing: {stats}");
    }
    assert_eq!(stats["build"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(stats["build"].get("commit").is_some(), "{stats}");
}

#[tokio::test]
async fn the_status_page_flag_off_leaves_the_root_unrouted() {
    let gw = TestGateway::start(&["--status-page", "off"]).await;
    let http = gw.http();
    assert_eq!(http.get("/").send().await.unwrap().status(), 404);
    // Everything else is unchanged.
    assert_eq!(http.get("/healthz").send().await.unwrap().status(), 200);
    assert_eq!(http.stats().await["connections"], 0);

    // The environment twin, on the real binary.
    let process = ProcessGateway::spawn_bin_env(
        env!("CARGO_BIN_EXE_wsgate"),
        &[],
        &[("WSGATE_STATUS_PAGE", "off")],
    )
    .await;
    let status = process.http().get("/").send().await.unwrap().status();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn with_a_separate_metrics_address_the_page_stays_on_the_main_one() {
    // A free port from the OS (--listen is 127.0.0.1:0 already, and the two must differ).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = ProcessGateway::spawn_bin(
        env!("CARGO_BIN_EXE_wsgate"),
        &["--metrics-listen", &metrics.to_string()],
    )
    .await;
    let http = gw.http();
    let page = http.get("/").send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
    assert_eq!(http.get("/metrics").send().await.unwrap().status(), 404);
    let ops = wsgate_tests::Http::new(metrics);
    assert_eq!(ops.get("/metrics").send().await.unwrap().status(), 200);
    assert_eq!(ops.get("/").send().await.unwrap().status(), 404);
}

#[tokio::test]
async fn with_the_websocket_endpoint_at_the_root_there_is_no_page_and_no_clash() {
    // `--ws-path /` gives `/` to WebSocket upgrades: the gateway starts (no route clash) and a
    // plain GET gets no page.
    let gw = TestGateway::start(&["--ws-path", "/"]).await;
    let answer = gw.http().get("/").send().await.unwrap();
    assert_ne!(
        answer.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"text/html; charset=utf-8"[..])
    );
    let upgraded = tokio_tungstenite::connect_async(format!("ws://{}/", gw.addr)).await;
    assert!(upgraded.is_ok(), "{upgraded:?}");
}
