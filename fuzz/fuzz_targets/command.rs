//! The SMTP command parser: any line gets a command or a reply, never a panic; replies are
//! well-formed (a 5xx with an enhanced status).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|line: &[u8]| {
    if let Err(reply) = baton_smtp::command::parse_command(line) {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        assert!(out.starts_with(b"5"), "{:?}", String::from_utf8_lossy(&out));
        assert!(out.ends_with(b"\r\n"));
    }
});
