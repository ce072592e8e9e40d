//! The DATA reader, differentially: however the bytes are split into reads, the body, the
//! outcome and the bytes consumed are the same (a message must not end, or smuggle, depending
//! on packet boundaries). The first input byte picks the split size.
#![no_main]

use baton_smtp::data::{DataOutcome, DataReader};
use libfuzzer_sys::fuzz_target;

const LIMIT: u64 = 4096;

fn read(input: &[u8], chunk: usize) -> (Vec<u8>, usize, Option<DataOutcome>) {
    let mut reader = DataReader::new(LIMIT);
    let mut out = Vec::new();
    let mut used = 0;
    while used < input.len() {
        let end = (used + chunk).min(input.len());
        let len = end - used;
        let (n, outcome) = reader.feed(&input[used..end], &mut out);
        assert!(n <= len);
        used += n;
        if outcome.is_some() {
            return (out, used, outcome);
        }
        assert_eq!(n, len, "a read that did not end uses everything");
    }
    (out, used, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 16) + 1;
    let whole = read(input, input.len().max(1));
    let pieces = read(input, chunk);
    assert_eq!(whole, pieces, "chunk size {chunk}");
    let (body, _, outcome) = whole;
    if outcome == Some(DataOutcome::Complete) {
        assert!(body.len() as u64 <= LIMIT);
        assert!(body.is_empty() || body.ends_with(b"\r\n"));
        // No bare line ends survive into a complete body.
        for (i, &b) in body.iter().enumerate() {
            if b == b'\n' {
                assert!(i > 0 && body[i - 1] == b'\r');
            }
            if b == b'\r' {
                assert_eq!(body.get(i + 1), Some(&b'\n'));
            }
        }
    }
});
