//! The Redis wire envelope, byte-compatible with `@orijs/websocket-redis`:
//! `{"topic":"<topic>","message":"<text or base64>","isBinary":<bool>}`.
//!
//! Messages on history topics carry two more fields, `"offset":<n>` and `"epoch":"<e>"` (their
//! [`Position`]); the seed ignores fields it does not know, so it still delivers them.
//!
//! Parsing is strict and typed. Anything else — not JSON, wrong types, missing or duplicate
//! fields, prototype-pollution keys, bad base64, a topic that breaks the rules or does not match
//! the channel — is rejected with a reason, never a panic.

use std::fmt;

use base64::Engine;
use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::Message;
use crate::history::{Position, valid_epoch};
use crate::types::{SOCKET_TOPIC_PREFIX, SocketId};

/// Why a payload was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("envelope topic {0:?} does not match its channel")]
    TopicMismatch(String),
    #[error("message is not valid base64")]
    BadBase64,
    #[error("control message on a channel other than a socket's")]
    MisplacedControl,
    #[error("offset and epoch must come together, as a positive integer and a short token")]
    BadPosition,
}

/// A decoded envelope.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope {
    pub topic: String,
    pub message: Message,
    /// Where the message sits in its topic's history (history topics only).
    pub position: Option<Position>,
}

#[derive(Serialize)]
struct Outgoing<'a> {
    topic: &'a str,
    message: &'a str,
    #[serde(rename = "isBinary")]
    is_binary: bool,
    #[serde(rename = "wsgateControl", skip_serializing_if = "Option::is_none")]
    control: Option<&'a str>,
}

/// Encodes `message` for `topic` (the seed's topic name: `t`, `__socket__:<id>`, `__broadcast__`).
pub fn encode(topic: &str, message: &Message) -> Vec<u8> {
    let (text, is_binary, control);
    let b64;
    match message {
        Message::Text(b) => {
            // Text messages are UTF-8 by construction; a lossy view never changes valid input.
            text = String::from_utf8_lossy(b);
            is_binary = false;
            control = None;
        }
        Message::Binary(b) => {
            b64 = base64::engine::general_purpose::STANDARD.encode(b);
            text = std::borrow::Cow::Borrowed(b64.as_str());
            is_binary = true;
            control = None;
        }
        Message::Disconnect => {
            text = std::borrow::Cow::Borrowed("");
            is_binary = false;
            control = Some("disconnect");
        }
    }
    let out = Outgoing {
        topic,
        message: &text,
        is_binary,
        control,
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// The envelope of [`encode`] without its closing brace, for the history script to append
/// `,"offset":<n>,"epoch":"<e>"}` once it knows them.
pub fn encode_head(topic: &str, message: &Message) -> Vec<u8> {
    let mut out = encode(topic, message);
    if out.last() == Some(&b'}') {
        out.pop();
    }
    out
}

struct Raw {
    topic: String,
    message: String,
    is_binary: bool,
    control: Option<String>,
    offset: Option<u64>,
    epoch: Option<String>,
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Raw;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object with topic, message and isBinary")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
                let (mut topic, mut message, mut is_binary, mut control) = (None, None, None, None);
                let (mut offset, mut epoch) = (None, None);
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match key.as_ref() {
                        "topic" if topic.is_none() => topic = Some(map.next_value::<String>()?),
                        "message" if message.is_none() => {
                            message = Some(map.next_value::<String>()?)
                        }
                        "isBinary" if is_binary.is_none() => {
                            is_binary = Some(map.next_value::<bool>()?)
                        }
                        "wsgateControl" if control.is_none() => {
                            control = Some(map.next_value::<String>()?)
                        }
                        "offset" if offset.is_none() => offset = Some(map.next_value::<u64>()?),
                        "epoch" if epoch.is_none() => epoch = Some(map.next_value::<String>()?),
                        "topic" | "message" | "isBinary" | "wsgateControl" | "offset" | "epoch" => {
                            return Err(de::Error::custom(format!("duplicate field {key}")));
                        }
                        "__proto__" | "constructor" | "prototype" => {
                            return Err(de::Error::custom(format!("forbidden key {key}")));
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Raw {
                    topic: topic.ok_or_else(|| de::Error::missing_field("topic"))?,
                    message: message.ok_or_else(|| de::Error::missing_field("message"))?,
                    is_binary: is_binary.ok_or_else(|| de::Error::missing_field("isBinary"))?,
                    control,
                    offset,
                    epoch,
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// Decodes a payload received on the channel whose seed topic name is `channel_topic`.
///
/// # Errors
/// [`Rejection`] saying why the payload is unacceptable.
pub fn decode(channel_topic: &str, payload: &[u8], max_len: usize) -> Result<Envelope, Rejection> {
    decode_for(payload, max_len, |topic| topic == channel_topic)
}

/// Decodes a payload received on a replica's direct channel (`__direct__:<tag>`): a message
/// for one of its connections, whose envelope topic is that connection's `__socket__:<id>`,
/// an id carrying the channel's `tag`.
///
/// # Errors
/// [`Rejection`] saying why the payload is unacceptable.
pub fn decode_direct(
    tag: u32,
    payload: &[u8],
    max_len: usize,
) -> Result<(SocketId, Envelope), Rejection> {
    let mut id = None;
    let envelope = decode_for(payload, max_len, |topic| {
        id = topic
            .strip_prefix(SOCKET_TOPIC_PREFIX)
            .and_then(|s| SocketId::parse(s).ok())
            .filter(|s| s.tag() == tag);
        id.is_some()
    })?;
    match id {
        Some(id) => Ok((id, envelope)),
        None => Err(Rejection::TopicMismatch(String::new())),
    }
}

fn decode_for(
    payload: &[u8],
    max_len: usize,
    topic_fits: impl FnOnce(&str) -> bool,
) -> Result<Envelope, Rejection> {
    if payload.len() > max_len {
        return Err(Rejection::TooLarge(payload.len()));
    }
    let raw: Raw =
        serde_json::from_slice(payload).map_err(|e| Rejection::Malformed(e.to_string()))?;
    if !topic_fits(&raw.topic) {
        return Err(Rejection::TopicMismatch(
            raw.topic.chars().take(64).collect(),
        ));
    }
    let position = match (raw.offset, raw.epoch) {
        (None, None) => None,
        (Some(offset), Some(epoch)) if offset > 0 && valid_epoch(&epoch) => Some(Position {
            offset,
            epoch: epoch.into(),
        }),
        _ => return Err(Rejection::BadPosition),
    };
    let message = match (raw.control.as_deref(), raw.is_binary) {
        (Some("disconnect"), _) => {
            if !raw.topic.starts_with(SOCKET_TOPIC_PREFIX)
                && !raw.topic.starts_with(crate::types::USER_TOPIC_PREFIX)
            {
                return Err(Rejection::MisplacedControl);
            }
            Message::Disconnect
        }
        (Some(other), _) => return Err(Rejection::Malformed(format!("unknown control {other:?}"))),
        (None, true) => Message::Binary(Bytes::from(
            base64::engine::general_purpose::STANDARD
                .decode(raw.message.as_bytes())
                .map_err(|_| Rejection::BadBase64)?,
        )),
        (None, false) => Message::Text(Bytes::from(raw.message)),
    };
    if position.is_some() && message == Message::Disconnect {
        return Err(Rejection::BadPosition);
    }
    Ok(Envelope {
        topic: raw.topic,
        message,
        position,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_round_trip_in_the_seed_format() {
        let t = encode(
            "news",
            &Message::Text(Bytes::from_static("hé \"x\"".as_bytes())),
        );
        assert_eq!(
            std::str::from_utf8(&t).unwrap(),
            r#"{"topic":"news","message":"hé \"x\"","isBinary":false}"#
        );
        assert_eq!(
            decode("news", &t, 1 << 20).unwrap().message,
            Message::Text(Bytes::from_static("hé \"x\"".as_bytes()))
        );
        let b = encode("news", &Message::Binary(Bytes::from_static(&[0, 255, 1])));
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"topic":"news","message":"AP8B","isBinary":true}"#
        );
        assert_eq!(
            decode("news", &b, 1 << 20).unwrap().message,
            Message::Binary(Bytes::from_static(&[0, 255, 1]))
        );
    }

    #[test]
    fn disconnect_travels_only_on_socket_channels() {
        let ch = "__socket__:3f2b6f8e-2a53-4a7c-9a8e-1b2c3d4e5f60";
        let d = encode(ch, &Message::Disconnect);
        assert_eq!(decode(ch, &d, 1024).unwrap().message, Message::Disconnect);
        let d = encode("news", &Message::Disconnect);
        assert_eq!(decode("news", &d, 1024), Err(Rejection::MisplacedControl));
    }

    #[test]
    fn a_direct_channel_takes_messages_for_its_own_sockets_only() {
        let id = "3f2b6f8e-2a53-4a7c-9a8e-1b2c3d4e5f60";
        let ch = format!("__socket__:{id}");
        let text = encode(&ch, &Message::Text(Bytes::from_static(b"hi")));
        let (to, e) = decode_direct(0x3f2b_6f8e, &text, 1024).unwrap();
        assert_eq!(to.to_string(), id);
        assert_eq!(e.message, Message::Text(Bytes::from_static(b"hi")));
        let (_, e) = decode_direct(0x3f2b_6f8e, &encode(&ch, &Message::Disconnect), 1024).unwrap();
        assert_eq!(e.message, Message::Disconnect);
        // Another replica's socket, a topic, broadcast, a bad id: all refused.
        assert!(matches!(
            decode_direct(0x3f2b_6f8f, &text, 1024),
            Err(Rejection::TopicMismatch(_))
        ));
        for topic in [
            "news",
            "__broadcast__",
            "__socket__:3f2b6f8e",
            "__socket__:3f2b6f8e-2a53-1a7c-9a8e-1b2c3d4e5f60",
        ] {
            let p = encode(topic, &Message::Text(Bytes::from_static(b"x")));
            assert!(
                matches!(
                    decode_direct(0x3f2b_6f8e, &p, 1024),
                    Err(Rejection::TopicMismatch(_))
                ),
                "{topic}"
            );
        }
        assert!(matches!(
            decode_direct(0x3f2b_6f8e, &text, 10),
            Err(Rejection::TooLarge(_))
        ));
    }

    #[test]
    fn unknown_fields_from_newer_peers_are_ignored() {
        let p = br#"{"topic":"t","message":"m","isBinary":false,"instanceId":"abc","meta":{"a":[1,2]}}"#;
        assert_eq!(
            decode("t", p, 1024).unwrap().message,
            Message::Text(Bytes::from_static(b"m"))
        );
    }

    #[test]
    fn positions_ride_along_as_two_extra_fields() {
        let mut head = encode_head("news", &Message::Text(Bytes::from_static(b"m")));
        head.extend_from_slice(br#","offset":42,"epoch":"e-1"}"#);
        let e = decode("news", &head, 1024).unwrap();
        assert_eq!(e.message, Message::Text(Bytes::from_static(b"m")));
        let p = e.position.unwrap();
        assert_eq!((p.offset, &*p.epoch), (42, "e-1"));
        // What the seed requires still holds: topic and message strings, isBinary a boolean.
        let v: serde_json::Value = serde_json::from_slice(&head).unwrap();
        assert!(v["topic"].is_string() && v["message"].is_string() && v["isBinary"].is_boolean());
        for bad in [
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":0,"epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":-1,"epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1.5,"epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":"1","epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1,"epoch":"a\"b"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1,"epoch":""}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1,"epoch":7}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":1,"offset":2,"epoch":"e"}"#,
            r#"{"topic":"t","message":"m","isBinary":false,"offset":99999999999999999999,"epoch":"e"}"#,
        ] {
            assert!(decode("t", bad.as_bytes(), 1024).is_err(), "accepted {bad}");
        }
        let long = format!(
            r#"{{"topic":"t","message":"m","isBinary":false,"offset":1,"epoch":"{}"}}"#,
            "e".repeat(65)
        );
        assert_eq!(
            decode("t", long.as_bytes(), 1024),
            Err(Rejection::BadPosition)
        );
    }

    #[test]
    fn hostile_and_malformed_payloads_are_rejected() {
        let deep = format!(
            r#"{{"topic":"t","message":{}"x"{},"isBinary":false}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        let cases: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"".to_vec(),
            b"[]".to_vec(),
            b"null".to_vec(),
            br#"{"topic":"t","message":"m"}"#.to_vec(),
            br#"{"topic":"t","isBinary":false}"#.to_vec(),
            br#"{"topic":"t","message":5,"isBinary":false}"#.to_vec(),
            br#"{"topic":"t","message":"m","isBinary":"yes"}"#.to_vec(),
            br#"{"topic":["t"],"message":"m","isBinary":false}"#.to_vec(),
            br#"{"topic":"t","message":"m","isBinary":false,"__proto__":{"polluted":1}}"#.to_vec(),
            br#"{"topic":"t","message":"m","isBinary":false,"constructor":{}}"#.to_vec(),
            br#"{"topic":"t","message":"m","message":"again","isBinary":false}"#.to_vec(),
            br#"{"topic":"other","message":"m","isBinary":false}"#.to_vec(),
            br#"{"topic":"t","message":"***","isBinary":true}"#.to_vec(),
            br#"{"topic":"t","message":"m","isBinary":false,"wsgateControl":"explode"}"#.to_vec(),
            deep.into_bytes(),
            vec![b'{'; 100_000],
            [
                br#"{"topic":"t","message":""#.as_slice(),
                &[0xFF, 0xFE],
                br#"","isBinary":false}"#,
            ]
            .concat(),
        ];
        for p in cases {
            assert!(
                decode("t", &p, 1 << 20).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(&p[..p.len().min(80)])
            );
        }
        let huge = vec![b' '; 2000];
        assert_eq!(decode("t", &huge, 1000), Err(Rejection::TooLarge(2000)));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_payloads_are_rejected_or_decoded_never_a_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = decode("t", &data, 1024);
        }

        #[test]
        fn every_message_round_trips(text in ".{0,200}", bin in proptest::collection::vec(any::<u8>(), 0..200)) {
            let t = Message::Text(Bytes::from(text.clone()));
            prop_assert_eq!(decode("t", &encode("t", &t), 1 << 20).map(|e| e.message), Ok(t));
            let b = Message::Binary(Bytes::from(bin));
            prop_assert_eq!(decode("t", &encode("t", &b), 1 << 20).map(|e| e.message), Ok(b));
        }
    }
}
