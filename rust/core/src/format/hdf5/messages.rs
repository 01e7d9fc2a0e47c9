//! Object header messages (File Format Specification 3.0, IV.A.2), in the versions every
//! libhdf5 since 1.8 reads: what a group or a dataset header holds.

use super::attribute::HeapId;
use super::datatype::{self, Charset};
use super::AttrValue;
use crate::tensor::DType;

/// The undefined address (all bits set).
pub(crate) const UNDEFINED: u64 = u64::MAX;

/// Message flag: the message never changes (libhdf5 sets it on datatypes, fill values and
/// group info).
const CONSTANT: u8 = 0x01;
/// Message flag: never share this message (libhdf5 sets it on attribute info).
const NOT_SHARED: u8 = 0x04;

/// One message of an object header. Addresses are zero while sizes are planned; sizes never
/// depend on them.
pub(crate) enum Message<'a> {
    /// Dataset shape; empty = SCALAR.
    Dataspace(&'a [u64]),
    Datatype(DType),
    FillValue,
    /// Contiguous storage; `UNDEFINED` address for zero-size data.
    Layout {
        address: u64,
        size: u64,
    },
    LinkInfo,
    GroupInfo,
    AttributeInfo,
    Link {
        name: &'a str,
        address: u64,
    },
    Attribute {
        name: &'a str,
        value: &'a AttrValue,
    },
}

impl Message<'_> {
    pub(crate) fn kind(&self) -> u8 {
        match self {
            Message::Dataspace(_) => 0x01,
            Message::LinkInfo => 0x02,
            Message::Datatype(_) => 0x03,
            Message::FillValue => 0x05,
            Message::Link { .. } => 0x06,
            Message::Layout { .. } => 0x08,
            Message::GroupInfo => 0x0a,
            Message::Attribute { .. } => 0x0c,
            Message::AttributeInfo => 0x15,
        }
    }

    pub(crate) fn flags(&self) -> u8 {
        match self {
            Message::Datatype(_) | Message::FillValue | Message::GroupInfo => CONSTANT,
            Message::AttributeInfo => NOT_SHARED,
            _ => 0,
        }
    }

    pub(crate) fn body_len(&self) -> usize {
        match self {
            Message::Dataspace(shape) => dataspace_len(shape.len()),
            Message::Datatype(d) => datatype::dataset_type_len(*d),
            Message::FillValue => 2,
            Message::Layout { .. } => 18,
            Message::LinkInfo | Message::AttributeInfo => 18,
            Message::GroupInfo => 2,
            Message::Link { name, .. } => {
                let charset = usize::from(Charset::of(name) == Charset::Utf8);
                2 + charset + length_field(name.len()).1 + name.len() + 8
            }
            Message::Attribute { name, value } => {
                9 + name.len() + 1 + value.datatype_len() + value.dataspace_len() + value.data_len()
            }
        }
    }

    /// Writes the body; attribute messages take their strings' ids from `heap`.
    pub(crate) fn write_body(&self, heap: &mut impl Iterator<Item = HeapId>, out: &mut Vec<u8>) {
        match self {
            Message::Dataspace(shape) => write_dataspace(shape, out),
            Message::Datatype(d) => datatype::write_dataset_type(*d, out),
            // Version 3; allocation time late, fill time "if set", no fill value: what
            // h5py's default dataset creation (and so every Keras file) records.
            Message::FillValue => out.extend_from_slice(&[3, 0x0a]),
            Message::Layout { address, size } => {
                out.extend_from_slice(&[3, 1]); // version 3, contiguous
                out.extend_from_slice(&address.to_le_bytes());
                out.extend_from_slice(&size.to_le_bytes());
            }
            // Version 0, no creation order: links (or attributes) stored compactly in this
            // header, so the fractal heap and B-tree addresses are undefined.
            Message::LinkInfo | Message::AttributeInfo => {
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&UNDEFINED.to_le_bytes());
                out.extend_from_slice(&UNDEFINED.to_le_bytes());
            }
            Message::GroupInfo => out.extend_from_slice(&[0, 0]),
            Message::Link { name, address } => write_link(name, *address, out),
            Message::Attribute { name, value } => write_attribute(name, value, heap, out),
        }
    }
}

/// Dataspace version 2: rank, flags (bit 0: maximum dimensions follow), type 0 SCALAR or
/// 1 SIMPLE, then the dimensions and, as libhdf5 writes them, equal maximum dimensions.
pub(crate) fn dataspace_len(rank: usize) -> usize {
    4 + 16 * rank
}

pub(crate) fn write_dataspace(shape: &[u64], out: &mut Vec<u8>) {
    if shape.is_empty() {
        out.extend_from_slice(&[2, 0, 0, 0]);
        return;
    }
    out.extend_from_slice(&[2, shape.len() as u8, 1, 1]);
    for _ in 0..2 {
        for d in shape {
            out.extend_from_slice(&d.to_le_bytes());
        }
    }
}

/// The link-name length field: (flag bits 0-1, width in bytes).
fn length_field(len: usize) -> (u8, usize) {
    match len {
        0..=0xff => (0, 1),
        0x100..=0xffff => (1, 2),
        0x1_0000..=0xffff_ffff => (2, 4),
        _ => (3, 8),
    }
}

/// Link message version 1: a hard link, with the charset field only for non-ASCII names
/// (as h5py writes them) and the length field as wide as the name needs.
fn write_link(name: &str, address: u64, out: &mut Vec<u8>) {
    let (width_flag, width) = length_field(name.len());
    let utf8 = Charset::of(name) == Charset::Utf8;
    out.push(1);
    out.push(width_flag | if utf8 { 0x10 } else { 0 });
    if utf8 {
        out.push(Charset::Utf8 as u8);
    }
    out.extend_from_slice(&(name.len() as u64).to_le_bytes()[..width]);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&address.to_le_bytes());
}

/// Attribute message version 3: sizes, name charset, NUL-terminated name (not padded),
/// datatype, dataspace, data.
fn write_attribute(
    name: &str,
    value: &AttrValue,
    heap: &mut impl Iterator<Item = HeapId>,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&[3, 0]);
    out.extend_from_slice(&(name.len() as u16 + 1).to_le_bytes());
    out.extend_from_slice(&(value.datatype_len() as u16).to_le_bytes());
    out.extend_from_slice(&(value.dataspace_len() as u16).to_le_bytes());
    out.push(Charset::of(name) as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    value.write_datatype(out);
    value.write_dataspace(out);
    value.write_data(heap, out);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(m: &Message, heap: &[HeapId]) -> Vec<u8> {
        let mut out = Vec::new();
        m.write_body(&mut heap.iter().copied(), &mut out);
        assert_eq!(out.len(), m.body_len());
        out
    }

    #[test]
    fn dataset_messages_match_libhdf5() {
        // Bytes from a dataset h5py created: shape (2,), then shape (0, 3), then a scalar.
        assert_eq!(
            body(&Message::Dataspace(&[2]), &[])[..],
            [2, 1, 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        let zero = body(&Message::Dataspace(&[0, 3]), &[]);
        assert_eq!(zero.len(), 36);
        assert_eq!(zero[..4], [2, 2, 1, 1]);
        assert_eq!(body(&Message::Dataspace(&[]), &[]), [2, 0, 0, 0]);
        assert_eq!(body(&Message::FillValue, &[]), [3, 0x0a]);
        let layout = body(
            &Message::Layout {
                address: 0x1800,
                size: 8,
            },
            &[],
        );
        assert_eq!(
            layout,
            [3, 1, 0, 0x18, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]
        );
        let empty = body(
            &Message::Layout {
                address: UNDEFINED,
                size: 0,
            },
            &[],
        );
        assert_eq!(empty[2..10], [0xff; 8]);
    }

    #[test]
    fn links() {
        assert_eq!(
            body(
                &Message::Link {
                    name: "g",
                    address: 515
                },
                &[]
            ),
            [1, 0, 1, b'g', 3, 2, 0, 0, 0, 0, 0, 0]
        );
        let long = "x".repeat(300);
        let b = body(
            &Message::Link {
                name: &long,
                address: 441,
            },
            &[],
        );
        assert_eq!(
            b[..4],
            [1, 1, 0x2c, 0x01],
            "2-byte length field for 300 bytes"
        );
        let b = body(
            &Message::Link {
                name: "grüp",
                address: 243,
            },
            &[],
        );
        assert_eq!(
            b[..4],
            [1, 0x10, 1, 5],
            "UTF-8 charset field, as h5py writes it"
        );
        assert_eq!(length_field(70_000), (2, 4));
    }

    #[test]
    fn attribute_matches_h5py() {
        // h5py's `attrs["u"] = "hello"` with the value at heap 0x800, index 1.
        let value = AttrValue::Utf8("hello".into());
        let id = HeapId {
            collection: 0x800,
            index: 1,
        };
        let b = body(
            &Message::Attribute {
                name: "u",
                value: &value,
            },
            &[id],
        );
        let expected: Vec<u8> = [
            &[3u8, 0, 2, 0, 20, 0, 4, 0, 0, b'u', 0][..],
            &[
                0x19, 1, 1, 0, 16, 0, 0, 0, 0x10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 8, 0,
            ],
            &[2, 0, 0, 0],
            &[5, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        ]
        .concat();
        assert_eq!(b, expected);
    }
}
