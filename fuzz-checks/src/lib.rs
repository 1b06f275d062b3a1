//! The checks behind the fuzz targets: one module per parser of untrusted input, each with a
//! `run(data)` that feeds one input to the gateway's own code and panics when an invariant
//! breaks (docs/fuzzing.md).
//!
//! Two drivers run them. `fuzz/` wraps each in a cargo-fuzz target (libFuzzer, coverage
//! guided, for minutes or hours: `make fuzz`). This crate's own test (`tests/bounded.rs`) runs
//! every check on its committed seeds (`fuzz/seeds/TARGET/`) and on a bounded number of
//! mutations of them, within `cargo test` — so CI exercises every check on each commit, and a
//! check that no longer compiles fails CI rather than the next fuzzing session.
//!
//! A new target is a module here, an entry in [`TARGETS`], a file in `fuzz/fuzz_targets/`, a
//! `[[bin]]` entry in `fuzz/Cargo.toml` and a folder of seeds. A target for a streaming decoder
//! (such as a permessage-deflate inflater) feeds its input through [`pieces`] exactly as
//! `frame_reader` does, and checks that the output does not depend on where the input was cut.

pub mod client_command;
pub mod frame_reader;
pub mod inflater;
pub mod publish_body;
pub mod redis_envelope;

/// A check: runs one input, panics when an invariant breaks.
pub type Check = fn(&[u8]);

/// Every check by its target's name (the name of its cargo-fuzz binary and seed folder).
pub const TARGETS: &[(&str, Check)] = &[
    ("frame_reader", frame_reader::run),
    ("client_command", client_command::run),
    ("redis_envelope", redis_envelope::run),
    ("publish_body", publish_body::run),
    ("inflater", inflater::run),
];

/// Cuts `data` into consecutive pieces whose lengths come from `sizes` (each entry is a piece
/// of `1 + entry` bytes, cycling through the entries; one piece when `sizes` is empty). Every
/// byte of `data` is in exactly one piece, in order.
pub fn pieces<'a>(data: &'a [u8], sizes: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    let mut rest = data;
    let mut next = 0usize;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = match sizes.get(next % sizes.len().max(1)) {
            Some(&s) => (usize::from(s) + 1).min(rest.len()),
            None => rest.len(),
        };
        next += 1;
        let (piece, tail) = rest.split_at(len);
        rest = tail;
        Some(piece)
    })
}

/// The payload of one unmasked, final frame as the gateway encodes it (`wsgate::frame`).
///
/// # Panics
/// When `frame` is not exactly one such frame: that is a bug the target reports.
pub fn server_payload(frame: &[u8]) -> &[u8] {
    assert!(frame.len() >= 2, "frame too short");
    assert_eq!(frame[0] & 0xF0, 0x80, "final, no reserved bits");
    assert_eq!(frame[1] & 0x80, 0, "server frames are unmasked");
    let (len, at) = match frame[1] & 0x7F {
        126 => (usize::from(u16::from_be_bytes([frame[2], frame[3]])), 4),
        127 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&frame[2..10]);
            (
                usize::try_from(u64::from_be_bytes(raw)).expect("length fits"),
                10,
            )
        }
        n => (usize::from(n), 2),
    };
    assert_eq!(
        frame.len(),
        at + len,
        "the length field covers the payload exactly"
    );
    &frame[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_input_in_order() {
        let data: Vec<u8> = (0..50).collect();
        let cut: Vec<&[u8]> = pieces(&data, &[0, 4, 200]).collect();
        assert_eq!(cut[0], &[0]);
        assert_eq!(cut[1], &[1, 2, 3, 4, 5]);
        assert_eq!(cut.concat(), data);
        assert_eq!(pieces(&data, &[]).count(), 1);
        assert_eq!(pieces(&[], &[1]).count(), 0);
    }
}
