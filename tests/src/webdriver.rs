//! Headless Chromium driven through `chromedriver` with the W3C WebDriver protocol (plain JSON
//! over HTTP, spoken here with reqwest): the handful of commands a page test needs. Chromium
//! and chromedriver are Debian's (`chromium`, `chromium-driver`); everything listens on and
//! talks to 127.0.0.1 only, and the whole process group is killed on drop.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long one wait for the page may take: generous, for a loaded 2-core CI machine.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(60);

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
/// The key W3C WebDriver uses for element references.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Browser window size, and so the screenshot's.
pub const WINDOW: (u32, u32) = (1200, 900);

/// A `chromedriver` process on a free port of 127.0.0.1, in its own process group so that the
/// browsers it starts die with it.
pub struct ChromeDriver {
    child: tokio::process::Child,
    pgid: u32,
    base: String,
    http: reqwest::Client,
}

impl ChromeDriver {
    /// Starts chromedriver (`$WSGATE_CHROMEDRIVER`, default /usr/bin/chromedriver).
    ///
    /// Panics with what to install when chromedriver or Chromium is missing: a page test that
    /// cannot run must fail, not pass silently.
    pub async fn start() -> Self {
        let driver = std::env::var("WSGATE_CHROMEDRIVER").unwrap_or_else(|_| CHROMEDRIVER.into());
        for (what, path) in [("chromedriver", driver.clone()), ("chromium", chromium())] {
            assert!(
                std::path::Path::new(&path).exists(),
                "{what} not found at {path}: install Debian's chromium and chromium-driver \
                 (`apt-get install -y chromium chromium-driver`; scripts/test does it)"
            );
        }
        // --port=0: chromedriver picks a free port itself and prints it.
        let mut child = tokio::process::Command::new(&driver)
            .args(["--port=0", "--allowed-ips=127.0.0.1", "--log-level=WARNING"])
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {driver}: {e}"));
        let pgid = child.id().expect("chromedriver pid");
        let stdout = child.stdout.take().expect("chromedriver stdout");
        let mut lines = BufReader::new(stdout).lines();
        let port = tokio::time::timeout(PAGE_DEADLINE, async {
            while let Some(line) = lines.next_line().await.expect("chromedriver output") {
                if let Some(rest) = line.split("started successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').trim().parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromedriver did not report its port");
        // Keep reading so that chromedriver never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            pgid,
            base: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        }
    }

    /// A new headless browser session.
    pub async fn session(&self) -> Session {
        let mut args = vec![
            "--headless=new".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--window-size={},{}", WINDOW.0, WINDOW.1),
            // Nothing but the page under test: no background, update or telemetry traffic, and
            // should anything try, no name resolves and every request goes to a closed local
            // port (loopback is never proxied).
            "--disable-background-networking".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-breakpad".to_owned(),
            "--disable-crash-reporter".to_owned(),
            "--disable-domain-reliability".to_owned(),
            "--disable-sync".to_owned(),
            "--no-first-run".to_owned(),
            "--no-pings".to_owned(),
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1".to_owned(),
            "--proxy-server=http://127.0.0.1:9".to_owned(),
        ];
        if running_as_root() {
            // Chromium's sandbox refuses to run as root.
            args.push("--no-sandbox".to_owned());
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium(), "args": args},
        }}});
        let value = self.command("POST", "/session", Some(caps)).await;
        let id = value["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {value}"))
            .to_owned();
        let session = Session {
            base: format!("{}/session/{id}", self.base),
            http: self.http.clone(),
        };
        let ms = PAGE_DEADLINE.as_millis() as u64;
        session
            .command(
                "POST",
                "/timeouts",
                Some(json!({"script": ms, "pageLoad": ms})),
            )
            .await;
        session
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.base), body).await
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // chromedriver and every browser process it started share its process group.
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.pgid)])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.start_kill();
    }
}

fn chromium() -> String {
    std::env::var("WSGATE_CHROMIUM").unwrap_or_else(|_| CHROMIUM.into())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// One WebDriver command; a WebDriver error fails the test with its message.
async fn call(http: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> Value {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = http.request(method, url);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req
        .send()
        .await
        .unwrap_or_else(|e| panic!("webdriver {url}: {e}"));
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert!(
        status.is_success(),
        "webdriver {url}: {status} {}",
        body["value"]
    );
    body["value"].clone()
}

/// A browser session (one tab).
pub struct Session {
    base: String,
    http: reqwest::Client,
}

/// A reference to an element of the page.
pub struct Element(String);

impl Session {
    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.base), body).await
    }

    /// Loads `url` and returns once the document has loaded.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    /// The element matching the CSS `selector`.
    pub async fn find(&self, selector: &str) -> Element {
        let value = self
            .command(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": selector})),
            )
            .await;
        Element(
            value[ELEMENT]
                .as_str()
                .unwrap_or_else(|| panic!("no element {selector}: {value}"))
                .to_owned(),
        )
    }

    /// Types `text` into the element (appending to what it holds).
    pub async fn type_into(&self, selector: &str, text: &str) {
        let Element(id) = self.find(selector).await;
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Clicks the element.
    pub async fn click(&self, selector: &str) {
        let Element(id) = self.find(selector).await;
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its result.
    pub async fn execute(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// Waits until the text of an element matching `selector` matches the regular expression
    /// `pattern`, and returns that text. The page itself signals the change (a
    /// MutationObserver); nothing is polled. Panics after [`PAGE_DEADLINE`] with the page's text.
    pub async fn wait_for_text(&self, selector: &str, pattern: &str) -> String {
        const SCRIPT: &str = r"
            const [selector, pattern, done] = arguments;
            const re = new RegExp(pattern);
            const match = () => {
                for (const el of document.querySelectorAll(selector)) {
                    if (re.test(el.textContent)) return el.textContent;
                }
                return null;
            };
            const now = match();
            if (now !== null) return done(now);
            const observer = new MutationObserver(() => {
                const found = match();
                if (found !== null) { observer.disconnect(); done(found); }
            });
            observer.observe(document.documentElement,
                { subtree: true, childList: true, characterData: true, attributes: true });
        ";
        let url = format!("{}/execute/async", self.base);
        let resp = self
            .http
            .post(&url)
            .json(&json!({"script": SCRIPT, "args": [selector, pattern]}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("webdriver {url}: {e}"));
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if status.is_success()
            && let Some(text) = body["value"].as_str()
        {
            return text.to_owned();
        }
        let page = self
            .execute("return document.body.innerText;", json!([]))
            .await;
        panic!(
            "{selector} never matched /{pattern}/ ({status} {}); the page shows:\n{}",
            body["value"]["message"],
            page.as_str().unwrap_or_default()
        );
    }

    /// A PNG screenshot of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let value = self.command("GET", "/screenshot", None).await;
        let encoded = value.as_str().expect("screenshot is base64");
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("screenshot base64")
    }

    /// Ends the session and closes the browser.
    pub async fn quit(self) {
        self.command("DELETE", "", None).await;
    }
}
