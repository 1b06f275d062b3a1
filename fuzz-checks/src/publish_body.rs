//! The JSON body of `POST /api/publish`, `/api/broadcast` and `/api/send`
//! (`wsgate::api::parse_json_body`), and an item of `POST /api/batch`
//! (`wsgate::api::parse_batch_item`).
//!
//! Checks: no panic; an accepted body targets what the call requires (a valid topic, a socket
//! id, or nothing) with a text message within the limit; a `name`/`data` body becomes the
//! seed's envelope, valid JSON with that name; an accepted batch item has one target and a
//! message within the limit, binary exactly when it came as base64.
use serde::Deserialize;
use serde_json::value::RawValue;
use wsgate::api::{Delivery, parse_batch_item, parse_json_body};
use wsgate::{Channel, Message, Topic};

const MAX: usize = 4096;

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
}

#[derive(Deserialize)]
struct Envelope {
    name: String,
    timestamp: u64,
}

/// One input: a byte choosing the call, then the body.
pub fn run(data: &[u8]) {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kind = match pick % 4 {
        0 => Delivery::Publish,
        1 => Delivery::Broadcast,
        2 => Delivery::Send,
        _ => return batch_item(body),
    };
    let Ok((channel, message)) = parse_json_body(kind, body, MAX) else {
        return;
    };
    match (kind, &channel) {
        (Delivery::Publish, Channel::Topic(_))
        | (Delivery::Broadcast, Channel::Broadcast)
        | (Delivery::Send, Channel::Socket(_) | Channel::User(_)) => {}
        other => panic!("{other:?}"),
    }
    let Message::Text(text) = message else {
        panic!("a JSON body makes a text message");
    };
    assert!(text.len() <= MAX);
    let text = std::str::from_utf8(&text).expect("text messages are UTF-8");
    // JSON has no range for numbers, and `data` is passed on verbatim: read the documents
    // without converting their numbers (serde_json's Value would refuse 1e999).
    let parsed: Named = serde_json::from_slice(body).expect("accepted bodies are JSON");
    if let Some(name) = parsed.name {
        let env: Envelope = serde_json::from_str(text).expect("the envelope is JSON");
        assert_eq!(env.name, name);
        let _ = env.timestamp;
    }
}

#[derive(Deserialize)]
struct Item {
    binary: Option<String>,
}

fn batch_item(body: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<Box<RawValue>>(body) else {
        return;
    };
    let Ok((channel, message)) = parse_batch_item(&raw, MAX) else {
        return;
    };
    assert!(message.len() <= MAX);
    if let Channel::Topic(topic) = &channel {
        assert!(Topic::new(topic.as_str()).is_ok(), "accepted {topic:?}");
    }
    let item: Item = serde_json::from_str(raw.get()).expect("accepted items are JSON");
    match (item.binary, message) {
        (Some(_), Message::Binary(_)) => {}
        (None, Message::Text(text)) => {
            std::str::from_utf8(&text).expect("text messages are UTF-8");
        }
        (binary, message) => panic!("binary field {binary:?} gave {message:?}"),
    }
}
