//! Version-2 object headers (File Format Specification 3.0, IV.A.1.b): `OHDR`, version,
//! flags, the size of chunk 0, its messages, and a lookup3 checksum. Everything an object
//! has fits in chunk 0, so there are no continuation chunks; a message body is at most
//! 65,535 bytes, but chunk 0 itself may be as long as its length field allows.

use super::checksum::lookup3;
use super::messages::Message;

/// Type (u8), size (u16), flags (u8); no creation-order field, as we never track it.
pub(crate) const MESSAGE_HEAD: usize = 4;

/// The chunk-0 size field: (flag bits 0-1, width in bytes), the narrowest that fits.
fn size_field(len: usize) -> (u8, usize) {
    match len {
        0..=0xff => (0, 1),
        0x100..=0xffff => (1, 2),
        0x1_0000..=0xffff_ffff => (2, 4),
        _ => (3, 8),
    }
}

/// Total bytes of a header whose messages (heads included) take `messages` bytes.
pub(crate) fn header_len(messages: usize) -> usize {
    4 + 1 + 1 + size_field(messages).1 + messages + 4
}

/// Bytes one message takes in chunk 0.
pub(crate) fn message_len(m: &Message) -> usize {
    MESSAGE_HEAD + m.body_len()
}

/// Writes the prefix of a header whose messages take `messages` bytes; the caller then
/// writes the messages and calls [`finish`] with the offset this returns.
pub(crate) fn begin(messages: usize, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    let (flag, width) = size_field(messages);
    out.extend_from_slice(b"OHDR");
    out.push(2); // version
    out.push(flag); // no times, no attribute storage phase change values
    out.extend_from_slice(&(messages as u64).to_le_bytes()[..width]);
    start
}

/// The message's type, size and flags; its body follows.
pub(crate) fn write_message_head(m: &Message, out: &mut Vec<u8>) {
    out.push(m.kind());
    out.extend_from_slice(&(m.body_len() as u16).to_le_bytes());
    out.push(m.flags());
}

/// Appends the checksum over the header that began at `start`.
pub(crate) fn finish(start: usize, out: &mut Vec<u8>) {
    let sum = lookup3(&out[start..], 0);
    out.extend_from_slice(&sum.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_field_widens() {
        assert_eq!(size_field(255), (0, 1));
        assert_eq!(size_field(256), (1, 2));
        assert_eq!(size_field(70_000), (2, 4));
        assert_eq!(size_field(1 << 33), (3, 8));
        assert_eq!(header_len(100), 4 + 2 + 1 + 100 + 4);
        assert_eq!(header_len(300), 4 + 2 + 2 + 300 + 4);
    }

    /// An empty group's header: prefix, Link Info and Group Info messages, checksum.
    #[test]
    fn group_header_layout() {
        let msgs = [Message::LinkInfo, Message::GroupInfo];
        let total: usize = msgs.iter().map(message_len).sum();
        let mut out = Vec::new();
        let start = begin(total, &mut out);
        for m in &msgs {
            write_message_head(m, &mut out);
            m.write_body(&mut std::iter::empty(), &mut out);
        }
        finish(start, &mut out);
        assert_eq!(out.len(), header_len(total));
        assert_eq!(out[..7], *b"OHDR\x02\x00\x1c");
        assert_eq!(out[7..11], [0x02, 18, 0, 0]);
        assert_eq!(out[29..35], [0x0a, 2, 0, 1, 0, 0]);
        let sum = u32::from_le_bytes(out[35..39].try_into().unwrap());
        assert_eq!(sum, lookup3(&out[..35], 0));
    }
}
