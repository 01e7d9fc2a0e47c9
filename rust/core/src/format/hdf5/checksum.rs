//! Jenkins lookup3 `hashlittle`, the checksum HDF5 puts at the end of every version-2
//! metadata structure (File Format Specification 3.0, appendix "Jenkins' lookup3 Hash").

/// `hashlittle(bytes, initval)` from Bob Jenkins' lookup3.c; HDF5 uses `initval = 0`.
pub(crate) fn lookup3(bytes: &[u8], initval: u32) -> u32 {
    let init = 0xdead_beef_u32
        .wrapping_add(bytes.len() as u32)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let word = |w: &[u8]| u32::from_le_bytes([w[0], w[1], w[2], w[3]]);

    let mut rest = bytes;
    // Every full 12-byte block but the last is mixed; the last 1..=12 bytes go to `finish`.
    while rest.len() > 12 {
        a = a.wrapping_add(word(&rest[0..4]));
        b = b.wrapping_add(word(&rest[4..8]));
        c = c.wrapping_add(word(&rest[8..12]));
        mix(&mut a, &mut b, &mut c);
        rest = &rest[12..];
    }
    if rest.is_empty() {
        return c;
    }
    // The tail is zero-padded to 12 bytes, which is what lookup3's byte-wise switch adds.
    let mut tail = [0u8; 12];
    tail[..rest.len()].copy_from_slice(rest);
    a = a.wrapping_add(word(&tail[0..4]));
    b = b.wrapping_add(word(&tail[4..8]));
    c = c.wrapping_add(word(&tail[8..12]));
    finish(&mut a, &mut b, &mut c);
    c
}

fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c) ^ c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c) ^ c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a) ^ a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b) ^ b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

fn finish(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(14));
    *a = (*a ^ *c).wrapping_sub(c.rotate_left(11));
    *b = (*b ^ *a).wrapping_sub(a.rotate_left(25));
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(16));
    *a = (*a ^ *c).wrapping_sub(c.rotate_left(4));
    *b = (*b ^ *a).wrapping_sub(a.rotate_left(14));
    *c = (*c ^ *b).wrapping_sub(b.rotate_left(24));
}

#[cfg(test)]
mod tests {
    use super::lookup3;

    /// The self-test vectors printed by `driver5()` in lookup3.c.
    #[test]
    fn reference_vectors() {
        assert_eq!(lookup3(b"", 0), 0xdead_beef);
        assert_eq!(lookup3(b"", 0xdead_beef), 0xbd5b_7dde);
        let four_score = b"Four score and seven years ago";
        assert_eq!(four_score.len(), 30);
        assert_eq!(lookup3(four_score, 0), 0x1777_0551);
        assert_eq!(lookup3(four_score, 1), 0xcd62_8161);
    }

    /// Checksums that libhdf5 1.14 (through h5py, `libver="v108"`) stored in a real file.
    #[test]
    fn matches_libhdf5_metadata() {
        let hex = |s: &str| -> Vec<u8> {
            let s: String = s.split_whitespace().collect();
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        };
        // Superblock version 2: root object header at 48, end of file 0x1808.
        let superblock = hex("894844460d0a1a0a 02080800 0000000000000000 ffffffffffffffff
                              0818000000000000 3000000000000000");
        assert_eq!(lookup3(&superblock, 0), 0x0248_82f0);
        // An object header continuation chunk holding one hard link "d" -> 0x2c4.
        let chunk = hex("4f43484b 10100000 4406000000000000 2f00000000000000
                         060c0000 01000164 c402000000000000 0000");
        assert_eq!(lookup3(&chunk, 0), 0xf0ab_f898);
    }

    #[test]
    fn every_tail_length() {
        // Lengths 0..=25 cover each tail size twice; values must all differ.
        let data: Vec<u8> = (0..25u8).collect();
        let mut seen = std::collections::HashSet::new();
        for n in 0..=data.len() {
            assert!(seen.insert(lookup3(&data[..n], 0)), "collision at {n}");
        }
    }
}
