//! Reports that come back are written by anyone who can reach the MX: reading one (and the
//! return-path token in its address) never panics, never gives more than 1,000 records, and
//! a hard verdict only ever goes with an address class.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let records = baton_bounce::read(data, None);
    assert!(records.len() <= 1000);
    for r in &records {
        if r.hard {
            assert!(
                matches!(
                    r.class,
                    baton_bounce::Class::InvalidRecipient | baton_bounce::Class::BadDomain
                ),
                "{r:?}"
            );
        }
    }
    let text = String::from_utf8_lossy(data);
    let _ = baton_bounce::classify_reply(&text);
    let tokens = baton::returns::token::Tokens::new(b"a fuzzing key, 32 bytes long....");
    let _ = tokens.in_address(&text);
    let _ = tokens.find_in(&text);
});
