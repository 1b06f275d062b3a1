//! The `inflater` check (`fuzz-checks/src/inflater.rs`) under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsgate_fuzz_checks::inflater::run(data));
