//! The configuration parser: any text gets a configuration or errors with line numbers,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(errors) = baton::config::Config::parse(text) {
        assert!(!errors.is_empty());
    }
});
