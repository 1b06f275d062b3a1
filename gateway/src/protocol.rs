//! The client protocol: commands a connection may send and the envelopes the gateway sends.
//!
//! Compatible with the seed's browser client: `2`/`3` pings, `room.join` / `room.leave` /
//! `heartbeat` commands, and `{"name","data","timestamp"}` envelopes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::ClientError;
use crate::frame;
use crate::types::{InvalidName, SocketId, Topic};

/// The text frame a client sends as an application-level ping.
pub const PING: &[u8] = b"2";
/// The text frame the gateway answers a ping with.
pub const PONG: &[u8] = b"3";

/// An acknowledgement id a client may attach to `room.join` / `room.leave`: kept verbatim
/// (a JSON string or number) and echoed back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckId(Box<str>);

impl AckId {
    /// The id as JSON text.
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// A parsed client command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    /// `2`.
    Ping,
    /// `{"type":"room.join","room":..}`.
    Join { topic: Topic, id: Option<AckId> },
    /// `{"type":"room.leave","room":..}`.
    Leave { topic: Topic, id: Option<AckId> },
    /// `{"type":"heartbeat"}`.
    Heartbeat,
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

/// A command that could not be accepted, with the ack id when one could be read.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    pub error: ClientError,
    pub id: Option<AckId>,
}

/// Parses one text message from a client.
///
/// # Errors
/// [`Rejected`] naming what is wrong; the connection stays open.
pub fn parse_command(text: &[u8]) -> Result<Command, Rejected> {
    if text == PING {
        return Ok(Command::Ping);
    }
    let reject = |error, id| Rejected { error, id };
    let raw: RawCommand<'_> = match serde_json::from_slice(text) {
        Ok(raw) => raw,
        Err(e) if e.is_data() => return Err(reject(ClientError::InvalidMessage, None)),
        Err(_) => return Err(reject(ClientError::InvalidJson, None)),
    };
    let id = match raw.id {
        None => None,
        Some(v) => {
            let s = v.get();
            let ok = serde_json::from_str::<String>(s).is_ok()
                || serde_json::from_str::<serde_json::Number>(s).is_ok();
            if !ok {
                return Err(reject(ClientError::InvalidId, None));
            }
            Some(AckId(s.into()))
        }
    };
    let Some(kind) = raw
        .kind
        .and_then(|k| serde_json::from_str::<&str>(k.get()).ok())
    else {
        return Err(reject(ClientError::InvalidMessage, id));
    };
    match kind {
        "heartbeat" => Ok(Command::Heartbeat),
        "room.join" | "room.leave" => {
            let Some(room) = raw.room else {
                return Err(reject(ClientError::MissingRoom, id));
            };
            let Ok(room) = serde_json::from_str::<String>(room.get()) else {
                return Err(reject(
                    ClientError::InvalidTopic(InvalidName::BadCharacter),
                    id,
                ));
            };
            let topic = match Topic::new(&room) {
                Ok(t) => t,
                Err(InvalidName::Reserved) => return Err(reject(ClientError::ReservedTopic, id)),
                Err(e) => return Err(reject(ClientError::InvalidTopic(e), id)),
            };
            Ok(if kind == "room.join" {
                Command::Join { topic, id }
            } else {
                Command::Leave { topic, id }
            })
        }
        _ => Err(reject(ClientError::UnknownType, id)),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn json_string(s: &str) -> String {
    // Serialising a &str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned())
}

/// `{"name":<name>,"data":<data json>,"timestamp":<ms>}` as an encoded text frame.
pub fn envelope_frame(name: &str, data_json: &str) -> Bytes {
    frame::text(envelope(name, data_json).as_bytes())
}

/// `{"name":<name>,"data":<data json>,"timestamp":<ms>}`.
pub fn envelope(name: &str, data_json: &str) -> String {
    format!(
        "{{\"name\":{},\"data\":{},\"timestamp\":{}}}",
        json_string(name),
        data_json,
        now_ms()
    )
}

/// The `session` envelope sent when a connection opens.
pub fn session_frame(id: SocketId) -> Bytes {
    envelope_frame("session", &format!("{{\"socketId\":\"{id}\"}}"))
}

/// The `room.joined` / `room.left` acknowledgement.
pub fn ack_frame(joined: bool, topic: &Topic, id: &AckId) -> Bytes {
    let name = if joined { "room.joined" } else { "room.left" };
    // Topics contain only characters that need no JSON escaping.
    envelope_frame(
        name,
        &format!("{{\"room\":\"{topic}\",\"id\":{}}}", id.as_json()),
    )
}

/// The error envelope for a rejected command.
pub fn error_frame(error: &ClientError, id: Option<&AckId>) -> Bytes {
    let mut data = format!(
        "{{\"code\":\"{}\",\"message\":{}",
        error.code(),
        json_string(&error.to_string())
    );
    if let Some(id) = id {
        data.push_str(",\"id\":");
        data.push_str(id.as_json());
    }
    data.push('}');
    envelope_frame("error", &data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(s: &str) -> Topic {
        Topic::new(s).unwrap()
    }

    #[test]
    fn ping_and_commands_parse() {
        assert_eq!(parse_command(b"2"), Ok(Command::Ping));
        assert_eq!(
            parse_command(br#"{"type":"heartbeat"}"#),
            Ok(Command::Heartbeat)
        );
        assert_eq!(
            parse_command(br#"{"type":"room.join","room":"a:b","extra":[1,{"x":2}]}"#),
            Ok(Command::Join {
                topic: topic("a:b"),
                id: None
            })
        );
        assert_eq!(
            parse_command(br#"{"type":"room.leave","room":"a","id":7}"#),
            Ok(Command::Leave {
                topic: topic("a"),
                id: Some(AckId("7".into()))
            })
        );
        assert_eq!(
            parse_command(br#"{"id":"x-1","room":"a","type":"room.join"}"#),
            Ok(Command::Join {
                topic: topic("a"),
                id: Some(AckId("\"x-1\"".into()))
            })
        );
    }

    #[test]
    fn bad_commands_are_rejected_with_a_precise_code() {
        let code = |input: &[u8]| parse_command(input).unwrap_err().error.code();
        assert_eq!(code(b"{not json"), "invalid_json");
        assert_eq!(code(b""), "invalid_json");
        assert_eq!(code(b"[1,2]"), "invalid_message");
        assert_eq!(code(b"\"room.join\""), "invalid_message");
        assert_eq!(code(br#"{"room":"a"}"#), "invalid_message");
        assert_eq!(code(br#"{"type":5}"#), "invalid_message");
        assert_eq!(code(br#"{"type":"room.kick","room":"a"}"#), "unknown_type");
        assert_eq!(code(br#"{"type":"room.join"}"#), "missing_room");
        assert_eq!(code(br#"{"type":"room.join","room":""}"#), "invalid_topic");
        assert_eq!(code(br#"{"type":"room.join","room":5}"#), "invalid_topic");
        assert_eq!(
            code(br#"{"type":"room.join","room":"a b"}"#),
            "invalid_topic"
        );
        let long = format!(r#"{{"type":"room.join","room":"{}"}}"#, "a".repeat(257));
        assert_eq!(code(long.as_bytes()), "invalid_topic");
        assert_eq!(
            code(br#"{"type":"room.join","room":"__broadcast__"}"#),
            "reserved_topic"
        );
        assert_eq!(
            code(br#"{"type":"room.join","room":"a","id":{"x":1}}"#),
            "invalid_id"
        );
    }

    #[test]
    fn rejection_keeps_the_ack_id_so_clients_can_correlate() {
        let r = parse_command(br#"{"type":"room.join","room":"a b","id":"q1"}"#).unwrap_err();
        assert_eq!(r.id, Some(AckId("\"q1\"".into())));
    }

    #[test]
    fn deeply_nested_json_is_rejected_without_overflowing_the_stack() {
        // Ignored fields are skipped without recursion: accepted, harmlessly.
        let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        let deep = format!(r#"{{"type":"heartbeat","x":{}}}"#, nest(100_000));
        assert_eq!(parse_command(deep.as_bytes()), Ok(Command::Heartbeat));
        let deep_room = format!(r#"{{"type":"room.join","room":{}}}"#, nest(100_000));
        assert!(parse_command(deep_room.as_bytes()).is_err());
    }

    #[test]
    fn envelopes_are_valid_json_with_the_seed_shape() {
        let id = SocketId::generate();
        let f = session_frame(id);
        let v: serde_json::Value = serde_json::from_slice(&f[2..]).unwrap();
        assert_eq!(v["name"], "session");
        assert_eq!(v["data"]["socketId"], id.to_string());
        assert!(v["timestamp"].as_u64().unwrap() > 1_600_000_000_000);

        let ack = ack_frame(true, &topic("t"), &AckId("\"a\\\"b\"".into()));
        let v: serde_json::Value = serde_json::from_slice(&ack[2..]).unwrap();
        assert_eq!(v["name"], "room.joined");
        assert_eq!(v["data"]["room"], "t");
        assert_eq!(v["data"]["id"], "a\"b");

        let err = error_frame(&ClientError::UnknownType, Some(&AckId("3".into())));
        let v: serde_json::Value = serde_json::from_slice(&err[2..]).unwrap();
        assert_eq!(v["name"], "error");
        assert_eq!(v["data"]["code"], "unknown_type");
        assert_eq!(v["data"]["id"], 3);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_client_text_is_a_command_or_a_rejection_never_a_panic(text in "\\PC{0,300}") {
            let _ = parse_command(text.as_bytes());
        }

        #[test]
        fn any_valid_topic_joins_and_any_id_echoes(topic in "[a-zA-Z0-9_:.-]{1,256}", id in any::<u32>()) {
            prop_assume!(!crate::types::is_reserved(&topic));
            let frame = format!(r#"{{"type":"room.join","room":"{topic}","id":{id}}}"#);
            match parse_command(frame.as_bytes()) {
                Ok(Command::Join { topic: t, id: Some(a) }) => {
                    prop_assert_eq!(t.as_str(), topic.as_str());
                    prop_assert_eq!(a.as_json(), id.to_string());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
