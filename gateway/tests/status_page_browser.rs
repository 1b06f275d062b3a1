//! The status page in a real browser: headless Chromium (through chromedriver) loads `/` from a
//! real gateway process, shows its stats, joins a topic from the try-it panel and shows what
//! the HTTP API publishes to it — as text, however hostile. A screenshot is left in the target
//! directory (`target/tmp/status-page.png`).
#![allow(clippy::unwrap_used)]

use serde_json::json;
use wsgate_tests::ProcessGateway;
use wsgate_tests::webdriver::{ChromeDriver, WINDOW};

const API_KEY: &str = "status-page-test-key-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_stats_joins_a_topic_and_shows_published_messages_as_text() {
    let gw = ProcessGateway::spawn_bin(env!("CARGO_BIN_EXE_wsgate"), &["--api-key", API_KEY]).await;
    let driver = ChromeDriver::start().await;
    let page = driver.session().await;
    page.goto(&format!("http://{}/", gw.addr)).await;

    // With an API key configured, the stats need it too: the page says so, then uses the key
    // typed into it (Enter submits it at once).
    page.wait_for_text("#updated", "need the API key").await;
    page.type_into("#key", &format!("{API_KEY}\u{E007}")).await;
    page.wait_for_text("#connections", r"^\d+$").await;
    page.wait_for_text("#broker", "^memory up$").await;

    // Join from the try-it panel; the chip appears only after the gateway's room.joined.
    page.type_into("#join-topic", "news").await;
    page.click("#join").await;
    page.wait_for_text("#joined li", "^joined news").await;
    // The page's own connection shows up in the live stats.
    page.wait_for_text("#connections", "^1$").await;

    // A message from the real HTTP API, carrying markup: it must arrive as text.
    let hostile = r#"<img src=x onerror="document.title='owned'"> hello from the test"#;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("http://{}/api/publish", gw.addr))
        .bearer_auth(API_KEY)
        .json(&json!({"topic": "news", "message": hostile}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let shown = page.wait_for_text("#log li", "hello from the test").await;
    assert!(shown.ends_with(hostile), "{shown}");
    let injected = page
        .execute(
            "return [document.querySelectorAll('#log img').length, document.title];",
            json!([]),
        )
        .await;
    assert_eq!(injected, json!([0, "wsgate"]));

    // The publish box sends through /api/publish with the typed key.
    page.type_into("#publish-message", "from the page").await;
    page.click("#publish").await;
    page.wait_for_text("#publish-result", r"^published \(200\)$")
        .await;
    page.wait_for_text("#log li", "from the page$").await;

    let png = page.screenshot().await;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&path, &png).unwrap();
    let mut reader = png::Decoder::new(std::io::Cursor::new(&png))
        .read_info()
        .unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    // The viewport: the window's width, its height less the (headless) browser frame.
    assert_eq!(frame.width, WINDOW.0, "{}", path.display());
    assert!(
        (WINDOW.1 / 2..=WINDOW.1).contains(&frame.height),
        "{}",
        frame.height
    );
    // A rendered page, not a blank window: many distinct colours.
    let colours: std::collections::HashSet<&[u8]> = pixels[..frame.buffer_size()]
        .chunks(frame.color_type.samples())
        .collect();
    assert!(colours.len() > 16, "{} colours", colours.len());
    page.quit().await;
}
