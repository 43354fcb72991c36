#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| rallypoint_server::fuzzing::control_message(data));
