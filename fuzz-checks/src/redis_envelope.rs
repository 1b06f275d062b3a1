//! The Redis envelope parser (`wsgate::broker::wire::decode`): what any peer on the same Redis
//! publishes reaches it, so it is untrusted input.
//!
//! Checks: no panic; an accepted envelope is for the channel it arrived on and within the size
//! limit; encoding what was decoded and decoding it again gives the same message.
use wsgate::broker::wire;

/// Channel topics of the three kinds: a topic, a socket's direct channel, the broadcast one.
const CHANNELS: [&str; 3] = [
    "news",
    "__socket__:3f2b6f8e-2a53-4a7c-9a8e-1b2c3d4e5f60",
    "__broadcast__",
];
const MAX: usize = 64 * 1024;

/// One input: a byte choosing the channel, then the payload.
pub fn run(data: &[u8]) {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let channel = CHANNELS[usize::from(pick) % CHANNELS.len()];
    let Ok(envelope) = wire::decode(channel, payload, MAX) else {
        return;
    };
    assert!(payload.len() <= MAX);
    assert_eq!(envelope.topic, channel);
    let again = wire::encode(channel, &envelope.message);
    let decoded = wire::decode(channel, &again, usize::MAX).expect("re-encoded envelope decodes");
    assert_eq!(decoded.message, envelope.message);
}
