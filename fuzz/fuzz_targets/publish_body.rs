//! The `publish_body` check (`fuzz-checks/src/publish_body.rs`) under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsgate_fuzz_checks::publish_body::run(data));
