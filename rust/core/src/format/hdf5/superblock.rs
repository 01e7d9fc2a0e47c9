//! Superblock version 2 (File Format Specification 3.0, II.A): 48 bytes at offset 0.

use super::checksum::lookup3;
use super::messages::UNDEFINED;

pub(crate) const SUPERBLOCK_LEN: usize = 48;
const SIGNATURE: &[u8; 8] = b"\x89HDF\r\n\x1a\n";

/// Writes the superblock: 8-byte offsets and lengths, base address 0, no extension.
pub(crate) fn write(end_of_file: u64, root: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&[2, 8, 8, 0]); // version, offset size, length size, flags
    out.extend_from_slice(&0u64.to_le_bytes()); // base address
    out.extend_from_slice(&UNDEFINED.to_le_bytes()); // superblock extension
    out.extend_from_slice(&end_of_file.to_le_bytes());
    out.extend_from_slice(&root.to_le_bytes());
    let sum = lookup3(&out[start..], 0);
    out.extend_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same superblock libhdf5 1.14 wrote for a file of 0x1808 bytes with the root
    /// object header at 48, checksum included.
    #[test]
    fn matches_libhdf5() {
        let mut out = Vec::new();
        write(0x1808, 48, &mut out);
        assert_eq!(out.len(), SUPERBLOCK_LEN);
        assert_eq!(out[..12], *b"\x89HDF\r\n\x1a\n\x02\x08\x08\x00");
        assert_eq!(out[28..36], 0x1808u64.to_le_bytes());
        assert_eq!(out[44..], [0xf0, 0x82, 0x48, 0x02]);
    }
}
