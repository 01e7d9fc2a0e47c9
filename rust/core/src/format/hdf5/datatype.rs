//! Datatype messages (0x0003), version 1, byte for byte as libhdf5 writes them for the
//! numpy types h5py maps (File Format Specification 3.0, IV.A.2.d).

use crate::tensor::DType;

/// Character set of a string datatype (and of link and attribute names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Charset {
    Ascii = 0,
    Utf8 = 1,
}

impl Charset {
    /// UTF-8 when `name` needs it, as h5py marks link names.
    pub(crate) fn of(name: &str) -> Charset {
        if name.is_ascii() {
            Charset::Ascii
        } else {
            Charset::Utf8
        }
    }
}

/// Class-and-version byte: version 1 in the high nibble.
const fn class(c: u8) -> u8 {
    0x10 | c
}
const FIXED_POINT: u8 = class(0);
const FLOATING_POINT: u8 = class(1);
const STRING: u8 = class(3);
const OPAQUE: u8 = class(5);
const ENUM: u8 = class(8);
const VARIABLE_LENGTH: u8 = class(9);

/// An IEEE float: sign bit at the top, implied leading mantissa bit (`0x20`).
struct Float {
    size: u32,
    exponent_location: u8,
    exponent_size: u8,
    mantissa_size: u8,
    bias: u32,
}

const F16: Float = Float {
    size: 2,
    exponent_location: 10,
    exponent_size: 5,
    mantissa_size: 10,
    bias: 15,
};
const F32: Float = Float {
    size: 4,
    exponent_location: 23,
    exponent_size: 8,
    mantissa_size: 23,
    bias: 127,
};
const F64: Float = Float {
    size: 8,
    exponent_location: 52,
    exponent_size: 11,
    mantissa_size: 52,
    bias: 1023,
};

/// Bytes of the datatype message body for a dataset element type.
pub(crate) fn dataset_type_len(d: DType) -> usize {
    match d {
        DType::F16 | DType::F32 | DType::F64 => 20,
        DType::Bool => 38,
        DType::BF16 => 8,
        _ => 12,
    }
}

pub(crate) fn write_dataset_type(d: DType, out: &mut Vec<u8>) {
    match d {
        DType::F16 => write_float(&F16, out),
        DType::F32 => write_float(&F32, out),
        DType::F64 => write_float(&F64, out),
        DType::I8 | DType::I16 | DType::I32 | DType::I64 => {
            write_integer(true, d.size() as u32, out)
        }
        DType::U8 | DType::U16 | DType::U32 | DType::U64 => {
            write_integer(false, d.size() as u32, out)
        }
        DType::Bool => write_bool_enum(out),
        // ml_dtypes' bfloat16 as Keras stores it: an opaque 2-byte type with an empty tag.
        // A tag would make h5py refuse to convert it; a custom float reads back as float16.
        DType::BF16 => write_head(OPAQUE, [0, 0, 0], 2, out),
    }
}

pub(crate) const F64_LEN: usize = 20;

pub(crate) fn write_f64(out: &mut Vec<u8>) {
    write_float(&F64, out);
}

/// Variable-length string, null-terminated, over unsigned bytes: what h5py writes for a
/// Python `str` (UTF-8) or `bytes` (ASCII). Each element is stored as (length, heap id).
pub(crate) const VLEN_STRING_LEN: usize = 20;

pub(crate) fn write_vlen_string(charset: Charset, out: &mut Vec<u8>) {
    // Bits 0-3: type 1 = string; 4-7: padding 0 = null-terminated; 8-11: charset.
    write_head(VARIABLE_LENGTH, [0x01, charset as u8, 0], 16, out);
    write_integer(false, 1, out);
}

/// Fixed-length ASCII string padded with NULs: what h5py writes for numpy `S<width>`.
pub(crate) const FIXED_STRING_LEN: usize = 8;

pub(crate) fn write_fixed_string(width: u32, out: &mut Vec<u8>) {
    // Bits 0-3: padding 1 = null-pad; bits 4-7: charset 0 = ASCII.
    write_head(STRING, [0x01, 0, 0], width, out);
}

fn write_head(class_version: u8, bits: [u8; 3], size: u32, out: &mut Vec<u8>) {
    out.push(class_version);
    out.extend_from_slice(&bits);
    out.extend_from_slice(&size.to_le_bytes());
}

fn write_integer(signed: bool, size: u32, out: &mut Vec<u8>) {
    // Little-endian, zero padding; bit 3 says two's-complement signed.
    write_head(
        FIXED_POINT,
        [if signed { 0x08 } else { 0 }, 0, 0],
        size,
        out,
    );
    out.extend_from_slice(&0u16.to_le_bytes()); // bit offset
    out.extend_from_slice(&(8 * size as u16).to_le_bytes()); // precision
}

fn write_float(f: &Float, out: &mut Vec<u8>) {
    let sign_location = (8 * f.size - 1) as u8;
    write_head(FLOATING_POINT, [0x20, sign_location, 0], f.size, out);
    out.extend_from_slice(&0u16.to_le_bytes()); // bit offset
    out.extend_from_slice(&(8 * f.size as u16).to_le_bytes()); // precision
    out.extend_from_slice(&[f.exponent_location, f.exponent_size, 0, f.mantissa_size]);
    out.extend_from_slice(&f.bias.to_le_bytes());
}

/// h5py's bool: an enum over int8 with FALSE = 0 and TRUE = 1. Version-1 enums pad each
/// member name with NULs to a multiple of 8 bytes.
fn write_bool_enum(out: &mut Vec<u8>) {
    write_head(ENUM, [2, 0, 0], 1, out); // two members
    write_integer(true, 1, out);
    out.extend_from_slice(b"FALSE\0\0\0TRUE\0\0\0\0");
    out.extend_from_slice(&[0, 1]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn dataset_type(d: DType) -> Vec<u8> {
        let mut out = Vec::new();
        write_dataset_type(d, &mut out);
        assert_eq!(out.len(), dataset_type_len(d), "{d}");
        out
    }

    /// The bytes hdf5-subset.md lists, which are libhdf5's own encodings (checked against
    /// files h5py wrote).
    #[test]
    fn floats() {
        assert_eq!(
            dataset_type(DType::F16),
            hex("11200f00 02000000 0000 1000 0a 05 00 0a 0f000000")
        );
        assert_eq!(
            dataset_type(DType::F32),
            hex("11201f00 04000000 0000 2000 17 08 00 17 7f000000")
        );
        assert_eq!(
            dataset_type(DType::F64),
            hex("11203f00 08000000 0000 4000 34 0b 00 34 ff030000")
        );
        let mut f64_attr = Vec::new();
        write_f64(&mut f64_attr);
        assert_eq!(f64_attr, dataset_type(DType::F64));
    }

    #[test]
    fn integers() {
        let cases = [
            (DType::I8, "10080000 01000000 0000 0800"),
            (DType::I16, "10080000 02000000 0000 1000"),
            (DType::I32, "10080000 04000000 0000 2000"),
            (DType::I64, "10080000 08000000 0000 4000"),
            (DType::U8, "10000000 01000000 0000 0800"),
            (DType::U16, "10000000 02000000 0000 1000"),
            (DType::U32, "10000000 04000000 0000 2000"),
            (DType::U64, "10000000 08000000 0000 4000"),
        ];
        for (d, bytes) in cases {
            assert_eq!(dataset_type(d), hex(bytes), "{d}");
        }
    }

    #[test]
    fn bool_is_an_int8_enum() {
        let expected = hex("18020000 01000000 10080000 01000000 0000 0800
             46414c5345000000 5452554500000000 00 01");
        assert_eq!(dataset_type(DType::Bool), expected);
    }

    #[test]
    fn bfloat16_is_untagged_opaque() {
        assert_eq!(dataset_type(DType::BF16), hex("15000000 02000000"));
    }

    #[test]
    fn strings() {
        let mut utf8 = Vec::new();
        write_vlen_string(Charset::Utf8, &mut utf8);
        // Same bytes as h5py's attribute `name` (vlen str) in a libhdf5-written file.
        assert_eq!(utf8, hex("19010100 10000000 10000000 01000000 0000 0800"));
        let mut ascii = Vec::new();
        write_vlen_string(Charset::Ascii, &mut ascii);
        assert_eq!(ascii, hex("19010000 10000000 10000000 01000000 0000 0800"));
        assert_eq!(ascii.len(), VLEN_STRING_LEN);
        let mut fixed = Vec::new();
        write_fixed_string(3, &mut fixed);
        assert_eq!(fixed, hex("13010000 03000000"));
        assert_eq!(fixed.len(), FIXED_STRING_LEN);
    }

    #[test]
    fn charset_of_names() {
        assert_eq!(Charset::of("dense"), Charset::Ascii);
        assert_eq!(Charset::of("grüße"), Charset::Utf8);
    }
}
