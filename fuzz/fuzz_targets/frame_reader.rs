//! The `frame_reader` check (`fuzz-checks/src/frame_reader.rs`) under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsgate_fuzz_checks::frame_reader::run(data));
