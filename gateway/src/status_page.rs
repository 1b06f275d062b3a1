//! The built-in status page at `/`: one self-contained HTML page (inline CSS and JS, nothing
//! fetched from elsewhere) that shows this instance's `/api/stats` and has a try-it panel
//! joining topics over the WebSocket and publishing through `/api/publish`.
//!
//! The page is compiled into the binary. Its Content-Security-Policy allows exactly its own
//! inline script and style (by SHA-256 hash, so no injected script or inline handler runs) and
//! connections to this origin only; the page renders every received message as text.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};

/// The page source; `{{WS_PATH}}` is replaced with the configured WebSocket path.
const PAGE: &str = include_str!("../static/status.html");

/// The page, ready to serve.
struct StatusPage {
    html: Bytes,
    /// The policy up to `connect-src 'self'`; the request's own host is appended per request.
    csp: String,
}

/// The `/` route serving the status page; the page opens its WebSocket on `ws_path`.
pub fn router(ws_path: &str) -> Router {
    let page = StatusPage {
        html: Bytes::from(PAGE.replace("{{WS_PATH}}", &escape_attribute(ws_path))),
        csp: policy(PAGE),
    };
    Router::new()
        .route("/", get(serve))
        .with_state(Arc::new(page))
}

async fn serve(State(page): State<Arc<StatusPage>>, headers: HeaderMap) -> Response {
    // `connect-src 'self'` covers same-host ws:/wss: in CSP 3; older browsers need the
    // WebSocket origins spelled out, which only the request's Host header can tell.
    let mut csp = page.csp.clone();
    if let Some(host) = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| is_plain_authority(h))
    {
        csp.push_str(&format!(" ws://{host} wss://{host}"));
    }
    csp.push(';');
    let csp = HeaderValue::from_str(&csp)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CONTENT_SECURITY_POLICY, csp),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // Small and generated per binary: never worth a stale copy after an upgrade.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        page.html.clone(),
    )
        .into_response()
}

/// The Content-Security-Policy of `page` (without its final `connect-src` hosts): nothing by
/// default, the page's one inline script and one inline style by hash.
fn policy(page: &str) -> String {
    let script = inline(page, "script").map_or_else(|| "'none'".to_owned(), sha256_source);
    let style = inline(page, "style").map_or_else(|| "'none'".to_owned(), sha256_source);
    format!(
        "default-src 'none'; script-src {script}; style-src {style}; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'; connect-src 'self'"
    )
}

/// The text of the first `<tag>…</tag>` element of `page`.
fn inline<'a>(page: &'a str, tag: &str) -> Option<&'a str> {
    let (_, rest) = page.split_once(&format!("<{tag}>"))?;
    let (text, _) = rest.split_once(&format!("</{tag}>"))?;
    Some(text)
}

fn sha256_source(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "'sha256-{}'",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

/// A `host[:port]` made only of characters that cannot change the meaning of a policy.
fn is_plain_authority(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

fn escape_attribute(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_style_and_no_other_element_runs_code() {
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(inline(PAGE, "script").is_some_and(|s| s.contains("room.join")));
        assert!(inline(PAGE, "style").is_some_and(|s| s.contains("body")));
        // Message data reaches the DOM only as text.
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!PAGE.contains(sink), "the page uses {sink}");
        }
        // Inline handlers would be blocked by the policy anyway; keep them out of the markup.
        assert!(!PAGE.contains(" onclick="));
        assert!(PAGE.contains("{{WS_PATH}}"));
    }

    #[test]
    fn the_policy_allows_exactly_the_inline_hashes() {
        let csp = policy(PAGE);
        assert!(csp.starts_with("default-src 'none'; script-src 'sha256-"));
        assert!(csp.contains("style-src 'sha256-"));
        assert!(!csp.contains("unsafe"));
        assert_eq!(
            sha256_source("alert(1)"),
            "'sha256-bhHHL3z2vDgxUt0W3dWQOrprscmda2Y5pLsLg4GF+pI='"
        );
    }

    #[test]
    fn the_ws_path_is_escaped_into_the_page() {
        assert_eq!(
            escape_attribute(r#"/a"><script>&'"#),
            "/a&quot;&gt;&lt;script&gt;&amp;&#39;"
        );
        assert!(is_plain_authority("127.0.0.1:8080"));
        assert!(is_plain_authority("[::1]:80"));
        assert!(!is_plain_authority("a; script-src *"));
        assert!(!is_plain_authority(""));
    }
}
