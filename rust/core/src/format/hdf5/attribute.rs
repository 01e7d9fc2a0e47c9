//! How each [`AttrValue`] is typed, shaped and stored: the parts of an attribute message
//! (0x000C) that depend on the value. Variable-length strings keep their bytes in a global
//! heap collection; the message holds a (length, collection, index) reference per string.

use super::datatype::{self, Charset};
use super::messages::{dataspace_len, write_dataspace};
use super::AttrValue;

/// Bytes of one stored variable-length reference: u32 length, collection address, u32 index.
const VLEN_REF_LEN: usize = 16;

/// Where one heap object lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeapId {
    pub collection: u64,
    pub index: u32,
}

impl AttrValue {
    /// Checks what the message format cannot hold; the reason completes "attribute X ...".
    pub(crate) fn check(&self) -> Result<(), String> {
        let too_long = |len: usize| len > u32::MAX as usize;
        match self {
            AttrValue::Utf8(s) if too_long(s.len()) => Err("is longer than 4 GiB".into()),
            AttrValue::Bytes(b) if too_long(b.len()) => Err("is longer than 4 GiB".into()),
            AttrValue::StrArray(items) if items.iter().any(|s| too_long(s.len())) => {
                Err("holds a string longer than 4 GiB".into())
            }
            AttrValue::FixedBytesArray { width, items } => {
                if *width == 0 || *width > u32::MAX as usize {
                    return Err(format!("has width {width}; it must be 1 to 2^32-1 bytes"));
                }
                match items.iter().position(|b| b.len() > *width) {
                    Some(i) => Err(format!(
                        "item {i} is {} bytes, over the width {width}",
                        items[i].len()
                    )),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    pub(crate) fn datatype_len(&self) -> usize {
        match self {
            AttrValue::Utf8(_) | AttrValue::Bytes(_) | AttrValue::StrArray(_) => {
                datatype::VLEN_STRING_LEN
            }
            AttrValue::FixedBytesArray { .. } => datatype::FIXED_STRING_LEN,
            AttrValue::EmptyList => datatype::F64_LEN,
        }
    }

    pub(crate) fn write_datatype(&self, out: &mut Vec<u8>) {
        match self {
            AttrValue::Utf8(_) => datatype::write_vlen_string(Charset::Utf8, out),
            // h5py stores Python `bytes` (and lists of them, which is what Keras's legacy
            // saver passes) as ASCII; the bytes themselves may be any UTF-8.
            AttrValue::Bytes(_) | AttrValue::StrArray(_) => {
                datatype::write_vlen_string(Charset::Ascii, out)
            }
            AttrValue::FixedBytesArray { width, .. } => {
                datatype::write_fixed_string(*width as u32, out)
            }
            AttrValue::EmptyList => datatype::write_f64(out),
        }
    }

    /// `None` for a scalar dataspace (single strings), else the length of the 1-D array.
    fn length(&self) -> Option<u64> {
        match self {
            AttrValue::Utf8(_) | AttrValue::Bytes(_) => None,
            AttrValue::StrArray(items) => Some(items.len() as u64),
            AttrValue::FixedBytesArray { items, .. } => Some(items.len() as u64),
            AttrValue::EmptyList => Some(0),
        }
    }

    pub(crate) fn dataspace_len(&self) -> usize {
        dataspace_len(self.length().map_or(0, |_| 1))
    }

    pub(crate) fn write_dataspace(&self, out: &mut Vec<u8>) {
        match self.length() {
            None => write_dataspace(&[], out),
            Some(n) => write_dataspace(&[n], out),
        }
    }

    pub(crate) fn data_len(&self) -> usize {
        match self {
            AttrValue::Utf8(_) | AttrValue::Bytes(_) => VLEN_REF_LEN,
            AttrValue::StrArray(items) => VLEN_REF_LEN * items.len(),
            AttrValue::FixedBytesArray { width, items } => width * items.len(),
            AttrValue::EmptyList => 0,
        }
    }

    /// The strings that go to the global heap, in the order `write_data` refers to them.
    pub(crate) fn heap_objects<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        match self {
            AttrValue::Utf8(s) => out.push(s.as_bytes()),
            AttrValue::Bytes(b) => out.push(b),
            AttrValue::StrArray(items) => out.extend(items.iter().map(|s| s.as_bytes())),
            AttrValue::FixedBytesArray { .. } | AttrValue::EmptyList => {}
        }
    }

    /// Writes the data; `heap` yields the ids of this value's heap objects in order.
    pub(crate) fn write_data(&self, heap: &mut impl Iterator<Item = HeapId>, out: &mut Vec<u8>) {
        let mut vlen = |len: usize, out: &mut Vec<u8>| {
            let id = heap.next().expect("a heap id for every planned string");
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(&id.collection.to_le_bytes());
            out.extend_from_slice(&id.index.to_le_bytes());
        };
        match self {
            AttrValue::Utf8(s) => vlen(s.len(), out),
            AttrValue::Bytes(b) => vlen(b.len(), out),
            AttrValue::StrArray(items) => items.iter().for_each(|s| vlen(s.len(), out)),
            AttrValue::FixedBytesArray { width, items } => {
                for item in items {
                    out.extend_from_slice(item);
                    out.resize(out.len() + width - item.len(), 0);
                }
            }
            AttrValue::EmptyList => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(v: &AttrValue) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
        let (mut dt, mut ds, mut data) = (Vec::new(), Vec::new(), Vec::new());
        v.write_datatype(&mut dt);
        v.write_dataspace(&mut ds);
        let mut objects = Vec::new();
        v.heap_objects(&mut objects);
        let mut ids = (0..objects.len() as u32).map(|i| HeapId {
            collection: 0x800,
            index: i + 1,
        });
        v.write_data(&mut ids, &mut data);
        assert_eq!(ids.next(), None, "every heap id used");
        assert_eq!(dt.len(), v.datatype_len());
        assert_eq!(ds.len(), v.dataspace_len());
        assert_eq!(data.len(), v.data_len());
        (
            dt,
            ds,
            data,
            objects.into_iter().map(|o| o.to_vec()).collect(),
        )
    }

    #[test]
    fn scalar_string_refers_to_the_heap() {
        let (dt, ds, data, objects) = parts(&AttrValue::Utf8("hello".into()));
        assert_eq!(dt[..4], [0x19, 0x01, 0x01, 0x00]);
        assert_eq!(ds, [2, 0, 0, 0]);
        // Exactly what h5py stored for `attrs["u"] = "hello"`.
        let mut expected = vec![5, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(&[1, 0, 0, 0]);
        assert_eq!(data, expected);
        assert_eq!(objects, [b"hello".to_vec()]);
    }

    #[test]
    fn arrays() {
        let (dt, ds, data, objects) = parts(&AttrValue::StrArray(vec!["ab".into(), "cde".into()]));
        assert_eq!(
            dt[..4],
            [0x19, 0x01, 0x00, 0x00],
            "ASCII, as h5py writes lists of bytes"
        );
        assert_eq!(ds.len(), 20);
        assert_eq!(ds[..4], [2, 1, 1, 1]);
        assert_eq!(data.len(), 32);
        assert_eq!(objects.len(), 2);

        let fixed = AttrValue::FixedBytesArray {
            width: 3,
            items: vec![b"ab".to_vec(), b"cde".to_vec()],
        };
        let (dt, _, data, objects) = parts(&fixed);
        assert_eq!(dt, [0x13, 0x01, 0, 0, 3, 0, 0, 0]);
        assert_eq!(data, b"ab\0cde");
        assert!(objects.is_empty());

        let (dt, ds, data, _) = parts(&AttrValue::EmptyList);
        assert_eq!(dt[..4], [0x11, 0x20, 0x3f, 0x00]);
        assert_eq!(ds[4..], [0; 16]);
        assert!(data.is_empty());
    }

    #[test]
    fn fixed_width_is_checked() {
        let bad = AttrValue::FixedBytesArray {
            width: 2,
            items: vec![b"abc".to_vec()],
        };
        assert!(bad.check().unwrap_err().contains("item 0 is 3 bytes"));
        let zero = AttrValue::FixedBytesArray {
            width: 0,
            items: vec![],
        };
        assert!(zero.check().is_err());
    }
}
