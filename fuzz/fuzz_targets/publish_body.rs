//! The JSON body of `POST /api/publish`, `/api/broadcast` and `/api/send`
//! (`wsgate::api::parse_json_body`).
//!
//! Checks: no panic; an accepted body targets what the call requires (a valid topic, a socket
//! id, or nothing) with a text message within the limit; a `name`/`data` body becomes the
//! seed's envelope, valid JSON with that name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use wsgate::api::{Delivery, parse_json_body};
use wsgate::{Channel, Message};

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

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let kind = match pick % 3 {
        0 => Delivery::Publish,
        1 => Delivery::Broadcast,
        _ => Delivery::Send,
    };
    let Ok((channel, message)) = parse_json_body(kind, body, MAX) else {
        return;
    };
    match (kind, &channel) {
        (Delivery::Publish, Channel::Topic(_))
        | (Delivery::Broadcast, Channel::Broadcast)
        | (Delivery::Send, Channel::Socket(_)) => {}
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
});
