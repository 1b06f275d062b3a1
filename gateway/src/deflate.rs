//! permessage-deflate (RFC 7692): the offer/response negotiation, compressing a published
//! message once for all its recipients, and the bounded inflater for what clients send.
//!
//! Both directions run without context takeover: every message is a deflate stream of its own.
//! That is what lets one compressed frame serve every recipient of a fan-out, and what lets a
//! connection keep no zlib state while it is idle: compressors and decompressors are
//! per-thread, reset for each message. Only a fragmented compressed message being received
//! holds a decompressor of its own, until its last fragment.

use std::cell::RefCell;

use axum::http::{HeaderMap, HeaderValue, header};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const EXTENSION: &str = "permessage-deflate";

/// What RFC 7692 §7.2.1 has the sender remove from each compressed message, and the receiver
/// append before inflating (the end of an empty stored block: a sync flush marker).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The window the compressor uses (miniz_oxide's only one: 32 KiB).
const WINDOW_BITS: u8 = 15;

/// What a connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Whether messages to this client may go compressed. False when the client limited the
    /// server's window below 32 KiB (`server_max_window_bits` < 15): the compressor cannot
    /// honour a smaller window, so such a client gets every message uncompressed, which
    /// RFC 7692 allows; its own messages may still be compressed.
    pub compress_outbound: bool,
}

/// Picks the first `permessage-deflate` offer of the request that can be honoured, and the
/// `Sec-WebSocket-Extensions` value that accepts it. `None` (no extension) when there is no
/// such offer: an offer with an unknown, repeated or out-of-range parameter is declined, as
/// RFC 7692 §5 requires, and so is a header that does not parse — the upgrade goes on
/// without compression rather than failing.
pub fn negotiate(headers: &HeaderMap) -> Option<(Negotiated, HeaderValue)> {
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let Ok(value) = value.to_str() else { continue };
        let Some(offers) = parse_extensions(value) else {
            continue;
        };
        for offer in offers {
            if !offer.name.eq_ignore_ascii_case(EXTENSION) {
                continue;
            }
            if let Some(accepted) = accept(&offer.params) {
                return Some(accepted);
            }
        }
    }
    None
}

/// One element of an extension list: `name; param; param=value`.
#[derive(Debug, PartialEq, Eq)]
struct Offer {
    name: String,
    params: Vec<(String, Option<String>)>,
}

/// Parses an RFC 6455 §9.1 extension list. Values may be tokens or quoted strings. An
/// element that does not follow the grammar is left out (it may be another extension's
/// business); `None` when the list itself cannot be split (an unterminated quote).
fn parse_extensions(text: &str) -> Option<Vec<Offer>> {
    Some(
        split_outside_quotes(text, ',')?
            .into_iter()
            .filter_map(parse_element)
            .collect(),
    )
}

fn parse_element(element: &str) -> Option<Offer> {
    let mut parts = split_outside_quotes(element.trim(), ';')?.into_iter();
    let name = parts.next()?.trim();
    if !is_token(name) {
        // Also `1#element`'s empty elements.
        return None;
    }
    let mut params = Vec::new();
    for part in parts {
        let (key, value) = match part.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
            None => (part.trim(), None),
        };
        if !is_token(key) || value.as_deref().is_some_and(|v| !is_token(v)) {
            return None;
        }
        params.push((key.to_ascii_lowercase(), value));
    }
    Some(Offer {
        name: name.to_owned(),
        params,
    })
}

/// Splits at `sep` where it is not inside a quoted string; `None` for an unterminated quote.
fn split_outside_quotes(text: &str, sep: char) -> Option<Vec<&str>> {
    let mut out = Vec::new();
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&text[start..i]);
            start = i + c.len_utf8();
        }
    }
    if quoted {
        return None;
    }
    out.push(&text[start..]);
    Some(out)
}

/// A parameter value: a token, or a quoted string (whose content must then be a token too,
/// RFC 6455 §9.1).
fn unquote(value: &str) -> Option<String> {
    match value.strip_prefix('"') {
        None => Some(value.to_owned()),
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                out.push(if c == '\\' { chars.next()? } else { c });
            }
            Some(out)
        }
    }
}

/// An HTTP token (RFC 7230 §3.2.6).
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A window size parameter: 8 to 15, in decimal without a sign or leading zero.
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// Accepts one offer, or declines it (`None`).
///
/// The response always carries both `*_no_context_takeover` parameters (a server may add them
/// to any offer): every message is then a deflate stream of its own in both directions. It
/// never limits the client's window (`client_max_window_bits`): the inflater has a 32 KiB
/// window, enough for any client.
fn accept(params: &[(String, Option<String>)]) -> Option<(Negotiated, HeaderValue)> {
    let mut seen: Vec<&str> = Vec::with_capacity(params.len());
    let mut server_bits = None;
    for (key, value) in params {
        if seen.contains(&key.as_str()) {
            return None;
        }
        seen.push(key);
        match (key.as_str(), value.as_deref()) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            ("server_max_window_bits", Some(v)) => server_bits = Some(window_bits(v)?),
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", Some(v)) => {
                window_bits(v)?;
            }
            _ => return None,
        }
    }
    let mut response =
        format!("{EXTENSION}; server_no_context_takeover; client_no_context_takeover");
    if let Some(bits) = server_bits {
        // Accepting an offer with server_max_window_bits means answering it with a value no
        // larger (RFC 7692 §7.1.2.1); below 15 the messages to this client go uncompressed.
        response.push_str(&format!("; server_max_window_bits={bits}"));
    }
    let negotiated = Negotiated {
        compress_outbound: server_bits.is_none_or(|bits| bits >= WINDOW_BITS),
    };
    Some((negotiated, HeaderValue::from_str(&response).ok()?))
}

thread_local! {
    /// The thread's compressor, reset before each message: compressing holds no state between
    /// messages, and costs no memory per connection.
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::default(), false));
    /// The thread's decompressor for messages that arrive in one frame.
    static DECOMPRESSOR: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Compresses one message's payload for a compressed frame (RSV1 set), or `None` when
/// compressing would not make it smaller: it then goes as it is, which RFC 7692 allows.
pub fn compress(payload: &[u8]) -> Option<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        c.reset();
        // Room for the message as it is plus the flush marker that is cut off: a result that
        // does not fit would not be smaller.
        let mut out = Vec::with_capacity(payload.len() + TAIL.len());
        let status = c.compress_vec(payload, &mut out, FlushCompress::Sync);
        let done = matches!(status, Ok(Status::Ok))
            && c.total_in() == payload.len() as u64
            && out.len() < out.capacity()
            && out.ends_with(&TAIL);
        if !done {
            return None;
        }
        out.truncate(out.len() - TAIL.len());
        (out.len() < payload.len()).then_some(out)
    })
}

/// Why a compressed message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit (a zip bomb, or just too big): close 1009.
    #[error("message too big once inflated")]
    TooBig,
    /// It is not valid deflate data: close 1007.
    #[error("invalid compressed data")]
    Corrupt,
}

/// Inflates a message that arrived in one frame, into at most `max` bytes.
///
/// # Errors
/// [`InflateError`] when the message inflates past `max` or is not valid deflate data.
pub fn inflate_message(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        // A full reset zeroes the window too: a message that refers back before its own start
        // must find zeros there, never another client's last message.
        d.reset(false);
        let mut out = Vec::new();
        inflate_into(&mut d, compressed, &mut out, max)
            .and_then(|ended| finish(&mut d, ended, &mut out, max))
            .map(|()| out)
    })
}

/// A compressed message arriving in fragments: the one piece of zlib state a connection holds,
/// and only until the message's last fragment.
pub struct FragmentInflater {
    state: Decompress,
    /// The deflate stream ended (a final block) before the message did.
    ended: bool,
}

impl std::fmt::Debug for FragmentInflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FragmentInflater")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Default for FragmentInflater {
    fn default() -> Self {
        Self::new()
    }
}

impl FragmentInflater {
    /// A fresh decompressor for one message.
    pub fn new() -> Self {
        Self {
            state: Decompress::new(false),
            ended: false,
        }
    }

    /// Inflates one fragment's payload onto `out`, which never grows past `max` bytes.
    ///
    /// # Errors
    /// [`InflateError`] as for [`inflate_message`].
    pub fn feed(
        &mut self,
        fragment: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        if self.ended {
            return extra_after_end(fragment);
        }
        self.ended = inflate_into(&mut self.state, fragment, out, max)?;
        Ok(())
    }

    /// Ends the message: inflates what the flush marker completes.
    ///
    /// # Errors
    /// [`InflateError`] as for [`inflate_message`].
    pub fn finish(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        finish(&mut self.state, self.ended, out, max)
    }
}

/// Appends the flush marker the sender removed (RFC 7692 §7.2.2) and inflates it.
fn finish(
    d: &mut Decompress,
    ended: bool,
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), InflateError> {
    if ended {
        // A final block ended the stream; the appended marker would be trailing bytes.
        return Ok(());
    }
    inflate_into(d, &TAIL, out, max).map(|_| ())
}

/// Data after a deflate stream's final block, within the same message: only empty frames may
/// follow.
fn extra_after_end(input: &[u8]) -> Result<(), InflateError> {
    if input.is_empty() {
        Ok(())
    } else {
        Err(InflateError::Corrupt)
    }
}

/// Inflates `input` onto `out`, never letting `out` hold (or allocate room for) more than
/// `max` bytes. Returns whether the deflate stream ended (a final block).
fn inflate_into(
    d: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<bool, InflateError> {
    let mut consumed = 0usize;
    loop {
        let room = max.saturating_sub(out.len());
        if room == 0 {
            // Full: one more byte of output means the message is over the limit. Probe with a
            // byte on the stack rather than allocating past the bound.
            let mut probe = [0u8; 1];
            let before = (d.total_in(), d.total_out());
            let status = d
                .decompress(&input[consumed..], &mut probe, FlushDecompress::None)
                .map_err(|_| InflateError::Corrupt)?;
            if d.total_out() > before.1 {
                return Err(InflateError::TooBig);
            }
            consumed += (d.total_in() - before.0) as usize;
            match status {
                Status::StreamEnd => return extra_after_end(&input[consumed..]).map(|()| true),
                _ if consumed == input.len() => return Ok(false),
                _ if d.total_in() == before.0 => return Err(InflateError::Corrupt),
                _ => continue,
            }
        }
        // Grow geometrically from a guess, within the bound.
        let want = (input.len() - consumed)
            .saturating_mul(4)
            .max(out.len())
            .max(256);
        let grow = want.min(room);
        out.reserve_exact(grow);
        let start = out.len();
        out.resize(start + grow, 0);
        let before = (d.total_in(), d.total_out());
        let result = d.decompress(&input[consumed..], &mut out[start..], FlushDecompress::None);
        let produced = (d.total_out() - before.1) as usize;
        out.truncate(start + produced);
        let status = result.map_err(|_| InflateError::Corrupt)?;
        consumed += (d.total_in() - before.0) as usize;
        match status {
            Status::StreamEnd => return extra_after_end(&input[consumed..]).map(|()| true),
            // All input taken and the output not full: nothing more is pending.
            _ if consumed == input.len() && produced < grow => return Ok(false),
            // No progress with room to spare: the input is stuck (cannot happen with valid data).
            _ if produced == 0 && d.total_in() == before.0 => return Err(InflateError::Corrupt),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(value: &str) -> Option<(Negotiated, String)> {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_str(value).unwrap(),
        );
        negotiate(&h).map(|(n, v)| (n, v.to_str().unwrap().to_owned()))
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn a_bare_offer_is_accepted_without_context_takeover_either_way() {
        let (n, v) = offer("permessage-deflate").unwrap();
        assert_eq!(v, BOTH);
        assert!(n.compress_outbound);
    }

    #[test]
    fn browser_offers_are_accepted_without_limiting_the_clients_window() {
        // Chrome's and Firefox's offer.
        let (n, v) = offer("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(v, BOTH);
        assert!(n.compress_outbound);
        let (_, v) = offer("permessage-deflate; client_max_window_bits=10").unwrap();
        assert_eq!(v, BOTH);
        let (_, v) =
            offer("permessage-deflate;client_no_context_takeover;server_no_context_takeover")
                .unwrap();
        assert_eq!(v, BOTH);
    }

    #[test]
    fn a_smaller_server_window_is_acknowledged_and_messages_to_that_client_go_uncompressed() {
        let (n, v) = offer("permessage-deflate; server_max_window_bits=10").unwrap();
        assert_eq!(v, format!("{BOTH}; server_max_window_bits=10"));
        assert!(!n.compress_outbound);
        let (n, v) = offer("permessage-deflate; server_max_window_bits=\"15\"").unwrap();
        assert_eq!(v, format!("{BOTH}; server_max_window_bits=15"));
        assert!(n.compress_outbound);
    }

    #[test]
    fn offers_that_cannot_be_honoured_are_declined_and_the_next_one_is_tried() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=\"8",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(offer(bad), None, "{bad}");
        }
        let (_, v) = offer(
            "permessage-deflate; unknown, permessage-deflate; server_max_window_bits=12, \
             permessage-deflate",
        )
        .unwrap();
        assert_eq!(v, format!("{BOTH}; server_max_window_bits=12"));
        let (_, v) = offer("foo; a=\"x,y\", permessage-deflate").unwrap();
        assert_eq!(v, BOTH);
        let (_, v) = offer("foo; a=\"b\"; c, permessage-deflate").unwrap();
        assert_eq!(v, BOTH);
    }

    #[test]
    fn offers_may_span_several_headers() {
        let mut h = HeaderMap::new();
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; bogus"),
        );
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
        );
        assert!(negotiate(&h).is_some());
        assert!(negotiate(&HeaderMap::new()).is_none());
    }

    fn json(len: usize) -> Vec<u8> {
        let mut s = String::from("{\"items\":[");
        let mut i = 0;
        while s.len() < len {
            s.push_str(&format!(
                "{{\"id\":{i},\"name\":\"item {i}\",\"ok\":true}},"
            ));
            i += 1;
        }
        s.truncate(len);
        s.into_bytes()
    }

    #[test]
    fn compressed_messages_inflate_back_and_are_smaller() {
        let msg = json(1024);
        let packed = compress(&msg).unwrap();
        assert!(packed.len() < msg.len() / 2, "{}", packed.len());
        assert!(!packed.ends_with(&TAIL));
        assert_eq!(inflate_message(&packed, 1024).unwrap(), msg);
        // Each message is a stream of its own: the same input gives the same bytes.
        assert_eq!(compress(&msg).unwrap(), packed);
    }

    #[test]
    fn incompressible_messages_are_not_compressed() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..2000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        assert_eq!(compress(&noise), None);
        assert_eq!(compress(b""), None);
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        let bomb = compress(&vec![0u8; 10 << 20]).unwrap();
        assert!(bomb.len() < 20_000);
        assert_eq!(inflate_message(&bomb, 1 << 20), Err(InflateError::TooBig));
        let exact = compress(&vec![b'a'; 4096]).unwrap();
        assert_eq!(inflate_message(&exact, 4096).unwrap().len(), 4096);
        assert_eq!(inflate_message(&exact, 4095), Err(InflateError::TooBig));
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(
            inflate_message(&[0xff; 10], 100),
            Err(InflateError::Corrupt)
        );
    }

    #[test]
    fn fragments_inflate_to_the_same_message_wherever_they_are_cut() {
        let msg = json(5000);
        let packed = compress(&msg).unwrap();
        for cut in [0, 1, 7, packed.len() / 2, packed.len()] {
            let mut f = FragmentInflater::new();
            let mut out = Vec::new();
            f.feed(&packed[..cut], &mut out, 5000).unwrap();
            f.feed(&packed[cut..], &mut out, 5000).unwrap();
            f.finish(&mut out, 5000).unwrap();
            assert_eq!(out, msg, "cut at {cut}");
        }
    }

    #[test]
    fn a_final_block_may_end_the_message() {
        // Some clients finish each message's stream instead of flushing it.
        let mut c = Compress::new(Compression::default(), false);
        let mut packed = Vec::with_capacity(100);
        c.compress_vec(b"hello hello hello", &mut packed, FlushCompress::Finish)
            .unwrap();
        assert_eq!(inflate_message(&packed, 100).unwrap(), b"hello hello hello");
        packed.push(0);
        assert_eq!(inflate_message(&packed, 100), Err(InflateError::Corrupt));
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// `cargo test --release -p wsgate --lib deflate::cost -- --ignored --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    fn compress_and_inflate_cost_per_message() {
        let mut s = String::from("{\"name\":\"prices\",\"data\":[");
        let mut x = 88172645463325252u64;
        while s.len() < 1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.push_str(&format!(
                "{{\"id\":{},\"symbol\":\"S{}\",\"price\":{}.{},\"qty\":{}}},",
                x % 1_000_000,
                x % 9973,
                (x >> 20) % 1000,
                (x >> 30) % 100,
                (x >> 40) % 500
            ));
        }
        s.push_str("{}]}");
        let msg = s.into_bytes();
        for level in [1, 6] {
            let mut c = Compress::new(Compression::new(level), false);
            let n = 20_000;
            let start = std::time::Instant::now();
            let mut size = 0;
            for _ in 0..n {
                c.reset();
                let mut out = Vec::with_capacity(msg.len() + 4);
                let _ = c.compress_vec(&msg, &mut out, FlushCompress::Sync);
                size = out.len() - 4;
            }
            let per = start.elapsed() / n;
            println!(
                "level {level}: {} -> {size} B, {per:?} per message",
                msg.len()
            );
        }
        let packed = compress(&msg).unwrap();
        let n = 20_000;
        let start = std::time::Instant::now();
        for _ in 0..n {
            let _ = inflate_message(&packed, 1 << 20).unwrap();
        }
        println!("inflate: {:?} per message", start.elapsed() / n);
    }
}
