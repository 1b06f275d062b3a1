//! The `client_command` check (`fuzz-checks/src/client_command.rs`) under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wsgate_fuzz_checks::client_command::run(data));
