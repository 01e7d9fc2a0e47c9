//! HDF5 files as Keras writes them, planned whole: a pure-Rust writer of the small subset
//! `.weights.h5` and legacy `.h5` files use (see `hdf5-subset.md`), no libhdf5.
//!
//! Layout of a planned file: the superblock (version 2), every object header (version 2,
//! in tree pre-order), the global heap collections holding variable-length strings, and
//! then the payloads, each aligned. All metadata is one region at the front, so the
//! writer's zero-filled gaps between nearby payloads never cover metadata.
//!
//! Groups keep their links compactly in their own header (Link Info + Group Info + one
//! Link message per child); datasets are contiguous, unfiltered, with zero-size ones at
//! the undefined address. Addresses are relative to the start of the HDF5 file.
//!
//! Same content as Keras's own files (`h5diff` finds no difference), different structure:
//! h5py's default `libver="earliest"` gives Keras superblock 0, version-1 headers and
//! symbol-table groups (B-tree + local heap); we write the version-2 forms that need no
//! B-trees, no timestamps. The price is lookup speed in huge groups: libhdf5 scans compact
//! links linearly, so opening each of 20,000 members of one group by name takes about
//! twice as long as in h5py's own layouts. Dataset creation properties are h5py's
//! (allocation time late, fill time "if set"), so `h5dump -p` shows the same as for
//! Keras's files.

mod attribute;
mod checksum;
mod datatype;
mod global_heap;
mod messages;
mod object_header;
mod superblock;
mod tree;

use crate::error::{Error, Result};
use crate::layout::{align_up, PlannedFile, Region, Slot};
use crate::tensor::Tensor;

use messages::{Message, UNDEFINED};
use tree::{Kind, Object, Tree};

/// An attribute value, in the forms h5py 3 gives the Python values Keras stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    /// Scalar variable-length UTF-8 string: h5py's form of a Python `str` (Keras's `name`,
    /// `dtype="bfloat16"`; the legacy root `backend` and `keras_version`).
    Utf8(String),
    /// Scalar variable-length string with the ASCII charset: h5py's form of Python `bytes`
    /// (legacy `model_config`, `training_config`, and `model_weights`' `backend` and
    /// `keras_version`, all `.encode("utf8")`-ed, so the bytes may be any UTF-8).
    Bytes(Vec<u8>),
    /// 1-D variable-length strings with the ASCII charset: h5py's form of a list of `bytes`
    /// (legacy `layer_names` and `weight_names`, UTF-8 encoded by Keras).
    StrArray(Vec<String>),
    /// 1-D fixed-length NUL-padded ASCII strings, numpy `S<width>`: what Keras's legacy
    /// saver stores when a name list is over 64,512 bytes and split into `name0`,
    /// `name1`, ...; `width` is the whole list's `np.asarray(...).itemsize`.
    FixedBytesArray { width: usize, items: Vec<Vec<u8>> },
    /// A 1-D float64 array of length 0: h5py's form of an empty Python list (legacy
    /// `weight_names` of a layer without weights).
    EmptyList,
}

/// One group (`tensor: None`) or dataset (`tensor: Some(index into tensors)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Absolute, like `"/layers/dense/vars/0"`; `"/"` is the root group.
    pub path: String,
    pub tensor: Option<usize>,
    pub attrs: Vec<(String, AttrValue)>,
}

/// Payloads of at least this many bytes start on a 4 KiB boundary, smaller ones on 64.
const PAGE_ALIGNED_FROM: u64 = 64 << 10;
const SMALL_ALIGN: u64 = 64;
const PAGE_ALIGN: u64 = 4096;

/// Plans a complete HDF5 file: groups (tensor `None`) and datasets (tensor `Some(index into
/// tensors)`), paths absolute like `"/layers/dense/vars/0"`; `"/"` may appear to carry root
/// attributes; missing intermediate groups are created without attributes. Offsets are
/// relative to the start of the HDF5 file (base address 0).
///
/// Errors name the offending path: duplicates, a dataset used as a group's parent, empty,
/// `.`/`..` or NUL-holding names, bad tensor indices, attributes that repeat or whose
/// message exceeds HDF5's 64 KiB limit, ranks over 32.
pub fn plan(nodes: &[Node], tensors: &[Tensor]) -> Result<PlannedFile> {
    let tree = Tree::build(nodes, tensors)?;
    let order = tree.preorder();

    // Pass 1: header sizes (addresses have fixed widths, so sizes do not depend on them)
    // and the strings bound for the global heap, in the order pass 2 writes them.
    let mut header_addr = vec![0u64; tree.objects.len()];
    let mut messages_len = vec![0usize; tree.objects.len()];
    let mut heap_objects: Vec<&[u8]> = Vec::new();
    let mut at = superblock::SUPERBLOCK_LEN as u64;
    for &id in &order {
        let obj = &tree.objects[id];
        check_object(obj, tensors)?;
        let mut len = 0;
        for_each_message(&tree, id, tensors, &Addresses::NONE, |m| {
            if m.body_len() > u16::MAX as usize {
                return Err(too_large(obj, &m));
            }
            len += object_header::message_len(&m);
            if let Message::Attribute { value, .. } = m {
                value.heap_objects(&mut heap_objects);
            }
            Ok(())
        })?;
        header_addr[id] = at;
        messages_len[id] = len;
        at += object_header::header_len(len) as u64;
    }

    at = align_up(at, 8);
    let collections = global_heap::plan(&heap_objects);
    let mut collection_addr = Vec::with_capacity(collections.len());
    for c in &collections {
        collection_addr.push(at);
        at += c.size;
    }
    let metadata_len = at;

    // Payloads after all metadata, in tree order.
    let mut data = vec![(UNDEFINED, 0u64); tree.objects.len()];
    let mut slots = Vec::new();
    for &id in &order {
        if let Kind::Dataset { tensor } = tree.objects[id].kind {
            let size = tensors[tensor].nbytes();
            if size == 0 {
                continue;
            }
            let align = if size >= PAGE_ALIGNED_FROM {
                PAGE_ALIGN
            } else {
                SMALL_ALIGN
            };
            let offset = align_up(at, align);
            data[id] = (offset, size);
            slots.push(Slot { offset, tensor });
            at = offset + size;
        }
    }
    let len = at;

    // Pass 2: the bytes.
    let addresses = Addresses {
        headers: &header_addr,
        data: &data,
    };
    let mut heap = global_heap::ids(&collections, &collection_addr).into_iter();
    let mut out = Vec::with_capacity(metadata_len as usize);
    superblock::write(len, header_addr[0], &mut out);
    for &id in &order {
        debug_assert_eq!(out.len() as u64, header_addr[id]);
        let start = object_header::begin(messages_len[id], &mut out);
        for_each_message(&tree, id, tensors, &addresses, |m| {
            object_header::write_message_head(&m, &mut out);
            m.write_body(&mut heap, &mut out);
            Ok(())
        })?;
        object_header::finish(start, &mut out);
    }
    out.resize(align_up(out.len() as u64, 8) as usize, 0);
    for (c, &addr) in collections.iter().zip(&collection_addr) {
        debug_assert_eq!(out.len() as u64, addr);
        global_heap::write(c, &heap_objects, &mut out);
    }
    debug_assert_eq!(out.len() as u64, metadata_len);
    debug_assert!(heap.next().is_none());

    Ok(PlannedFile {
        len,
        regions: vec![Region {
            offset: 0,
            bytes: out,
        }],
        slots,
    })
}

/// Where things were placed, for the messages that point at them.
struct Addresses<'p> {
    headers: &'p [u64],
    /// (address, size) of each dataset's payload, by object id.
    data: &'p [(u64, u64)],
}

impl Addresses<'static> {
    /// While sizes are planned: every address reads as 0.
    const NONE: Addresses<'static> = Addresses {
        headers: &[],
        data: &[],
    };
}

impl Addresses<'_> {
    fn header(&self, id: usize) -> u64 {
        self.headers.get(id).copied().unwrap_or(0)
    }

    fn data(&self, id: usize) -> (u64, u64) {
        self.data.get(id).copied().unwrap_or((0, 0))
    }
}

/// Calls `f` with each message of `obj`'s header, in header order: the same sequence on
/// every call, which is what lets pass 1 size what pass 2 writes.
fn for_each_message<'a>(
    tree: &Tree<'a>,
    id: usize,
    tensors: &'a [Tensor],
    at: &Addresses,
    mut f: impl FnMut(Message<'a>) -> Result<()>,
) -> Result<()> {
    let obj = &tree.objects[id];
    match &obj.kind {
        Kind::Group { children } => {
            f(Message::LinkInfo)?;
            f(Message::GroupInfo)?;
            for &child in children {
                f(Message::Link {
                    name: tree.objects[child].name,
                    address: at.header(child),
                })?;
            }
        }
        &Kind::Dataset { tensor } => {
            let t = &tensors[tensor];
            let (address, size) = at.data(id);
            f(Message::Dataspace(&t.shape))?;
            f(Message::Datatype(t.dtype))?;
            f(Message::FillValue)?;
            f(Message::Layout { address, size })?;
        }
    }
    if !obj.attrs.is_empty() {
        // Without it, libhdf5 sees no attributes in a version-2 header.
        f(Message::AttributeInfo)?;
        for (name, value) in obj.attrs {
            f(Message::Attribute { name, value })?;
        }
    }
    Ok(())
}

/// HDF5 dataspaces have at most 32 dimensions.
const MAX_RANK: usize = 32;

fn check_object(obj: &Object, tensors: &[Tensor]) -> Result<()> {
    if let Kind::Dataset { tensor } = obj.kind {
        let rank = tensors[tensor].shape.len();
        if rank > MAX_RANK {
            return Err(Error::invalid(format!(
                "HDF5 path {:?}: {rank} dimensions; HDF5 allows at most {MAX_RANK}",
                obj.path
            )));
        }
    }
    Ok(())
}

fn too_large(obj: &Object, m: &Message) -> Error {
    let what = match m {
        Message::Attribute { name, .. } => format!("attribute {name:?}"),
        Message::Link { name, .. } => {
            let start: String = name.chars().take(40).collect();
            format!("link name {start:?}...")
        }
        _ => "a header message".to_string(),
    };
    Error::invalid(format!(
        "HDF5 path {:?}: {what} needs a {}-byte header message, over HDF5's limit of 65535 \
         bytes (split long lists as Keras does: name0, name1, ...)",
        obj.path,
        m.body_len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn tensor(dtype: DType, shape: &[u64]) -> Tensor {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        Tensor::from_vec("t", dtype, shape.to_vec(), vec![1; n]).unwrap()
    }

    fn node(path: &str, tensor: Option<usize>) -> Node {
        Node {
            path: path.into(),
            tensor,
            attrs: vec![("name".into(), AttrValue::Utf8(path.into()))],
        }
    }

    #[test]
    fn metadata_first_then_aligned_payloads() {
        let tensors = [
            tensor(DType::F32, &[3]),
            tensor(DType::F64, &[0, 2]),
            tensor(DType::U8, &[PAGE_ALIGNED_FROM]),
            tensor(DType::I64, &[]),
        ];
        let nodes: Vec<Node> = (0..4).map(|i| node(&format!("/g/{i}"), Some(i))).collect();
        let p = plan(&nodes, &tensors).unwrap();
        let [meta] = &p.regions[..] else {
            panic!("one metadata region")
        };
        assert_eq!(meta.offset, 0);
        let meta_end = meta.bytes.len() as u64;
        // The zero-size dataset has no slot; the others follow the metadata, aligned.
        let slots: Vec<(u64, usize)> = p.slots.iter().map(|s| (s.offset, s.tensor)).collect();
        assert_eq!(slots.iter().map(|s| s.1).collect::<Vec<_>>(), [0, 2, 3]);
        assert!(slots
            .iter()
            .all(|&(o, _)| o >= meta_end && o % SMALL_ALIGN == 0));
        assert_eq!(
            slots[1].0 % PAGE_ALIGN,
            0,
            "large payloads are page aligned"
        );
        assert_eq!(p.len, slots[2].0 + 8);
        // The superblock's end-of-file address is the planned length.
        assert_eq!(meta.bytes[..8], *b"\x89HDF\r\n\x1a\n");
        assert_eq!(meta.bytes[28..36], p.len.to_le_bytes());
        assert_eq!(
            meta.bytes[36..44],
            48u64.to_le_bytes(),
            "root header follows"
        );
        // The zero-size dataset's layout holds the undefined address and size 0.
        let undefined_layout = [&[0x08, 18, 0, 0, 3, 1][..], &[0xff; 8], &[0; 8]].concat();
        let found = meta
            .bytes
            .windows(undefined_layout.len())
            .any(|w| w == undefined_layout);
        assert!(found, "no layout message with the undefined address");
    }

    #[test]
    fn files_without_datasets_end_after_the_metadata() {
        let p = plan(&[node("/", None)], &[]).unwrap();
        assert_eq!(p.len, p.regions[0].bytes.len() as u64);
        assert!(p.slots.is_empty());
        let empty = plan(&[], &[]).unwrap();
        assert_eq!(empty.regions[0].bytes.len() % 8, 0);
    }

    #[test]
    fn attribute_messages_up_to_the_limit() {
        let with = |n: usize| Node {
            path: "/g".into(),
            tensor: None,
            attrs: vec![(
                "a".into(),
                AttrValue::FixedBytesArray {
                    width: 1,
                    items: vec![vec![]; n],
                },
            )],
        };
        // Body: 9 fixed + "a\0" + 8 (datatype) + 20 (dataspace) + n bytes.
        let fits = u16::MAX as usize - 9 - 2 - 8 - 20;
        assert!(plan(&[with(fits)], &[]).is_ok());
        let e = plan(&[with(fits + 1)], &[]).unwrap_err().to_string();
        assert!(
            e.contains("\"/g\": attribute \"a\" needs a 65536-byte header message"),
            "{e}"
        );
    }

    #[test]
    fn same_input_same_bytes() {
        let tensors = [tensor(DType::F16, &[2, 2])];
        let nodes = [node("/a/b", Some(0)), node("/a", None), node("/", None)];
        assert_eq!(
            plan(&nodes, &tensors).unwrap(),
            plan(&nodes, &tensors).unwrap()
        );
    }
}
