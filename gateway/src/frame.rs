//! The WebSocket wire format (RFC 6455), as the gateway needs it.
//!
//! Server-to-client frames are never masked, so one encoded frame is valid for every recipient:
//! [`encode`] builds it once and the fan-out shares the resulting [`Bytes`] by reference.
//! Client-to-server frames are always masked; [`FrameReader`] parses them incrementally from a
//! read buffer, reassembles fragmented messages, enforces the inbound size limit without
//! buffering oversized payloads, and reports protocol violations. On a connection that
//! negotiated permessage-deflate it also inflates compressed messages (RSV1 on their first
//! frame), within the same size limit.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::deflate::{self, FragmentInflater, InflateError};

/// Frame opcodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// WebSocket close codes the gateway sends.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutdown, idle).
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The peer broke a policy (rate, slow consumer).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The message was too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Server overloaded; try again later.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The connection's token expired (an application code, DESIGN §10).
    pub const TOKEN_EXPIRED: u16 = 4001;
}

/// Encodes one unmasked, final frame carrying `payload`.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 10);
    put_header(&mut out, 0x80 | opcode.as_u8(), payload.len());
    out.extend_from_slice(payload);
    out.freeze()
}

/// Encodes one unmasked, final frame whose payload is a permessage-deflate compressed message
/// (RSV1 set; RFC 7692 §6).
pub fn encode_compressed(opcode: OpCode, compressed: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(compressed.len() + 10);
    put_header(&mut out, 0x80 | RSV1 | opcode.as_u8(), compressed.len());
    out.extend_from_slice(compressed);
    out.freeze()
}

/// The first frame of a compressed message has this bit set.
const RSV1: u8 = 0x40;

/// Encodes a text frame (the caller guarantees UTF-8).
pub fn text(payload: &[u8]) -> Bytes {
    encode(OpCode::Text, payload)
}

/// Encodes a binary frame.
pub fn binary(payload: &[u8]) -> Bytes {
    encode(OpCode::Binary, payload)
}

/// Encodes a close frame; the reason is cut to fit the 125-byte control frame limit.
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = Vec::with_capacity(2 + cut);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Close, &payload)
}

fn put_header(out: &mut BytesMut, first: u8, len: usize) {
    out.put_u8(first);
    if len < 126 {
        out.put_u8(len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.put_u8(126);
        out.put_u16(len16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
}

/// Something read from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A complete text message (valid UTF-8).
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping; the payload must be echoed in a pong.
    Ping(Bytes),
    /// A pong (ignored beyond liveness).
    Pong,
    /// The client started the closing handshake.
    Close(Option<u16>),
    /// A message larger than the limit was discarded without being buffered.
    TooLarge {
        /// The size the client announced (for a fragmented message: so far; for a compressed
        /// one: its compressed size).
        len: u64,
    },
}

/// A violation of RFC 6455 by the client: the connection must be closed with `code`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct ProtocolViolation {
    /// The close code to send.
    pub code: u16,
    /// Why (sent as the close reason).
    pub reason: &'static str,
}

fn violation(reason: &'static str) -> ProtocolViolation {
    ProtocolViolation {
        code: close_code::PROTOCOL_ERROR,
        reason,
    }
}

/// Incremental parser for client frames.
#[derive(Debug)]
pub struct FrameReader {
    /// The limit (`--max-frame-bytes` is at most 64 MiB): a u32 keeps the reader, which every
    /// connection holds, as small as it was before permessage-deflate.
    max_message: u32,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// Payload bytes of an oversized frame still to be discarded.
    skipping: u64,
    /// A fragmented message being reassembled.
    partial: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    opcode: OpCode,
    /// The message so far (inflated, for a compressed one).
    data: Vec<u8>,
    /// The message is compressed: its fragments go through this decompressor, which lives
    /// only as long as the message.
    inflater: Option<Box<Inflating>>,
    /// The message passed the limit: discard its remaining fragments.
    discard: bool,
    /// Text: how much of `data` is known to be valid UTF-8 (what follows is at most the start
    /// of one character, completed by the next fragment).
    checked: usize,
}

/// A compressed message being received in fragments.
#[derive(Debug, Default)]
struct Inflating {
    inflater: FragmentInflater,
    /// Compressed payload bytes received so far (what the limit applies to on the wire).
    received: u64,
}

impl Partial {
    /// Payload bytes received so far, as they came on the wire.
    fn received(&self) -> u64 {
        match &self.inflater {
            Some(inflating) => inflating.received,
            None => self.data.len() as u64,
        }
    }

    /// Checks the text received since the last fragment, so that invalid UTF-8 fails the
    /// connection when it arrives rather than when the message ends (RFC 6455 §8.1; the
    /// Autobahn suite's cases 6.4.1 and 6.4.2). Each byte is checked once either way.
    fn check_text(&mut self) -> Result<(), ProtocolViolation> {
        if self.opcode != OpCode::Text {
            return Ok(());
        }
        match std::str::from_utf8(&self.data[self.checked..]) {
            Ok(_) => self.checked = self.data.len(),
            // Cut inside a character: the rest of it may come with the next fragment.
            Err(e) if e.error_len().is_none() => self.checked += e.valid_up_to(),
            Err(_) => return Err(invalid_utf8()),
        }
        Ok(())
    }
}

fn invalid_utf8() -> ProtocolViolation {
    ProtocolViolation {
        code: close_code::INVALID_PAYLOAD,
        reason: "text message is not valid UTF-8",
    }
}

impl FrameReader {
    /// A reader accepting messages up to `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message: u32::try_from(max_message).unwrap_or(u32::MAX),
            deflate: false,
            skipping: 0,
            partial: None,
        }
    }

    /// Accepts permessage-deflate compressed messages (the connection negotiated it).
    #[must_use]
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// Bytes of a fragmented message held until its final fragment (never more than the
    /// limit: an oversized message is discarded, not buffered).
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.data.len())
    }

    /// Parses the next complete item from the front of `buf`, consuming its bytes.
    ///
    /// Returns `Ok(None)` when more bytes are needed.
    ///
    /// # Errors
    /// [`ProtocolViolation`] when the client broke the protocol.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Inbound>, ProtocolViolation> {
        loop {
            if self.skipping > 0 {
                let n = (buf.len() as u64).min(self.skipping);
                buf.advance(n as usize);
                self.skipping -= n;
                if self.skipping > 0 {
                    return Ok(None);
                }
                continue;
            }
            let Some(header) = parse_header(buf)? else {
                return Ok(None);
            };
            match self.on_frame(header, buf)? {
                Step::NeedMore => return Ok(None),
                Step::Item(item) => return Ok(Some(item)),
                Step::Consumed => {}
            }
        }
    }

    fn on_frame(&mut self, h: Header, buf: &mut BytesMut) -> Result<Step, ProtocolViolation> {
        if h.rsv1 {
            // RFC 7692 §6: only on the first frame of a data message, and only once negotiated.
            if !self.deflate {
                return Err(violation(
                    "reserved bits set without a negotiated extension",
                ));
            }
            if h.opcode.is_control() || h.opcode == OpCode::Continuation {
                return Err(violation("RSV1 set on a control or continuation frame"));
            }
        }
        if h.opcode.is_control() {
            if !h.fin || h.len > 125 {
                return Err(violation(
                    "control frames must be final and at most 125 bytes",
                ));
            }
            let Some(payload) = take_payload(buf, &h) else {
                return Ok(Step::NeedMore);
            };
            return match h.opcode {
                OpCode::Ping => Ok(Step::Item(Inbound::Ping(payload))),
                OpCode::Pong => Ok(Step::Item(Inbound::Pong)),
                _ => parse_close(&payload).map(|code| Step::Item(Inbound::Close(code))),
            };
        }

        let continuing = self.partial.is_some();
        match (h.opcode, continuing) {
            (OpCode::Continuation, false) => {
                return Err(violation(
                    "continuation frame without a message to continue",
                ));
            }
            (OpCode::Text | OpCode::Binary, true) => {
                return Err(violation(
                    "new message before the previous one was finished",
                ));
            }
            _ => {}
        }

        let so_far = self.partial.as_ref().map_or(0, Partial::received);
        let discarding = self.partial.as_ref().is_some_and(|p| p.discard);
        if discarding || so_far + h.len > u64::from(self.max_message) {
            // Too big: drop the payload as it streams past instead of buffering it.
            buf.advance(h.header_len);
            self.skipping = h.len;
            let announced = so_far + h.len;
            if h.fin {
                self.partial = None;
            } else {
                let opcode = self.partial.as_ref().map_or(h.opcode, |p| p.opcode);
                self.partial = Some(Partial {
                    opcode,
                    data: Vec::new(),
                    inflater: None,
                    discard: true,
                    checked: 0,
                });
            }
            // Report once per message: when it first goes over the limit.
            return Ok(if discarding {
                Step::Consumed
            } else {
                Step::Item(Inbound::TooLarge { len: announced })
            });
        }

        let Some(payload) = take_payload(buf, &h) else {
            return Ok(Step::NeedMore);
        };
        let max = self.max_message as usize;
        if !h.fin {
            let partial = self.partial.get_or_insert_with(|| Partial {
                opcode: h.opcode,
                data: Vec::new(),
                inflater: h.rsv1.then(Box::default),
                discard: false,
                checked: 0,
            });
            match &mut partial.inflater {
                Some(inflating) => {
                    inflating.received += h.len;
                    inflating
                        .inflater
                        .feed(&payload, &mut partial.data, max)
                        .map_err(inflate_violation)?;
                }
                None => partial.data.extend_from_slice(&payload),
            }
            partial.check_text()?;
            return Ok(Step::Consumed);
        }
        let (opcode, data, checked) = match self.partial.take() {
            Some(mut p) => {
                match &mut p.inflater {
                    Some(inflating) => {
                        let inflater = &mut inflating.inflater;
                        inflater
                            .feed(&payload, &mut p.data, max)
                            .map_err(inflate_violation)?;
                        inflater
                            .finish(&mut p.data, max)
                            .map_err(inflate_violation)?;
                    }
                    None => p.data.extend_from_slice(&payload),
                }
                (p.opcode, Bytes::from(p.data), p.checked)
            }
            None if h.rsv1 => {
                let data = deflate::inflate_message(&payload, max).map_err(inflate_violation)?;
                (h.opcode, Bytes::from(data), 0)
            }
            None => (h.opcode, payload, 0),
        };
        match opcode {
            OpCode::Text => {
                // What earlier fragments brought was checked as it came (up to a character
                // boundary).
                if std::str::from_utf8(&data[checked..]).is_err() {
                    return Err(invalid_utf8());
                }
                Ok(Step::Item(Inbound::Text(data)))
            }
            _ => Ok(Step::Item(Inbound::Binary(data))),
        }
    }
}

/// A compressed message that cannot be inflated fails the connection: with 1009 when it
/// inflates past the limit (nothing past the limit was allocated), with 1007 when it is not
/// deflate data (the payload is invalid, as for invalid UTF-8).
fn inflate_violation(e: InflateError) -> ProtocolViolation {
    match e {
        InflateError::TooBig => ProtocolViolation {
            code: close_code::MESSAGE_TOO_BIG,
            reason: "message too big once inflated",
        },
        InflateError::Corrupt => ProtocolViolation {
            code: close_code::INVALID_PAYLOAD,
            reason: "invalid compressed data",
        },
    }
}

/// What one frame amounted to.
enum Step {
    /// The frame is not fully buffered yet; nothing was consumed.
    NeedMore,
    /// The frame was consumed and completed an item.
    Item(Inbound),
    /// The frame was consumed without completing an item (a fragment).
    Consumed,
}

#[derive(Debug)]
struct Header {
    fin: bool,
    rsv1: bool,
    opcode: OpCode,
    mask: [u8; 4],
    len: u64,
    header_len: usize,
}

fn parse_header(buf: &BytesMut) -> Result<Option<Header>, ProtocolViolation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    // RSV2 and RSV3 have no meaning in any extension the gateway negotiates; RSV1 is
    // permessage-deflate's (checked by the reader, which knows whether it was negotiated).
    if b0 & 0x30 != 0 {
        return Err(violation(
            "reserved bits set without a negotiated extension",
        ));
    }
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or_else(|| violation("unknown opcode"))?;
    if b1 & 0x80 == 0 {
        return Err(violation("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(raw);
            if len >> 63 != 0 {
                return Err(violation("frame length has the most significant bit set"));
            }
            (len, 10)
        }
        short => (u64::from(short), 2),
    };
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & RSV1 != 0,
        opcode,
        mask,
        len,
        header_len: at,
    }))
}

/// Takes and unmasks a frame's payload once it is fully buffered.
fn take_payload(buf: &mut BytesMut, h: &Header) -> Option<Bytes> {
    let len = usize::try_from(h.len).ok()?;
    if buf.len() < h.header_len + len {
        return None;
    }
    buf.advance(h.header_len);
    let mut payload = buf.split_to(len);
    unmask(&mut payload, h.mask);
    Some(payload.freeze())
}

fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let v = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Whether a peer may send `code` in a close frame (RFC 6455 §7.4).
///
/// Allowed: the codes RFC 6455 defines for use on the wire (1000–1003, 1007–1011), those IANA
/// registered since (1012 service restart, 1013 try again later — which the gateway sends
/// itself — and 1014 bad gateway), and the ranges for libraries and applications (3000–4999).
/// Everything else is a protocol error: 1004 and 1016–2999 are reserved, 1005, 1006 and 1015
/// only describe a closure locally and must never be sent, and 0–999 and 5000+ are undefined.
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn parse_close(payload: &[u8]) -> Result<Option<u16>, ProtocolViolation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(violation("close frame payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !is_valid_close_code(code) {
                return Err(violation("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(ProtocolViolation {
                    code: close_code::INVALID_PAYLOAD,
                    reason: "close reason is not valid UTF-8",
                });
            }
            Ok(Some(code))
        }
    }
}

/// Builds a masked client frame (tests only).
#[cfg(test)]
fn masked_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        masked_frame(fin, opcode, payload, [0x12, 0x34, 0x56, 0x78])
    }

    fn read_all(reader: &mut FrameReader, bytes: &[u8]) -> Vec<Inbound> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(item) = reader.next(&mut buf).unwrap() {
            out.push(item);
        }
        out
    }

    #[test]
    fn server_frames_use_the_shortest_length_encoding() {
        assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
        let mid = binary(&[7u8; 300]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 44]);
        let big = binary(&vec![0u8; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_000 + 10);
    }

    #[test]
    fn close_frames_carry_the_code_and_a_cut_reason() {
        let frame = close(1001, &"é".repeat(100));
        assert_eq!(frame[0], 0x88);
        assert!(usize::from(frame[1]) <= 125);
        assert_eq!(&frame[2..4], &1001u16.to_be_bytes());
        assert!(std::str::from_utf8(&frame[4..]).is_ok());
    }

    #[test]
    fn masked_text_and_binary_frames_are_unmasked() {
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(true, 1, b"hello world");
        bytes.extend(client_frame(true, 2, &[1, 2, 3]));
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![
                Inbound::Text(Bytes::from_static(b"hello world")),
                Inbound::Binary(Bytes::from_static(&[1, 2, 3]))
            ]
        );
    }

    #[test]
    fn frames_split_at_every_byte_boundary_still_parse() {
        let bytes = client_frame(true, 1, &[b'x'; 200]);
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(1024);
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(r.next(&mut buf).unwrap(), None, "cut at {cut}");
            buf.extend_from_slice(&bytes[cut..]);
            assert_eq!(
                r.next(&mut buf).unwrap(),
                Some(Inbound::Text(Bytes::from(vec![b'x'; 200])))
            );
        }
    }

    #[test]
    fn fragmented_messages_are_reassembled_around_interleaved_pings() {
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(false, 1, b"hel");
        bytes.extend(client_frame(true, 9, b"p"));
        bytes.extend(client_frame(false, 0, b"lo "));
        bytes.extend(client_frame(true, 0, b"you"));
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![
                Inbound::Ping(Bytes::from_static(b"p")),
                Inbound::Text(Bytes::from_static(b"hello you"))
            ]
        );
    }

    #[test]
    fn oversized_frames_are_skipped_and_the_stream_continues() {
        let mut r = FrameReader::new(10);
        let mut bytes = client_frame(true, 1, &[b'a'; 5000]);
        bytes.extend(client_frame(true, 1, b"ok"));
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![
                Inbound::TooLarge { len: 5000 },
                Inbound::Text(Bytes::from_static(b"ok"))
            ]
        );
    }

    #[test]
    fn oversized_fragmented_messages_are_reported_once_and_skipped() {
        let mut r = FrameReader::new(10);
        let mut bytes = client_frame(false, 2, &[1; 8]);
        bytes.extend(client_frame(false, 0, &[1; 8]));
        bytes.extend(client_frame(true, 0, &[1; 8]));
        bytes.extend(client_frame(true, 1, b"next"));
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![
                Inbound::TooLarge { len: 16 },
                Inbound::Text(Bytes::from_static(b"next"))
            ]
        );
    }

    #[test]
    fn oversized_frames_are_skipped_even_when_they_arrive_in_pieces() {
        let mut r = FrameReader::new(10);
        let bytes = client_frame(true, 2, &[9; 100_000]);
        let mut buf = BytesMut::new();
        let mut seen = Vec::new();
        for piece in bytes.chunks(777) {
            buf.extend_from_slice(piece);
            while let Some(item) = r.next(&mut buf).unwrap() {
                seen.push(item);
            }
        }
        assert_eq!(seen, vec![Inbound::TooLarge { len: 100_000 }]);
        assert!(buf.is_empty());
    }

    #[test]
    fn protocol_violations_are_reported_with_a_close_code() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (vec![0x81, 0x02, b'h', b'i'], 1002),         // unmasked
            (vec![0xC1, 0x80, 0, 0, 0, 0], 1002),         // RSV1 set
            (vec![0x83, 0x80, 0, 0, 0, 0], 1002),         // opcode 3
            (client_frame(true, 0, b"x"), 1002),          // orphan continuation
            (client_frame(false, 9, b"x"), 1002),         // fragmented ping
            (client_frame(true, 9, &[0; 126]), 1002),     // long ping
            (client_frame(true, 1, &[0xFF, 0xFE]), 1007), // bad UTF-8
            (client_frame(true, 8, &[3]), 1002),          // 1-byte close
            (
                [client_frame(false, 1, b"a"), client_frame(true, 1, b"b")].concat(),
                1002,
            ),
        ];
        for (bytes, code) in cases {
            let mut r = FrameReader::new(1024);
            let mut buf = BytesMut::from(&bytes[..]);
            let err = loop {
                match r.next(&mut buf) {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("no violation for {bytes:?}"),
                    Err(e) => break e,
                }
            };
            assert_eq!(err.code, code, "{bytes:?}");
        }
    }

    #[test]
    fn invalid_utf8_fails_the_connection_at_the_fragment_that_brings_it() {
        // Autobahn 6.4.1: the message's first fragment is valid, the second is not, the third
        // never comes (the suite waits for the server to fail the connection first).
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(false, 1, "\u{3ba}\u{1f79}".as_bytes());
        bytes.extend(client_frame(false, 0, &[0xF4, 0x90, 0x80, 0x80]));
        let mut buf = BytesMut::from(&bytes[..]);
        match r.next(&mut buf) {
            Err(e) => assert_eq!(e.code, close_code::INVALID_PAYLOAD),
            Ok(None) => panic!("invalid UTF-8 accepted until the message ends"),
            Ok(Some(item)) => panic!("unexpected {item:?}"),
        }
    }

    #[test]
    fn characters_cut_between_fragments_are_valid_text() {
        // 6.4.2's valid prefix: a fragment may end inside a character.
        let text = "\u{3ba}\u{1f79}\u{3c3}\u{1f10}\u{3bc}\u{3b5} \u{1F600}";
        for cut in 0..=text.len() {
            let mut r = FrameReader::new(1024);
            let mut bytes = client_frame(false, 1, &text.as_bytes()[..cut]);
            bytes.extend(client_frame(true, 0, &text.as_bytes()[cut..]));
            assert_eq!(
                read_all(&mut r, &bytes),
                vec![Inbound::Text(Bytes::from(text))],
                "cut at {cut}"
            );
        }
        // An unfinished character at the very end is still invalid.
        let mut r = FrameReader::new(1024);
        let mut bytes = client_frame(false, 1, b"ok");
        bytes.extend(client_frame(true, 0, &[0xE2, 0x82]));
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            r.next(&mut buf).unwrap_err().code,
            close_code::INVALID_PAYLOAD
        );
    }

    #[test]
    fn close_frames_report_their_code() {
        let mut r = FrameReader::new(1024);
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut bytes = client_frame(true, 8, &payload);
        bytes.extend(client_frame(true, 8, &[]));
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![Inbound::Close(Some(1000)), Inbound::Close(None)]
        );
    }

    /// Parses one close frame carrying `code` and `reason`.
    fn close_with(code: u16, reason: &[u8]) -> Result<Option<Inbound>, ProtocolViolation> {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason);
        let mut buf = BytesMut::from(&client_frame(true, 8, &payload)[..]);
        FrameReader::new(1024).next(&mut buf)
    }

    /// The codes RFC 6455 §7.4 forbids on the wire, one from each forbidden range and every
    /// boundary.
    const INVALID_CLOSE_CODES: [u16; 12] = [
        0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
    ];

    #[test]
    fn close_frames_with_an_invalid_code_are_a_protocol_error() {
        for code in INVALID_CLOSE_CODES {
            let err = close_with(code, b"").unwrap_err();
            assert_eq!(err.code, close_code::PROTOCOL_ERROR, "close code {code}");
            assert!(!is_valid_close_code(code), "{code}");
        }
    }

    #[test]
    fn close_frames_with_a_valid_code_report_it() {
        let valid = (1000..=1003).chain(1007..=1014).chain(3000..=4999);
        for code in valid {
            assert_eq!(
                close_with(code, b"bye").unwrap(),
                Some(Inbound::Close(Some(code))),
                "close code {code}"
            );
        }
    }

    #[test]
    fn every_close_code_outside_the_allowed_ranges_is_refused() {
        for code in 0..=u16::MAX {
            let allowed = (1000..=1003).contains(&code)
                || (1007..=1014).contains(&code)
                || (3000..=4999).contains(&code);
            assert_eq!(close_with(code, b"").is_ok(), allowed, "close code {code}");
        }
    }

    #[test]
    fn close_frames_with_a_one_byte_payload_or_a_bad_reason_fail_the_connection() {
        let mut buf = BytesMut::from(&client_frame(true, 8, &[0x03])[..]);
        let err = FrameReader::new(1024).next(&mut buf).unwrap_err();
        assert_eq!(err.code, close_code::PROTOCOL_ERROR);
        // A reason that is not UTF-8 is invalid payload data, as for a text message.
        let err = close_with(1000, &[0xCE, 0xBA, 0xE1, 0xBD]).unwrap_err();
        assert_eq!(err.code, close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn huge_announced_length_does_not_allocate() {
        let mut r = FrameReader::new(1024);
        let mut bytes = vec![0x82, 0x80 | 127];
        bytes.extend_from_slice(&(1u64 << 62).to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0, 1, 2, 3]);
        assert_eq!(
            read_all(&mut r, &bytes),
            vec![Inbound::TooLarge { len: 1 << 62 }]
        );
    }
}

#[cfg(test)]
mod deflate_tests {
    use super::*;

    const MASK: [u8; 4] = [9, 8, 7, 6];
    /// RSV1 in a frame's first byte (with `masked_frame`'s opcode argument).
    const COMPRESSED: u8 = 0x40;

    fn reader(max: usize) -> FrameReader {
        FrameReader::new(max).with_deflate(true)
    }

    fn all(r: &mut FrameReader, bytes: &[u8]) -> Result<Vec<Inbound>, ProtocolViolation> {
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(item) = r.next(&mut buf)? {
            out.push(item);
        }
        Ok(out)
    }

    fn text(s: &str) -> Inbound {
        Inbound::Text(Bytes::from(s.as_bytes().to_vec()))
    }

    #[test]
    fn a_compressed_message_is_inflated() {
        let msg = "{\"type\":\"room.join\",\"room\":\"news\"} ".repeat(10);
        let packed = deflate::compress(msg.as_bytes()).unwrap();
        let mut bytes = masked_frame(true, COMPRESSED | 1, &packed, MASK);
        // Uncompressed messages stay allowed on the same connection.
        bytes.extend(masked_frame(true, 1, b"plain", MASK));
        assert_eq!(
            all(&mut reader(1024), &bytes).unwrap(),
            vec![text(&msg), text("plain")]
        );
    }

    #[test]
    fn a_fragmented_compressed_message_is_inflated_around_a_ping() {
        let msg = "fragmented and compressed, ".repeat(40);
        let packed = deflate::compress(msg.as_bytes()).unwrap();
        let (a, rest) = packed.split_at(5);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut bytes = masked_frame(false, COMPRESSED | 1, a, MASK);
        bytes.extend(masked_frame(false, 0, b, MASK));
        bytes.extend(masked_frame(true, 9, b"p", MASK));
        bytes.extend(masked_frame(true, 0, c, MASK));
        assert_eq!(
            all(&mut reader(4096), &bytes).unwrap(),
            vec![Inbound::Ping(Bytes::from_static(b"p")), text(&msg)]
        );
    }

    #[test]
    fn a_zip_bomb_fails_with_1009_without_buffering_past_the_limit() {
        let bomb = deflate::compress(&vec![b'a'; 4 << 20]).unwrap();
        let err = all(
            &mut reader(64 * 1024),
            &masked_frame(true, COMPRESSED | 2, &bomb, MASK),
        );
        assert_eq!(err.unwrap_err().code, close_code::MESSAGE_TOO_BIG);
        // In fragments: refused at the fragment that passes the limit, holding at most it.
        let mut r = reader(64 * 1024);
        let mut buf = BytesMut::new();
        let mut result = Ok(None);
        for (i, piece) in bomb.chunks(64).enumerate() {
            let op = if i == 0 { COMPRESSED | 2 } else { 0 };
            buf.extend(masked_frame(false, op, piece, MASK));
            result = r.next(&mut buf);
            assert!(r.buffered() <= 64 * 1024);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.unwrap_err().code, close_code::MESSAGE_TOO_BIG);
    }

    #[test]
    fn invalid_compressed_data_fails_with_1007() {
        let err = all(
            &mut reader(1024),
            &masked_frame(true, COMPRESSED | 1, &[0xff; 8], MASK),
        );
        assert_eq!(err.unwrap_err().code, close_code::INVALID_PAYLOAD);
        // Valid deflate data whose text is not UTF-8.
        let packed = deflate::compress(&[0xC3; 300]).unwrap();
        let err = all(
            &mut reader(1024),
            &masked_frame(true, COMPRESSED | 1, &packed, MASK),
        );
        assert_eq!(err.unwrap_err().code, close_code::INVALID_PAYLOAD);
    }

    #[test]
    fn rsv1_is_a_protocol_error_without_deflate_on_control_frames_and_on_continuations() {
        let packed = deflate::compress(&[b'x'; 300]).unwrap();
        let err = all(
            &mut FrameReader::new(1024),
            &masked_frame(true, COMPRESSED | 1, &packed, MASK),
        );
        assert_eq!(err.unwrap_err().code, close_code::PROTOCOL_ERROR);
        let err = all(
            &mut reader(1024),
            &masked_frame(true, COMPRESSED | 9, b"", MASK),
        );
        assert_eq!(err.unwrap_err().code, close_code::PROTOCOL_ERROR);
        let mut bytes = masked_frame(false, 1, b"a", MASK);
        bytes.extend(masked_frame(true, COMPRESSED, b"b", MASK));
        assert_eq!(
            all(&mut reader(1024), &bytes).unwrap_err().code,
            close_code::PROTOCOL_ERROR
        );
        // RSV2 and RSV3 mean nothing even with deflate.
        let err = all(&mut reader(1024), &masked_frame(true, 0x20 | 1, b"a", MASK));
        assert_eq!(err.unwrap_err().code, close_code::PROTOCOL_ERROR);
    }

    #[test]
    fn a_message_too_big_and_corrupt_fails_whichever_the_inflater_meets_first() {
        // Found by the inflater fuzz target (its input written out): 88 bytes that inflate past
        // 1 KiB and are invalid further on. In one frame the decompressor, decoding ahead into
        // its window, meets the bad data first (1007); in 41-byte fragments the output passes
        // the limit first (1009). Either way the connection fails and nothing past the limit
        // is held.
        let payload: &[u8] = &[
            0xec, 0xc1, 0x31, 0x01, 0x00, 0x00, 0x00, 0xc2, 0xa0, 0xf5, 0x4f, 0x6d, 0x06, 0x7f,
            0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x2e,
            0x2b, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80, 0xd7, 0x00,
        ];
        let failure = |bytes: &[u8]| {
            let mut r = reader(1024);
            let mut buf = BytesMut::from(bytes);
            match r.next(&mut buf) {
                Ok(item) => panic!("no failure but {item:?}"),
                Err(v) => {
                    assert!(r.buffered() <= 1024);
                    v.code
                }
            }
        };
        let whole = failure(&masked_frame(true, COMPRESSED | 2, payload, MASK));
        let mut fragmented = Vec::new();
        let parts: Vec<&[u8]> = payload.chunks(41).collect();
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 { COMPRESSED | 2 } else { 0 };
            fragmented.extend(masked_frame(i + 1 == parts.len(), op, part, MASK));
        }
        let pieces = failure(&fragmented);
        for code in [whole, pieces] {
            assert!(
                [close_code::INVALID_PAYLOAD, close_code::MESSAGE_TOO_BIG].contains(&code),
                "{code}"
            );
        }
    }

    #[test]
    fn a_compressed_frame_over_the_limit_on_the_wire_is_skipped_unread() {
        let mut bytes = masked_frame(true, COMPRESSED | 2, &[0u8; 2000], MASK);
        bytes.extend(masked_frame(true, 1, b"next", MASK));
        assert_eq!(
            all(&mut reader(1024), &bytes).unwrap(),
            vec![Inbound::TooLarge { len: 2000 }, text("next")]
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_never_buffer_past_the_limit(
            data in proptest::collection::vec(any::<u8>(), 0..4096),
            cut in 0usize..4096,
        ) {
            let mut r = FrameReader::new(64);
            let mut buf = BytesMut::new();
            let cut = cut.min(data.len());
            for piece in [&data[..cut], &data[cut..]] {
                buf.extend_from_slice(piece);
                loop {
                    match r.next(&mut buf) {
                        Ok(Some(Inbound::Text(t) | Inbound::Binary(t))) => prop_assert!(t.len() <= 64),
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }

        #[test]
        fn messages_survive_any_fragmentation_and_any_read_boundaries(
            messages in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..300), 1usize..4, any::<[u8; 4]>()),
                1..8,
            ),
            chunk in 1usize..97,
        ) {
            let mut wire = Vec::new();
            for (payload, parts, mask) in &messages {
                let size = payload.len().div_ceil(*parts).max(1);
                let pieces: Vec<&[u8]> = if payload.is_empty() { vec![&[][..]] } else { payload.chunks(size).collect() };
                for (i, piece) in pieces.iter().enumerate() {
                    let opcode = if i == 0 { 2 } else { 0 };
                    wire.extend(masked_frame(i + 1 == pieces.len(), opcode, piece, *mask));
                }
            }
            let mut r = FrameReader::new(1024);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                buf.extend_from_slice(piece);
                while let Some(item) = r.next(&mut buf).unwrap() {
                    got.push(item);
                }
            }
            let want: Vec<Inbound> = messages.iter().map(|(p, _, _)| Inbound::Binary(Bytes::from(p.clone()))).collect();
            prop_assert_eq!(got, want);
        }
    }
}
