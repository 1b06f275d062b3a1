//! An in-test TCP proxy on loopback: sits between a gateway and Redis and records what the
//! gateway sends, so a test can wait until a command is on its way; it can also hold the
//! server's replies back (a slow server) or cut the link (a network partition).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::DEADLINE;

/// Forwards every connection to `127.0.0.1:<target>`; aborts everything on drop.
pub struct TcpProxy {
    addr: SocketAddr,
    sent: Arc<Mutex<Vec<u8>>>,
    /// While true, nothing from the server reaches the clients (it waits in the proxy).
    hold: tokio::sync::watch::Sender<bool>,
    /// While true, connections are refused (accepted and closed at once).
    cut: Arc<std::sync::atomic::AtomicBool>,
    accept: JoinHandle<()>,
    links: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    /// Starts a proxy on a free loopback port.
    pub async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let links: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let hold = tokio::sync::watch::Sender::new(false);
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept = tokio::spawn({
            let sent = sent.clone();
            let links = links.clone();
            let hold = hold.clone();
            let cut = cut.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                        continue;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let sent = sent.clone();
                    let up = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            sent.lock().unwrap().extend_from_slice(&buf[..n]);
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = sw.shutdown().await;
                    });
                    let mut held = hold.subscribe();
                    let down = tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if held.wait_for(|h| !*h).await.is_err()
                                || cw.write_all(&buf[..n]).await.is_err()
                            {
                                break;
                            }
                        }
                        let _ = cw.shutdown().await;
                    });
                    links.lock().unwrap().extend([up, down]);
                }
            }
        });
        Self {
            addr,
            sent,
            hold,
            cut,
            accept,
            links,
        }
    }

    /// Cuts the link: every proxied connection is closed, and new ones are refused until
    /// [`restore`](Self::restore). To the gateway, Redis is unreachable.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    /// Accepts connections again after [`cut`](Self::cut).
    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Holds back everything the server sends (on every connection, new ones too) until
    /// [`release`](Self::release): to the clients the server looks slow.
    pub fn hold(&self) {
        self.hold.send_replace(true);
    }

    /// Lets the server's replies through again.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Waits until the proxied clients have sent `needle` (anywhere in their byte stream).
    pub async fn wait_sent(&self, needle: &[u8]) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if self
                .sent
                .lock()
                .unwrap()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} never sent through the proxy",
                String::from_utf8_lossy(needle)
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }
}
