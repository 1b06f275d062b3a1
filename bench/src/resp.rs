//! A minimal Redis client (RESP2, one command at a time) for the few inspection commands the
//! scenarios need: PING, PUBSUB CHANNELS, INFO memory. Not a general client.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Largest reply accepted (PUBSUB CHANNELS for 100k channels fits easily).
const MAX_BULK: usize = 256 << 20;
const MAX_ARRAY: usize = 10_000_000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Where a Redis is, and how to log in.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    pub addr: SocketAddr,
    pub user: Option<String>,
    pub password: Option<String>,
}

pub struct Client {
    stream: BufReader<TcpStream>,
}

impl Client {
    /// Connects and authenticates.
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses the credentials.
    pub async fn connect(target: &RedisTarget) -> Result<Self> {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(target.addr))
            .await
            .map_err(|_| anyhow!("redis at {}: connect timed out", target.addr))?
            .with_context(|| format!("redis at {}", target.addr))?;
        let mut client = Self {
            stream: BufReader::new(stream),
        };
        if let Some(pass) = &target.password {
            let mut args = vec!["AUTH"];
            if let Some(user) = &target.user {
                args.push(user);
            }
            args.push(pass);
            client.command(&args).await?;
        }
        Ok(client)
    }

    /// Sends one command and reads its reply; an error reply becomes an error.
    ///
    /// # Errors
    /// I/O errors, time-outs, malformed or error replies.
    pub async fn command(&mut self, args: &[&str]) -> Result<Reply> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let exchange = async {
            self.stream.get_mut().write_all(&out).await?;
            read_reply(&mut self.stream).await
        };
        let reply = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("redis: no reply to {} in time", args[0]))??;
        if let Reply::Error(e) = &reply {
            bail!("redis {}: {e}", args[0]);
        }
        Ok(reply)
    }

    /// Number of pub/sub channels matching `pattern` with at least one subscriber.
    ///
    /// # Errors
    /// As [`Client::command`].
    pub async fn channel_count(&mut self, pattern: &str) -> Result<u64> {
        match self.command(&["PUBSUB", "CHANNELS", pattern]).await? {
            Reply::Array(Some(items)) => Ok(items.len() as u64),
            Reply::Array(None) => Ok(0),
            other => bail!("redis PUBSUB CHANNELS: unexpected reply {other:?}"),
        }
    }

    /// Commands Redis has run since it started: every command, and `SUBSCRIBE` and
    /// `UNSUBSCRIBE` calls (from INFO stats and INFO commandstats).
    ///
    /// # Errors
    /// As [`Client::command`], or when the total is missing.
    pub async fn command_counts(&mut self) -> Result<CommandCounts> {
        let text = match self.command(&["INFO", "all"]).await? {
            Reply::Bulk(Some(text)) => String::from_utf8_lossy(&text).into_owned(),
            other => bail!("redis INFO: unexpected reply {other:?}"),
        };
        let calls = |command: &str| {
            let key = format!("cmdstat_{command}:calls=");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        Ok(CommandCounts {
            total: info_field(&text, "total_commands_processed")
                .ok_or_else(|| anyhow!("redis INFO: no total_commands_processed"))?,
            subscribe: calls("subscribe"),
            unsubscribe: calls("unsubscribe"),
            channels: info_field(&text, "pubsub_channels").unwrap_or(0),
        })
    }

    /// `used_memory` from INFO memory, in bytes.
    ///
    /// # Errors
    /// As [`Client::command`], or when the field is missing.
    pub async fn used_memory(&mut self) -> Result<u64> {
        match self.command(&["INFO", "memory"]).await? {
            Reply::Bulk(Some(text)) => info_field(&String::from_utf8_lossy(&text), "used_memory")
                .ok_or_else(|| anyhow!("redis INFO memory: no used_memory")),
            other => bail!("redis INFO: unexpected reply {other:?}"),
        }
    }
}

/// Redis's command counters at one moment (see [`Client::command_counts`]).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CommandCounts {
    pub total: u64,
    pub subscribe: u64,
    pub unsubscribe: u64,
    /// Channels with a subscriber (a gauge, not a counter).
    pub channels: u64,
}

impl CommandCounts {
    /// What happened between `self` (before) and `after`; `channels` is the change.
    pub fn until(&self, after: &CommandCounts) -> RedisCommands {
        RedisCommands {
            total: after.total.saturating_sub(self.total),
            subscribe: after.subscribe.saturating_sub(self.subscribe),
            unsubscribe: after.unsubscribe.saturating_sub(self.unsubscribe),
            channels_added: after.channels as i64 - self.channels as i64,
        }
    }
}

/// Redis commands run during a scenario (the bench's own INFO calls included: two).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct RedisCommands {
    pub total: u64,
    pub subscribe: u64,
    pub unsubscribe: u64,
    pub channels_added: i64,
}

fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.trim().parse().ok())
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(64 * 1024)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    if !line.ends_with(b"\r\n") {
        bail!("redis: malformed reply line");
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| anyhow!("redis: reply line is not UTF-8"))
}

/// Reads one reply; nested arrays are read iteratively up to a small depth.
pub async fn read_reply<R: AsyncBufRead + Unpin + Send>(r: &mut R) -> Result<Reply> {
    read_reply_depth(r, 0).await
}

fn read_reply_depth<'a, R: AsyncBufRead + Unpin + Send + 'a>(
    r: &'a mut R,
    depth: usize,
) -> std::pin::Pin<Box<dyn Future<Output = Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        if depth > 8 {
            bail!("redis: reply nested too deeply");
        }
        let line = read_line(r).await?;
        let (kind, rest) = line.split_at_checked(1).unwrap_or(("", ""));
        let int = || -> Result<i64> {
            rest.parse()
                .map_err(|_| anyhow!("redis: bad number in reply"))
        };
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(int()?),
            "$" => {
                let len = int()?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let len = usize::try_from(len)?;
                    if len > MAX_BULK {
                        bail!("redis: bulk reply too large");
                    }
                    let mut buf = vec![0; len + 2];
                    r.read_exact(&mut buf).await?;
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            }
            "*" => {
                let len = int()?;
                if len < 0 {
                    Reply::Array(None)
                } else {
                    let len = usize::try_from(len)?;
                    if len > MAX_ARRAY {
                        bail!("redis: array reply too large");
                    }
                    let mut items = Vec::with_capacity(len.min(4096));
                    for _ in 0..len {
                        items.push(read_reply_depth(r, depth + 1).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            _ => bail!("redis: unknown reply type"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(bytes: &[u8]) -> Result<Reply> {
        let mut r = BufReader::new(bytes);
        read_reply(&mut r).await
    }

    #[tokio::test]
    async fn replies_of_every_kind_are_parsed() {
        assert_eq!(
            parse(b"+PONG\r\n").await.ok(),
            Some(Reply::Simple("PONG".into()))
        );
        assert_eq!(parse(b":42\r\n").await.ok(), Some(Reply::Int(42)));
        assert_eq!(
            parse(b"$5\r\nhello\r\n").await.ok(),
            Some(Reply::Bulk(Some(b"hello".to_vec())))
        );
        assert_eq!(parse(b"$-1\r\n").await.ok(), Some(Reply::Bulk(None)));
        assert_eq!(
            parse(b"*2\r\n$4\r\nws:a\r\n$4\r\nws:b\r\n").await.ok(),
            Some(Reply::Array(Some(vec![
                Reply::Bulk(Some(b"ws:a".to_vec())),
                Reply::Bulk(Some(b"ws:b".to_vec()))
            ])))
        );
        assert_eq!(
            parse(b"-ERR nope\r\n").await.ok(),
            Some(Reply::Error("ERR nope".into()))
        );
    }

    #[tokio::test]
    async fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b""[..],
            b"?x\r\n",
            b":abc\r\n",
            b"$10\r\nshort\r\n",
            b"*1\r\n",
            b"+no crlf",
            b"\r\n",
        ] {
            assert!(parse(bad).await.is_err(), "{bad:?}");
        }
    }

    #[test]
    fn used_memory_is_read_from_info_text() {
        let info = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n";
        assert_eq!(info_field(info, "used_memory"), Some(1_048_576));
        assert_eq!(info_field(info, "used_memory_rss"), None);
    }
}
