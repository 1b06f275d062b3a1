//! The client protocol: commands a connection may send and the envelopes the gateway sends.
//!
//! Compatible with the seed's browser client: `2`/`3` pings, `room.join` / `room.leave` /
//! `heartbeat` commands, and `{"name","data","timestamp"}` envelopes.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::broker::Message;
use crate::error::ClientError;
use crate::frame;
use crate::history::{Position, Since, valid_epoch};
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
    /// `{"type":"room.join","room":..}`, optionally with `"since"`.
    Join {
        topic: Topic,
        id: Option<AckId>,
        position: JoinPosition,
    },
    /// `{"type":"room.leave","room":..}`.
    Leave { topic: Topic, id: Option<AckId> },
    /// `{"type":"heartbeat"}`.
    Heartbeat,
    /// `{"type":"auth.authenticate","token":"…"}` (the seed client's own message).
    Authenticate { token: String },
}

/// How a join positions the connection in the topic's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinPosition {
    /// No `since`: the seed's plain frames, no history.
    Plain,
    /// `"since":{}`: positioned envelopes from now on, nothing to recover.
    Fresh,
    /// `"since":{"offset":..,"epoch":..}`: recover what came after, then positioned envelopes.
    Since(Since),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSince {
    offset: Option<u64>,
    epoch: Option<String>,
}

fn parse_since(raw: Option<&RawValue>) -> Result<JoinPosition, ClientError> {
    let Some(raw) = raw else {
        return Ok(JoinPosition::Plain);
    };
    if raw.get() == "null" {
        return Ok(JoinPosition::Plain);
    }
    let since: RawSince = serde_json::from_str(raw.get()).map_err(|_| ClientError::InvalidSince)?;
    match (since.offset, since.epoch) {
        (None, None) => Ok(JoinPosition::Fresh),
        (Some(offset), Some(epoch)) if valid_epoch(&epoch) => {
            Ok(JoinPosition::Since(Since { offset, epoch }))
        }
        _ => Err(ClientError::InvalidSince),
    }
}

#[derive(Deserialize)]
struct RawCommand<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    room: Option<&'a RawValue>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
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
        "auth.authenticate" => match raw.token.map(|t| serde_json::from_str::<String>(t.get())) {
            Some(Ok(token)) => Ok(Command::Authenticate { token }),
            Some(Err(_)) => Err(reject(
                ClientError::Unauthorized(crate::auth::AuthFailure::Malformed),
                id,
            )),
            None => Err(reject(
                ClientError::Unauthorized(crate::auth::AuthFailure::Missing),
                id,
            )),
        },
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
                let position = parse_since(raw.since).map_err(|e| reject(e, id.clone()))?;
                Command::Join {
                    topic,
                    id,
                    position,
                }
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

/// `auth.ok`: who the connection now is, and until when (ms since the Unix epoch).
pub fn auth_ok_frame(user: Option<&str>, expires_at_secs: u64) -> Bytes {
    let user = user.map_or_else(|| "null".to_owned(), json_string);
    envelope_frame(
        "auth.ok",
        &format!(
            "{{\"userId\":{user},\"expiresAt\":{}}}",
            expires_at_secs.saturating_mul(1000)
        ),
    )
}

/// `room.left` for a room the connection was taken out of because its new token does not
/// allow it.
pub fn revoked_frame(topic: &Topic) -> Bytes {
    envelope_frame(
        "room.left",
        &format!("{{\"room\":\"{topic}\",\"reason\":\"forbidden\"}}"),
    )
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

/// The `room.joined` acknowledgement of a positioned join: whether everything missed follows
/// (`recovered`), and the history's newest position when it was read (`offset` 0 and `epoch`
/// null when the topic has no history yet).
pub fn recovery_ack_frame(
    topic: &Topic,
    id: &AckId,
    recovered: bool,
    top: Option<&Position>,
) -> Bytes {
    let (offset, epoch) = match top {
        // Epochs are checked tokens: no JSON escaping needed.
        Some(p) => (p.offset, format!("\"{}\"", p.epoch)),
        None => (0, "null".to_owned()),
    };
    envelope_frame(
        "room.joined",
        &format!(
            "{{\"room\":\"{topic}\",\"id\":{},\"recovered\":{recovered},\"offset\":{offset},\"epoch\":{epoch}}}",
            id.as_json()
        ),
    )
}

/// The positioned envelope a connection that joined with `since` receives for each message
/// of that topic: `{"name":"room.message","data":{"room":..,"offset":..,"epoch":..,
/// "message":<text, or base64 for binary>,"isBinary":bool},"timestamp":<ms>}`.
pub fn positioned_frame(topic: &Topic, position: &Position, message: &Message) -> Bytes {
    frame::text(positioned_envelope(topic, position, message).as_bytes())
}

/// The text of [`positioned_frame`].
pub fn positioned_envelope(topic: &Topic, position: &Position, message: &Message) -> String {
    use base64::Engine;
    let (text, is_binary) = match message {
        Message::Text(b) => (json_string(&String::from_utf8_lossy(b)), false),
        Message::Binary(b) => (
            format!(
                "\"{}\"",
                base64::engine::general_purpose::STANDARD.encode(b)
            ),
            true,
        ),
        Message::Disconnect => (json_string(""), false),
    };
    envelope(
        "room.message",
        &format!(
            "{{\"room\":\"{topic}\",\"offset\":{},\"epoch\":\"{}\",\"message\":{text},\"isBinary\":{is_binary}}}",
            position.offset, position.epoch
        ),
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
                id: None,
                position: JoinPosition::Plain,
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
                id: Some(AckId("\"x-1\"".into())),
                position: JoinPosition::Plain,
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
    fn since_positions_a_join_or_is_refused_with_its_own_code() {
        let position = |frame: &str| match parse_command(frame.as_bytes()) {
            Ok(Command::Join { position, .. }) => Ok(position),
            Ok(other) => panic!("{other:?}"),
            Err(r) => Err((r.error.code(), r.id)),
        };
        assert_eq!(
            position(r#"{"type":"room.join","room":"t","since":null}"#),
            Ok(JoinPosition::Plain)
        );
        assert_eq!(
            position(r#"{"type":"room.join","room":"t","since":{}}"#),
            Ok(JoinPosition::Fresh)
        );
        assert_eq!(
            position(r#"{"type":"room.join","room":"t","since":{"offset":42,"epoch":"e_1"}}"#),
            Ok(JoinPosition::Since(Since {
                offset: 42,
                epoch: "e_1".into()
            }))
        );
        for bad in [
            r#""since":5"#,
            r#""since":"x""#,
            r#""since":[]"#,
            r#""since":{"offset":1}"#,
            r#""since":{"epoch":"e"}"#,
            r#""since":{"offset":-1,"epoch":"e"}"#,
            r#""since":{"offset":1.5,"epoch":"e"}"#,
            r#""since":{"offset":"1","epoch":"e"}"#,
            r#""since":{"offset":1,"epoch":""}"#,
            r#""since":{"offset":1,"epoch":"a b"}"#,
            r#""since":{"offset":1,"epoch":7}"#,
            r#""since":{"offset":1,"epoch":"e","extra":1}"#,
            r#""since":{"offset":1,"epoch":"e","__proto__":{}}"#,
            r#""since":{"offset":99999999999999999999999,"epoch":"e"}"#,
        ] {
            let frame = format!(r#"{{"type":"room.join","room":"t","id":9,{bad}}}"#);
            assert_eq!(
                position(&frame),
                Err(("invalid_since", Some(AckId("9".into())))),
                "{bad}"
            );
        }
        let long = format!(
            r#"{{"type":"room.join","room":"t","since":{{"offset":1,"epoch":"{}"}}}}"#,
            "e".repeat(65)
        );
        assert!(position(&long).is_err());
        // `since` on a leave means nothing and is ignored, like any extra field.
        assert!(parse_command(br#"{"type":"room.leave","room":"t","since":5}"#).is_ok());
    }

    #[test]
    fn positioned_envelopes_and_recovery_acks_are_valid_json() {
        // An unmasked server frame: 2 header bytes, plus 2 or 8 of extended length.
        let json_of = |f: &Bytes| -> serde_json::Value {
            let header = match f[1] & 0x7f {
                126 => 4,
                127 => 10,
                _ => 2,
            };
            serde_json::from_slice(&f[header..]).unwrap()
        };
        let p = Position {
            offset: 7,
            epoch: "ep".into(),
        };
        let f = positioned_frame(&topic("t"), &p, &Message::Text(Bytes::from_static(b"a\"b")));
        let v: serde_json::Value = json_of(&f);
        assert_eq!(v["name"], "room.message");
        assert_eq!(v["data"]["room"], "t");
        assert_eq!(v["data"]["offset"], 7);
        assert_eq!(v["data"]["epoch"], "ep");
        assert_eq!(v["data"]["message"], "a\"b");
        assert_eq!(v["data"]["isBinary"], false);
        let f = positioned_frame(
            &topic("t"),
            &p,
            &Message::Binary(Bytes::from_static(&[0, 255])),
        );
        let v: serde_json::Value = json_of(&f);
        assert_eq!(
            (
                v["data"]["message"].as_str(),
                v["data"]["isBinary"].as_bool()
            ),
            (Some("AP8="), Some(true))
        );
        let f = recovery_ack_frame(&topic("t"), &AckId("1".into()), true, Some(&p));
        let v: serde_json::Value = json_of(&f);
        assert_eq!(
            v["data"],
            serde_json::json!({"room":"t","id":1,"recovered":true,"offset":7,"epoch":"ep"})
        );
        let f = recovery_ack_frame(&topic("t"), &AckId("1".into()), false, None);
        let v: serde_json::Value = json_of(&f);
        assert_eq!(
            v["data"],
            serde_json::json!({"room":"t","id":1,"recovered":false,"offset":0,"epoch":null})
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
                Ok(Command::Join { topic: t, id: Some(a), position: JoinPosition::Plain }) => {
                    prop_assert_eq!(t.as_str(), topic.as_str());
                    prop_assert_eq!(a.as_json(), id.to_string());
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
