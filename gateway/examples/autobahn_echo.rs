//! An echo server on the gateway's own WebSocket layer, for the Autobahn|Testsuite
//! (`scripts/autobahn`, `make conformance`).
//!
//! ```sh
//! cargo run --release -p wsgate --example autobahn_echo -- 127.0.0.1:9001
//! ```
//!
//! Every text and binary message sent to `ws://127.0.0.1:9001/` comes back unchanged, read by
//! the gateway's frame reader and written through the connection's outbox and writer — the
//! same code that serves production clients, with wsgate's client protocol swapped for an echo
//! ([`wsgate::MessageHandler`]). The limits are raised for the suite's largest cases (16 MiB
//! messages, thousands of messages a second). It listens on loopback only.

use std::net::SocketAddr;

use wsgate::{Config, Connection, Gateway, Message, MessageHandler};

/// Autobahn's largest case (9.1.6, 9.2.6) sends 16 MiB; leave room above it.
const MAX_MESSAGE: usize = 20 * 1024 * 1024;

struct Echo;

impl MessageHandler for Echo {
    fn on_message(&self, conn: &Connection<'_>, message: Message) {
        conn.send(message);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse()?,
        None => anyhow::bail!("usage: autobahn_echo 127.0.0.1:PORT"),
    };
    anyhow::ensure!(
        addr.ip().is_loopback(),
        "autobahn_echo listens on loopback only, not {addr}"
    );
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("WSGATE_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let max = MAX_MESSAGE.to_string();
    let config = Config::parse_args([
        "autobahn_echo",
        "--listen",
        &addr.to_string(),
        "--ws-path",
        "/",
        "--max-frame-bytes",
        &max,
        "--max-message-bytes",
        &max,
        // An echo of the largest message, plus everything the suite may have queued behind it.
        "--outbound-queue-bytes",
        &(4 * MAX_MESSAGE).to_string(),
        "--outbound-queue-messages",
        "100000",
        "--max-inbound-rate",
        "0",
        "--idle-timeout-secs",
        "0",
        "--drain-timeout-secs",
        "1",
    ])?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let gateway = Gateway::start(config).await?.with_message_handler(Echo);
    eprintln!("autobahn_echo: echoing at ws://{addr}/");
    wsgate::serve_gateway(gateway, listener, None, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
