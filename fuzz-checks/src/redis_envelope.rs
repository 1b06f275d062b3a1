//! The Redis envelope parser (`wsgate::broker::wire::decode` and `decode_direct`): what any
//! peer on the same Redis publishes reaches it, so it is untrusted input.
//!
//! Checks: no panic; an accepted envelope is for the channel it arrived on (on a replica's
//! direct channel: for a socket carrying that replica's tag) and within the size limit;
//! encoding what was decoded and decoding it again gives the same message.
use wsgate::broker::wire;

/// Channel topics of three kinds: a topic, a socket's own channel, the broadcast one; the
/// fourth kind is the direct channel of the replica tagged [`TAG`].
const CHANNELS: [&str; 3] = [
    "news",
    "__socket__:3f2b6f8e-2a53-4a7c-9a8e-1b2c3d4e5f60",
    "__broadcast__",
];
const TAG: u32 = 0x3f2b_6f8e;
const MAX: usize = 64 * 1024;

/// One input: a byte choosing the channel, then the payload.
pub fn run(data: &[u8]) {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let Some(&channel) = CHANNELS.get(usize::from(pick) % 4) else {
        return direct(payload);
    };
    let Ok(envelope) = wire::decode(channel, payload, MAX) else {
        return;
    };
    assert!(payload.len() <= MAX);
    assert_eq!(envelope.topic, channel);
    let again = wire::encode(channel, &envelope.message);
    let decoded = wire::decode(channel, &again, usize::MAX).expect("re-encoded envelope decodes");
    assert_eq!(decoded.message, envelope.message);
}

fn direct(payload: &[u8]) {
    let Ok((id, envelope)) = wire::decode_direct(TAG, payload, MAX) else {
        return;
    };
    assert!(payload.len() <= MAX);
    assert_eq!(id.tag(), TAG);
    // Socket ids parse in either case.
    assert_eq!(envelope.topic.to_lowercase(), format!("__socket__:{id}"));
    let again = wire::encode(&envelope.topic, &envelope.message);
    let (same, decoded) = wire::decode_direct(TAG, &again, usize::MAX).expect("re-encoded");
    assert_eq!((same, decoded.message), (id, envelope.message));
}
