//! The WebSocket frame reader (`wsgate::frame::FrameReader`) fed in arbitrary pieces, as the
//! socket delivers them.
//!
//! Checks: no panic; nothing buffered past the configured limit (a message larger than the
//! limit is reported, never held; what waits for the rest of a frame is at most what the
//! limit leaves, or one control frame, plus one header); any byte stream decodes to the same items and the same violation however
//! it is cut; and a valid sequence of frames — fragmented messages, pings between fragments,
//! masks, oversized messages, a close — decodes to exactly the messages it was built from.
use crate::pieces;
use arbitrary::{Result, Unstructured};
use bytes::{Bytes, BytesMut};
use wsgate::frame::{FrameReader, Inbound, ProtocolViolation};

/// The longest header a client frame has: 2 + 8 length bytes + 4 mask bytes.
const MAX_HEADER: usize = 14;

/// One input (see [`try_run`]).
pub fn run(data: &[u8]) {
    let _ = try_run(data);
}

/// Input: a big-endian u16 (the limit, modulo 2049), a mode byte (even: the rest is a byte
/// stream; odd: it drives the generator of a valid sequence), a count `n` and `n` piece sizes
/// (see [`pieces`]), then the rest.
fn try_run(data: &[u8]) -> Result<()> {
    let [m0, m1, mode, n, rest @ ..] = data else {
        return Ok(());
    };
    let max = usize::from(u16::from_be_bytes([*m0, *m1])) % 2049;
    let (sizes, rest) = rest.split_at(usize::from(*n).min(rest.len()));
    if mode & 1 == 0 {
        // Any bytes: the outcome does not depend on where the stream was cut.
        let whole = decode(max, rest, &[]);
        let cut = decode(max, rest, sizes);
        assert_eq!(whole, cut, "cutting the stream changed what it decodes to");
    } else {
        let (wire, expected) = valid_sequence(&mut Unstructured::new(rest), max)?;
        for cut in [&[][..], sizes] {
            let (items, violation) = decode(max, &wire, cut);
            assert_eq!(violation, None);
            assert_eq!(items, expected);
        }
    }
    Ok(())
}

/// Feeds `stream` to a fresh reader in the pieces `sizes` cuts it into; returns every item
/// and the violation that stopped it, if any.
fn decode(max: usize, stream: &[u8], sizes: &[u8]) -> (Vec<Inbound>, Option<ProtocolViolation>) {
    let mut reader = FrameReader::new(max);
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in pieces(stream, sizes) {
        buf.extend_from_slice(piece);
        loop {
            match reader.next(&mut buf) {
                Ok(Some(item)) => {
                    match &item {
                        Inbound::Text(b) | Inbound::Binary(b) => assert!(b.len() <= max),
                        Inbound::Ping(b) => assert!(b.len() <= 125),
                        Inbound::TooLarge { len } => assert!(*len > max as u64),
                        Inbound::Pong | Inbound::Close(_) => {}
                    }
                    items.push(item);
                }
                Ok(None) => break,
                Err(violation) => return (items, Some(violation)),
            }
            assert!(reader.buffered() <= max, "a message held past the limit");
        }
        // Whatever waits now is the start of one frame: the next fragment of a message that
        // fits the limit with what is held of it, or a control frame (between fragments, too).
        let room = max.saturating_sub(reader.buffered()).max(125);
        assert!(
            buf.len() <= room + MAX_HEADER,
            "{} bytes waiting, {} held, for a limit of {max}",
            buf.len(),
            reader.buffered()
        );
    }
    (items, None)
}

/// A masked client frame.
fn client_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// A valid stream of frames and the items it must decode to.
fn valid_sequence(u: &mut Unstructured<'_>, max: usize) -> Result<(Vec<u8>, Vec<Inbound>)> {
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let messages = u.int_in_range(0..=8)?;
    for _ in 0..messages {
        match u.int_in_range(0..=3u8)? {
            0 | 1 => {
                let text = u.arbitrary::<bool>()?;
                let payload: Vec<u8> = if text {
                    u.arbitrary::<String>()?.into_bytes()
                } else {
                    u.arbitrary()?
                };
                // Fragments cut anywhere (through UTF-8 sequences too), pings in between.
                let parts = u.int_in_range(1..=4usize)?;
                let mut at = 0;
                let mut so_far = 0u64;
                let mut over = false;
                for i in 0..parts {
                    let last = i + 1 == parts;
                    let end = if last {
                        payload.len()
                    } else {
                        u.int_in_range(at..=payload.len())?
                    };
                    let opcode = match (i, text) {
                        (0, true) => 1,
                        (0, false) => 2,
                        _ => 0,
                    };
                    client_frame(&mut wire, last, opcode, &payload[at..end], u.arbitrary()?);
                    so_far += (end - at) as u64;
                    at = end;
                    if !over && so_far > max as u64 {
                        over = true;
                        expected.push(Inbound::TooLarge { len: so_far });
                    }
                    if last && !over {
                        let data = Bytes::from(payload.clone());
                        expected.push(if text {
                            Inbound::Text(data)
                        } else {
                            Inbound::Binary(data)
                        });
                    } else if !last && u.arbitrary::<bool>()? {
                        let ping: Vec<u8> = u.arbitrary()?;
                        let ping = &ping[..ping.len().min(125)];
                        client_frame(&mut wire, true, 9, ping, u.arbitrary()?);
                        expected.push(Inbound::Ping(Bytes::copy_from_slice(ping)));
                    }
                }
            }
            2 => {
                let pong: Vec<u8> = u.arbitrary()?;
                client_frame(
                    &mut wire,
                    true,
                    10,
                    &pong[..pong.len().min(125)],
                    u.arbitrary()?,
                );
                expected.push(Inbound::Pong);
            }
            _ => {
                let ping: Vec<u8> = u.arbitrary()?;
                let ping = &ping[..ping.len().min(125)];
                client_frame(&mut wire, true, 9, ping, u.arbitrary()?);
                expected.push(Inbound::Ping(Bytes::copy_from_slice(ping)));
            }
        }
    }
    if u.arbitrary::<bool>()? {
        let code = u.int_in_range(3000..=4999u16)?;
        let reason: String = u.arbitrary()?;
        let mut payload = code.to_be_bytes().to_vec();
        let mut cut = reason.len().min(123);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..cut]);
        client_frame(&mut wire, true, 8, &payload, u.arbitrary()?);
        expected.push(Inbound::Close(Some(code)));
    }
    Ok((wire, expected))
}
