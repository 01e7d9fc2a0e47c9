//! Global heap collections (File Format Specification 3.0, III.E): where variable-length
//! string values live. A collection is `GCOL`, version 1, its total size (at least 4 KiB),
//! then objects (index u16, reference count u16, reserved u32, size u64, data padded to 8
//! bytes), and a free-space object (index 0) over whatever is left.

use super::attribute::HeapId;
use crate::layout::align_up;

const HEADER_LEN: u64 = 16;
const OBJECT_HEAD_LEN: u64 = 16;
/// libhdf5 never makes (or expects) a smaller collection.
const MIN_SIZE: u64 = 4096;
/// Object indices are u16 and 0 names the free space.
const MAX_OBJECTS: usize = 0xffff;
/// Start a new collection past this many bytes, so a reader that loads a whole collection
/// to resolve one string loads a bounded amount; a larger object gets one of its own.
const TARGET_SIZE: u64 = 1 << 20;

/// Objects `first..first + count` of the planned list, in a collection of `size` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Collection {
    pub first: usize,
    pub count: usize,
    pub size: u64,
}

fn object_len(data: &[u8]) -> u64 {
    OBJECT_HEAD_LEN + align_up(data.len() as u64, 8)
}

/// Groups `objects` into collections, in order.
pub(crate) fn plan(objects: &[&[u8]]) -> Vec<Collection> {
    plan_with(objects, MAX_OBJECTS, TARGET_SIZE)
}

fn plan_with(objects: &[&[u8]], max_objects: usize, target_size: u64) -> Vec<Collection> {
    let mut out: Vec<Collection> = Vec::new();
    let mut used = HEADER_LEN;
    for (i, data) in objects.iter().enumerate() {
        let len = object_len(data);
        match out.last_mut() {
            Some(c) if c.count < max_objects && used + len <= target_size => {
                c.count += 1;
                used += len;
            }
            _ => {
                if let Some(c) = out.last_mut() {
                    c.size = collection_size(used);
                }
                out.push(Collection {
                    first: i,
                    count: 1,
                    size: 0,
                });
                used = HEADER_LEN + len;
            }
        }
    }
    if let Some(c) = out.last_mut() {
        c.size = collection_size(used);
    }
    out
}

/// At least 4 KiB; any free space must hold the free-space object's own 16-byte head.
fn collection_size(used: u64) -> u64 {
    let size = used.max(MIN_SIZE);
    if size > used && size - used < OBJECT_HEAD_LEN {
        size + OBJECT_HEAD_LEN
    } else {
        size
    }
}

/// The id of each planned object once the collections sit at `addresses`.
pub(crate) fn ids(collections: &[Collection], addresses: &[u64]) -> Vec<HeapId> {
    let mut out = Vec::with_capacity(collections.iter().map(|c| c.count).sum());
    for (c, &collection) in collections.iter().zip(addresses) {
        out.extend((1..=c.count as u32).map(|index| HeapId { collection, index }));
    }
    out
}

pub(crate) fn write(c: &Collection, objects: &[&[u8]], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(b"GCOL");
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&c.size.to_le_bytes());
    for (i, data) in objects[c.first..c.first + c.count].iter().enumerate() {
        out.extend_from_slice(&(i as u16 + 1).to_le_bytes());
        // Reference count 0, as libhdf5 stores variable-length data.
        out.extend_from_slice(&[0; 6]);
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        out.extend_from_slice(data);
        out.resize(
            out.len() + (align_up(data.len() as u64, 8) as usize - data.len()),
            0,
        );
    }
    let free = c.size - (out.len() - start) as u64;
    if free > 0 {
        out.extend_from_slice(&[0; 8]); // index 0, reference count, reserved
        out.extend_from_slice(&free.to_le_bytes());
        out.resize(start + c.size as usize, 0);
    }
    debug_assert_eq!((out.len() - start) as u64, c.size);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_collection_matches_libhdf5() {
        // h5py stored "hello" then "bytes" in a 4 KiB collection like this.
        let objects: [&[u8]; 2] = [b"hello", b"bytes"];
        let plan = plan(&objects);
        assert_eq!(
            plan,
            [Collection {
                first: 0,
                count: 2,
                size: 4096
            }]
        );
        let mut out = Vec::new();
        write(&plan[0], &objects, &mut out);
        assert_eq!(out.len(), 4096);
        assert_eq!(out[..16], *b"GCOL\x01\0\0\0\0\x10\0\0\0\0\0\0");
        assert_eq!(
            out[16..40],
            *b"\x01\0\0\0\0\0\0\0\x05\0\0\0\0\0\0\0hello\0\0\0"
        );
        assert_eq!(out[40..48], *b"\x02\0\0\0\0\0\0\0");
        // Free space: index 0, size = the rest of the collection, its head included.
        assert_eq!(out[64..72], [0; 8]);
        assert_eq!(
            u64::from_le_bytes(out[72..80].try_into().unwrap()),
            4096 - 64
        );
    }

    #[test]
    fn splits_by_count_and_size() {
        let tiny = vec![&b"x"[..]; 70_000];
        let by_count = plan_with(&tiny, MAX_OBJECTS, u64::MAX);
        assert_eq!(by_count.len(), 2);
        assert_eq!(by_count[1].first, MAX_OBJECTS);
        let by_size = plan(&tiny);
        assert!(by_size
            .iter()
            .all(|c| c.count <= MAX_OBJECTS && c.size <= TARGET_SIZE));
        let big = vec![0u8; 60_000];
        let objects: Vec<&[u8]> = vec![&big; 40];
        let p = plan(&objects);
        assert!(p.len() > 1 && p.iter().all(|c| c.size <= TARGET_SIZE));
        assert_eq!(p.iter().map(|c| c.count).sum::<usize>(), 40);
        let huge = vec![0u8; 3 << 20];
        let p = plan(&[&huge[..], b"a"]);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].size, 16 + 16 + (3 << 20));
        let ids = ids(&p, &[100, 200]);
        assert_eq!(
            ids[1],
            HeapId {
                collection: 200,
                index: 1
            }
        );
    }

    #[test]
    fn free_space_never_smaller_than_its_head() {
        assert_eq!(collection_size(4096 - 8), 4096 + 16);
        assert_eq!(collection_size(4096), 4096);
        assert_eq!(collection_size(5000), 5000);
        let mut out = Vec::new();
        let c = Collection {
            first: 0,
            count: 1,
            size: collection_size(4096 - 8),
        };
        let data = vec![7u8; 4096 - 8 - 32];
        write(&c, &[&data], &mut out);
        assert_eq!(out.len() as u64, c.size);
    }
}
