//! Message history and recovery (DESIGN §9).
//!
//! Topics that match `--history-topics` keep their last `--history-size` messages for
//! `--history-ttl-secs`. Every message on such a topic has a [`Position`]: an **offset** that
//! increases by one per message, and the **epoch** of the history it belongs to (a new epoch
//! whenever the history was lost, so an offset is never reused with a different meaning).
//!
//! This module holds what both brokers share: the patterns, the settings, positions, the
//! recovery decision ([`Recovery::decide`]) and the in-process ring the memory broker keeps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::broker::Message;
use crate::types::{Channel, MAX_TOPIC_LEN, Topic};

/// Messages kept per topic by default.
pub const DEFAULT_SIZE: usize = 100;
/// Seconds a message is kept by default.
pub const DEFAULT_TTL_SECS: u64 = 300;
/// Most messages kept per topic.
pub const MAX_SIZE: usize = 100_000;
/// Longest epoch accepted anywhere (client `since`, Redis envelopes).
pub const MAX_EPOCH_LEN: usize = 64;
/// Most history patterns.
pub const MAX_PATTERNS: usize = 256;

/// Where a message sits in its topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// 1 for the first message of an epoch, then +1 per message.
    pub offset: u64,
    /// The history's identity: changes whenever the history was lost.
    pub epoch: Arc<str>,
}

impl Position {
    /// Whether `self` comes after `other` in the same history, or starts another one.
    pub fn is_after(&self, other: &Position) -> bool {
        self.epoch != other.epoch || self.offset > other.offset
    }
}

/// Whether `s` may be an epoch: 1-64 of `a-z A-Z 0-9 _ -` (safe inside JSON and Redis keys).
pub fn valid_epoch(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_EPOCH_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A fresh random epoch (16 hex digits).
pub fn new_epoch() -> Arc<str> {
    Arc::from(format!("{:016x}", rand::random::<u64>()))
}

/// Which topics keep a history: exact names, prefixes (`orders:*`) or everything (`*`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patterns {
    all: bool,
    exact: HashSet<String>,
    prefixes: Vec<String>,
}

impl Patterns {
    /// Parses a comma-separated list (spaces around items are ignored).
    ///
    /// # Errors
    /// A message naming the first bad pattern.
    pub fn parse(list: &str) -> Result<Self, String> {
        Self::from_items(list.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }

    /// Builds the patterns from separate items (a token's `topics` claim): each item is one
    /// pattern, never split.
    ///
    /// # Errors
    /// A message naming the first bad pattern.
    pub fn from_items<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut out = Self::default();
        for (count, item) in items.into_iter().enumerate() {
            if count >= MAX_PATTERNS {
                return Err(format!("at most {MAX_PATTERNS} patterns"));
            }
            let (stem, prefix) = match item.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (item, false),
            };
            if (stem.is_empty() && !prefix)
                || stem.len() > MAX_TOPIC_LEN
                || !stem
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'.' | b'-'))
            {
                let shown: String = item.chars().take(64).collect();
                return Err(format!(
                    "{shown:?}: a pattern is a topic name, optionally ending in *"
                ));
            }
            if !prefix {
                out.exact.insert(stem.to_owned());
            } else if stem.is_empty() {
                out.all = true;
            } else {
                out.prefixes.push(stem.to_owned());
            }
        }
        Ok(out)
    }

    /// Whether no topic matches.
    pub fn is_empty(&self) -> bool {
        !self.all && self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Whether `topic` keeps a history.
    pub fn matches(&self, topic: &str) -> bool {
        self.all || self.exact.contains(topic) || self.prefixes.iter().any(|p| topic.starts_with(p))
    }
}

/// History settings shared by both brokers.
#[derive(Debug, Clone)]
pub struct HistorySettings {
    /// Topics that keep a history.
    pub patterns: Patterns,
    /// Messages kept per topic.
    pub size: usize,
    /// How long a message is kept (and a Redis stream lives once idle).
    pub ttl: Duration,
}

impl HistorySettings {
    /// The topic of `channel` when it keeps a history (reserved channels never do).
    pub fn topic<'a>(&self, channel: &'a Channel) -> Option<&'a Topic> {
        match channel {
            Channel::Topic(t) if self.patterns.matches(t.as_str()) => Some(t),
            _ => None,
        }
    }
}

/// What a client asked to recover from: `"since":{"offset":N,"epoch":"E"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    /// The last offset the client received.
    pub offset: u64,
    /// The epoch that offset belongs to.
    pub epoch: String,
}

/// Why a recovery did not give the client what it missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryFailure {
    /// The history is not the one the client knew (lost, expired or replaced).
    EpochChanged,
    /// What the client missed is older than the history keeps.
    TooOld,
    /// The history could not be read (broker unavailable).
    Unavailable,
    /// The topic keeps no history.
    NoHistory,
}

impl RecoveryFailure {
    /// Every reason (label values).
    pub const ALL: [RecoveryFailure; 4] = [
        RecoveryFailure::EpochChanged,
        RecoveryFailure::TooOld,
        RecoveryFailure::Unavailable,
        RecoveryFailure::NoHistory,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            RecoveryFailure::EpochChanged => "epoch_changed",
            RecoveryFailure::TooOld => "too_old",
            RecoveryFailure::Unavailable => "unavailable",
            RecoveryFailure::NoHistory => "no_history",
        }
    }
}

/// A topic's history as read at one instant: where it stands and the messages after a point.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The newest position (`None`: nothing was ever published, or the history is gone).
    pub top: Option<Position>,
    /// Messages in offset order, all of `top`'s epoch; may start anywhere (trimmed histories).
    pub entries: Vec<(u64, Message)>,
}

/// The answer to a join with `since`.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// The history's newest position when it was read (reported in the `room.joined` ack).
    pub top: Option<Position>,
    /// The messages the client missed, in order (empty unless recovered).
    pub entries: Vec<(Position, Message)>,
    /// `Ok`: everything missed is in `entries`. `Err`: why not (or `None` inside when the
    /// client gave no position to recover from).
    pub outcome: Result<(), Option<RecoveryFailure>>,
}

impl Recovery {
    /// A recovery that could not read the history.
    pub fn failed(why: RecoveryFailure) -> Self {
        Self {
            top: None,
            entries: Vec::new(),
            outcome: Err(Some(why)),
        }
    }

    /// Decides what a client positioned at `since` gets from `snapshot`.
    pub fn decide(since: Option<&Since>, snapshot: Snapshot) -> Self {
        let Snapshot { top, entries } = snapshot;
        let Some(since) = since else {
            return Self {
                top,
                entries: Vec::new(),
                outcome: Err(None),
            };
        };
        let fail = |top, why| Self {
            top,
            entries: Vec::new(),
            outcome: Err(Some(why)),
        };
        let Some(t) = &top else {
            return fail(top, RecoveryFailure::EpochChanged);
        };
        if *t.epoch != *since.epoch || since.offset > t.offset {
            return fail(top, RecoveryFailure::EpochChanged);
        }
        let missed: Vec<(Position, Message)> = entries
            .into_iter()
            .filter(|(o, _)| *o > since.offset && *o <= t.offset)
            .map(|(offset, m)| {
                (
                    Position {
                        offset,
                        epoch: t.epoch.clone(),
                    },
                    m,
                )
            })
            .collect();
        let wanted = t.offset - since.offset;
        let contiguous = missed
            .iter()
            .enumerate()
            .all(|(i, (p, _))| p.offset == since.offset + 1 + i as u64);
        if missed.len() as u64 != wanted || !contiguous {
            return fail(top, RecoveryFailure::TooOld);
        }
        Self {
            top,
            entries: missed,
            outcome: Ok(()),
        }
    }
}

/// One topic's in-process ring.
struct Ring {
    epoch: Arc<str>,
    /// The newest offset (0: nothing yet).
    last: u64,
    entries: VecDeque<(u64, Instant, Message)>,
    bytes: usize,
    touched: Instant,
}

/// The memory broker's history: a ring per topic, trimmed by length and age, dropped when
/// idle for the TTL (its next message starts a new epoch).
pub struct MemoryHistory {
    settings: HistorySettings,
    rings: Mutex<HashMap<Topic, Arc<Mutex<Ring>>>>,
    /// Milliseconds since `started` at the last sweep of idle rings.
    swept_ms: AtomicU64,
    started: Instant,
    bytes: AtomicI64,
}

/// Overhead counted per kept message besides its payload.
const ENTRY_OVERHEAD: usize = 48;

impl MemoryHistory {
    /// An empty history.
    pub fn new(settings: HistorySettings) -> Self {
        Self {
            settings,
            rings: Mutex::default(),
            swept_ms: AtomicU64::new(0),
            started: Instant::now(),
            bytes: AtomicI64::new(0),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> &HistorySettings {
        &self.settings
    }

    /// Bytes held (payloads plus a fixed overhead per message).
    pub fn bytes(&self) -> i64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn ring(&self, topic: &Topic, create: bool) -> Option<Arc<Mutex<Ring>>> {
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = rings.get(topic) {
            return Some(r.clone());
        }
        if !create {
            return None;
        }
        let ring = Arc::new(Mutex::new(Ring {
            epoch: new_epoch(),
            last: 0,
            entries: VecDeque::new(),
            bytes: 0,
            touched: Instant::now(),
        }));
        rings.insert(topic.clone(), ring.clone());
        Some(ring)
    }

    fn trim(&self, ring: &mut Ring, now: Instant) {
        let ttl = self.settings.ttl;
        while let Some((_, at, m)) = ring.entries.front() {
            if ring.entries.len() > self.settings.size || now.duration_since(*at) >= ttl {
                let freed = m.len() + ENTRY_OVERHEAD;
                ring.bytes -= freed;
                self.bytes.fetch_sub(freed as i64, Ordering::Relaxed);
                ring.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Appends `message` to `topic`'s history and, while the ring is still locked (so that
    /// deliveries happen in offset order), hands it to `deliver` with its position.
    pub fn append(
        &self,
        topic: &Topic,
        message: Message,
        deliver: impl FnOnce(Message, &Position),
    ) {
        self.sweep();
        let Some(ring) = self.ring(topic, true) else {
            return;
        };
        let mut r = ring.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        r.last += 1;
        r.touched = now;
        let size = message.len() + ENTRY_OVERHEAD;
        r.bytes += size;
        self.bytes.fetch_add(size as i64, Ordering::Relaxed);
        let offset = r.last;
        r.entries.push_back((offset, now, message.clone()));
        self.trim(&mut r, now);
        let position = Position {
            offset,
            epoch: r.epoch.clone(),
        };
        deliver(message, &position);
    }

    /// `topic`'s history: its newest position and every message kept.
    pub fn snapshot(&self, topic: &Topic) -> Snapshot {
        let Some(ring) = self.ring(topic, false) else {
            return Snapshot::default();
        };
        let mut r = ring.lock().unwrap_or_else(PoisonError::into_inner);
        self.trim(&mut r, Instant::now());
        Snapshot {
            top: (r.last > 0).then(|| Position {
                offset: r.last,
                epoch: r.epoch.clone(),
            }),
            entries: r.entries.iter().map(|(o, _, m)| (*o, m.clone())).collect(),
        }
    }

    /// Drops rings idle for the TTL, at most once a second.
    fn sweep(&self) {
        let now_ms = self.started.elapsed().as_millis() as u64;
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < 1000
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let now = Instant::now();
        let ttl = self.settings.ttl;
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        rings.retain(|_, ring| {
            // Only the map holds it (clones are made under the map's lock): nobody is
            // appending to or reading it.
            if Arc::strong_count(ring) > 1 {
                return true;
            }
            let r = ring.lock().unwrap_or_else(PoisonError::into_inner);
            let idle = now.duration_since(r.touched) >= ttl;
            if idle {
                self.bytes.fetch_sub(r.bytes as i64, Ordering::Relaxed);
            }
            !idle
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn text(s: &str) -> Message {
        Message::Text(Bytes::from(s.to_owned()))
    }

    fn settings(patterns: &str, size: usize, ttl: Duration) -> HistorySettings {
        HistorySettings {
            patterns: Patterns::parse(patterns).unwrap(),
            size,
            ttl,
        }
    }

    #[test]
    fn patterns_match_exact_names_prefixes_and_everything() {
        let p = Patterns::parse(" news, orders:* ,").unwrap();
        assert!(p.matches("news"));
        assert!(!p.matches("news2"));
        assert!(p.matches("orders:1"));
        assert!(p.matches("orders:"));
        assert!(!p.matches("order"));
        assert!(Patterns::parse("*").unwrap().matches("anything"));
        assert!(Patterns::parse("").unwrap().is_empty());
        for bad in ["a b", "a*b", "**", "x/y", "é"] {
            assert!(Patterns::parse(bad).is_err(), "{bad}");
        }
        let many = vec!["t"; MAX_PATTERNS + 1].join(",");
        assert!(Patterns::parse(&many).is_err());
        let s = settings("news", 1, Duration::from_secs(1));
        assert!(s.topic(&Channel::Broadcast).is_none());
        assert!(
            s.topic(&Channel::Topic(Topic::new("news").unwrap()))
                .is_some()
        );
    }

    #[test]
    fn epochs_are_short_safe_tokens() {
        assert!(valid_epoch(&new_epoch()));
        assert!(valid_epoch("a-B_9"));
        for bad in ["", "a\"b", "a b", &"x".repeat(65), "é"] {
            assert!(!valid_epoch(bad), "{bad}");
        }
    }

    fn snapshot(epoch: &str, top: u64, from: u64) -> Snapshot {
        Snapshot {
            top: Some(Position {
                offset: top,
                epoch: Arc::from(epoch),
            }),
            entries: (from..=top).map(|o| (o, text(&o.to_string()))).collect(),
        }
    }

    fn since(offset: u64, epoch: &str) -> Since {
        Since {
            offset,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn recovery_gives_exactly_what_was_missed_or_says_why_not() {
        let r = Recovery::decide(Some(&since(7, "e")), snapshot("e", 10, 3));
        assert_eq!(r.outcome, Ok(()));
        let offsets: Vec<u64> = r.entries.iter().map(|(p, _)| p.offset).collect();
        assert_eq!(offsets, [8, 9, 10]);
        // Caught up: nothing missed.
        let r = Recovery::decide(Some(&since(10, "e")), snapshot("e", 10, 3));
        assert_eq!((r.outcome, r.entries.len()), (Ok(()), 0));
        // Older than what is kept.
        let r = Recovery::decide(Some(&since(1, "e")), snapshot("e", 10, 3));
        assert_eq!(r.outcome, Err(Some(RecoveryFailure::TooOld)));
        assert!(r.entries.is_empty());
        // Another history, or a position it never had.
        for s in [since(7, "f"), since(11, "e")] {
            let r = Recovery::decide(Some(&s), snapshot("e", 10, 3));
            assert_eq!(r.outcome, Err(Some(RecoveryFailure::EpochChanged)));
        }
        let r = Recovery::decide(Some(&since(7, "e")), Snapshot::default());
        assert_eq!(r.outcome, Err(Some(RecoveryFailure::EpochChanged)));
        // No position given: nothing to recover, the current position reported.
        let r = Recovery::decide(None, snapshot("e", 10, 3));
        assert_eq!(r.outcome, Err(None));
        assert_eq!(r.top.unwrap().offset, 10);
        // A hole in the middle is not a recovery.
        let mut s = snapshot("e", 10, 3);
        s.entries.retain(|(o, _)| *o != 9);
        let r = Recovery::decide(Some(&since(7, "e")), s);
        assert_eq!(r.outcome, Err(Some(RecoveryFailure::TooOld)));
    }

    #[test]
    fn the_memory_ring_keeps_the_newest_messages_in_order() {
        let h = MemoryHistory::new(settings("*", 3, Duration::from_secs(60)));
        let t = Topic::new("t").unwrap();
        let mut delivered = Vec::new();
        for i in 1..=5 {
            h.append(&t, text(&i.to_string()), |_, p| delivered.push(p.offset));
        }
        assert_eq!(delivered, [1, 2, 3, 4, 5]);
        let s = h.snapshot(&t);
        assert_eq!(s.top.as_ref().unwrap().offset, 5);
        let kept: Vec<u64> = s.entries.iter().map(|(o, _)| *o).collect();
        assert_eq!(kept, [3, 4, 5]);
        assert_eq!(h.bytes(), 3 * (1 + ENTRY_OVERHEAD as i64));
        assert!(h.snapshot(&Topic::new("other").unwrap()).top.is_none());
    }

    #[test]
    fn the_memory_ring_forgets_messages_older_than_the_ttl() {
        let h = MemoryHistory::new(settings("*", 10, Duration::ZERO));
        let t = Topic::new("t").unwrap();
        h.append(&t, text("a"), |_, _| {});
        let s = h.snapshot(&t);
        assert_eq!(s.top.unwrap().offset, 1);
        assert!(s.entries.is_empty());
        assert_eq!(h.bytes(), 0);
    }
}
