//! The client command parser (`wsgate::protocol::parse_command`): every text message a
//! WebSocket client sends goes through it.
//!
//! Checks: no panic; an accepted join/leave names a valid, non-reserved topic; the frames the
//! gateway answers with — the acknowledgement echoing the client's id, or the error envelope —
//! are valid JSON carrying that topic, id and error code.
use crate::server_payload;
use serde_json::Value;
use wsgate::Topic;
use wsgate::protocol::{self, Command};

/// One input: a client's text message.
pub fn run(data: &[u8]) {
    match protocol::parse_command(data) {
        Ok(Command::Ping) => assert_eq!(data, protocol::PING),
        Ok(Command::Heartbeat) => {}
        Ok(Command::Authenticate { token }) => {
            // The token is passed on as given, to the verifier: nothing is trusted yet.
            assert!(token.len() <= data.len());
        }
        Ok(Command::Join { topic, id, .. } | Command::Leave { topic, id }) => {
            assert!(Topic::new(topic.as_str()).is_ok(), "accepted {topic:?}");
            if let Some(id) = id {
                let frame = protocol::ack_frame(true, &topic, &id);
                let ack: Value = serde_json::from_slice(server_payload(&frame)).expect("JSON ack");
                assert_eq!(ack["name"], "room.joined");
                assert_eq!(ack["data"]["room"], topic.as_str());
                let sent: Value = serde_json::from_str(id.as_json()).expect("the id is JSON");
                assert!(sent.is_string() || sent.is_number());
                assert_eq!(ack["data"]["id"], sent);
            }
        }
        Err(rejected) => {
            let frame = protocol::error_frame(&rejected.error, rejected.id.as_ref());
            let env: Value = serde_json::from_slice(server_payload(&frame)).expect("JSON error");
            assert_eq!(env["name"], "error");
            assert_eq!(env["data"]["code"], rejected.error.code());
        }
    }
}
