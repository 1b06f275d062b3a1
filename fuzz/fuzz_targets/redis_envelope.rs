//! The `redis_envelope` check (`fuzz-checks/src/redis_envelope.rs`) under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsgate_fuzz_checks::redis_envelope::run(data));
