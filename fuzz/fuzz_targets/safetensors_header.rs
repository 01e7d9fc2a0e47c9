//! `parse_header` on arbitrary bytes: it must never panic, and what it accepts must be
//! self-consistent (payloads back to back, inside the file, sized by dtype and shape).
#![no_main]

use std::path::Path;

use fastckpt_core::format::safetensors::parse_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let Ok(header) = parse_header(Path::new("fuzz"), data, len) else {
        return;
    };
    let n = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut at = 8 + n;
    for t in &header.tensors {
        assert_eq!(t.offset, at);
        let elems = t.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).unwrap();
        assert_eq!(elems * t.dtype.size() as u64, t.nbytes);
        at += t.nbytes;
    }
    assert_eq!(at, len);
});
