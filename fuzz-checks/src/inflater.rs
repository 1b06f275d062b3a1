//! The permessage-deflate inflater, as a client reaches it: compressed messages (RSV1 on the
//! first frame) through `wsgate::frame::FrameReader` on a connection that negotiated the
//! extension, the message cut into arbitrary fragments and the stream into arbitrary pieces.
//!
//! Checks: no panic; nothing held past the limit however much the input inflates (a message
//! that inflates past it fails with 1009, invalid deflate data with 1007); the outcome does not
//! depend on how the stream was cut, nor — for a message within the limit on the wire — on how
//! it was fragmented, and is that of inflating the message in one go
//! (`wsgate::deflate::inflate_message`); and a message the gateway's own compressor packed —
//! repeated to make high ratios — comes back exactly.
use crate::pieces;
use bytes::BytesMut;
use wsgate::deflate;
use wsgate::frame::{FrameReader, Inbound, close_code};

/// Input: a big-endian u16 (the limit, modulo 8193: small limits keep runs fast, and an input
/// of a few bytes can still inflate to megabytes), a mode byte (even: the rest is the
/// compressed payload as is; odd: the rest is a message to compress, repeated `mode / 2 + 1`
/// times, up to 16 KiB), a count `n` and `n` sizes (the fragments, see [`pieces`]), a count
/// `k` and `k` sizes (the socket's pieces), then the rest.
pub fn run(data: &[u8]) {
    let [m0, m1, mode, n, rest @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_be_bytes([*m0, *m1])) % 8193;
    let (fragments, rest) = rest.split_at(usize::from(*n).min(rest.len()));
    let [k, rest @ ..] = rest else { return };
    let (cuts, rest) = rest.split_at(usize::from(*k).min(rest.len()));

    let (payload, original) = if mode & 1 == 0 {
        (rest.to_vec(), None)
    } else {
        // Up to 16 KiB: past every limit the target draws (8 KiB), and cheap enough to compress
        // that runs stay fast.
        let times = (usize::from(*mode / 2) + 1)
            .min(16384 / rest.len().max(1))
            .max(1);
        let message = rest.repeat(times);
        match deflate::compress(&message) {
            Some(packed) => (packed, Some(message)),
            None => return,
        }
    };
    let whole = decode(max, &frames(&payload, &[]), &[]);
    let fragmented = frames(&payload, fragments);
    let cut = decode(max, &fragmented, cuts);
    assert_eq!(
        cut,
        decode(max, &fragmented, &[]),
        "where the socket cut the stream changed the outcome"
    );
    if payload.len() <= max {
        same_outcome(&whole, &cut);
    } else {
        // Over the limit on the wire: in one frame it is skipped unread; in fragments, those
        // that came before the limit was passed were inflated, and may have failed first.
        assert!(!matches!(cut, Outcome::Message(_)), "{cut:?}");
    }

    // The same as inflating the message in one go (when it fits on the wire).
    if payload.len() <= max {
        let expected = match deflate::inflate_message(&payload, max) {
            Ok(m) => Outcome::Message(m),
            Err(deflate::InflateError::TooBig) => Outcome::Closed(close_code::MESSAGE_TOO_BIG),
            Err(deflate::InflateError::Corrupt) => Outcome::Closed(close_code::INVALID_PAYLOAD),
        };
        same_outcome(&whole, &expected);
    } else {
        assert_eq!(whole, Outcome::TooLarge);
    }
    if let Some(message) = original {
        if payload.len() > max {
            assert_eq!(whole, Outcome::TooLarge);
        } else if message.len() > max {
            assert_eq!(whole, Outcome::Closed(close_code::MESSAGE_TOO_BIG));
        } else {
            assert_eq!(whole, Outcome::Message(message));
        }
    }
}

/// Equal outcomes — except that a message both too big once inflated and invalid further on may
/// be refused for either: which the decompressor meets first depends on how much input it had
/// at a time (it decodes ahead into its window). Either way the connection fails, and nothing
/// past the limit is held.
fn same_outcome(a: &Outcome, b: &Outcome) {
    match (a, b) {
        (Outcome::Closed(_), Outcome::Closed(_)) => {}
        _ => assert_eq!(a, b, "fragmenting changed the outcome"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Message(Vec<u8>),
    /// Over the limit on the wire: skipped unread.
    TooLarge,
    Closed(u16),
}

/// `payload` as one compressed binary message, fragmented where `sizes` says.
fn frames(payload: &[u8], sizes: &[u8]) -> Vec<u8> {
    let parts: Vec<&[u8]> = if payload.is_empty() {
        vec![&[]]
    } else {
        pieces(payload, sizes).collect()
    };
    let mut wire = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let first = if i == 0 { 0x40 | 0x2 } else { 0x0 };
        let fin = if i + 1 == parts.len() { 0x80 } else { 0 };
        wire.push(fin | first);
        let len = part.len();
        if len < 126 {
            wire.push(0x80 | len as u8);
        } else if let Ok(len16) = u16::try_from(len) {
            wire.push(0x80 | 126);
            wire.extend_from_slice(&len16.to_be_bytes());
        } else {
            wire.push(0x80 | 127);
            wire.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // A zero mask: the fuzzer sees the payload as it is.
        wire.extend_from_slice(&[0, 0, 0, 0]);
        wire.extend_from_slice(part);
    }
    wire
}

fn decode(max: usize, stream: &[u8], sizes: &[u8]) -> Outcome {
    let mut reader = FrameReader::new(max).with_deflate(true);
    let mut buf = BytesMut::new();
    for piece in pieces(stream, sizes) {
        buf.extend_from_slice(piece);
        // One message at most: every item but "need more bytes" ends the decoding.
        let item = reader.next(&mut buf);
        assert!(reader.buffered() <= max, "held past the limit");
        match item {
            Ok(Some(Inbound::Binary(m))) => {
                assert!(m.len() <= max);
                return Outcome::Message(m.to_vec());
            }
            Ok(Some(Inbound::TooLarge { len })) => {
                assert!(len > max as u64);
                return Outcome::TooLarge;
            }
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            Ok(None) => {}
            Err(v) => {
                assert!(
                    [close_code::MESSAGE_TOO_BIG, close_code::INVALID_PAYLOAD].contains(&v.code),
                    "{v:?}"
                );
                return Outcome::Closed(v.code);
            }
        }
    }
    panic!("the stream ended without an outcome");
}
