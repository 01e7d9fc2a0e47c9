//! The CRC-32 of an embedded planned file without reading its payloads back.
//!
//! A planned file is metadata regions, payload slots and zero gaps. At plan time everything
//! between two payloads is folded into one known `(crc, len)` run; once the writer hands
//! over the CRC of each payload, the member's CRC is a fold of CRC combinations in offset
//! order: two combinations per non-empty payload, each O(log len).

use crate::io::combine;
use crate::layout::{Digest, PlannedFile};
use crate::tensor::Tensor;

// Lengths below go through `usize`; the writer only runs where that is 64 bits.
const _: () = assert!(usize::BITS >= 64);

/// The CRC-32 of `a || b` from the CRCs of `a` and `b` and the length of `b`.
pub(super) fn crc32_combine(a: u32, b: u32, len_b: u64) -> u32 {
    combine(Digest::Crc32, a, b, len_b as usize)
}

/// The CRC-32 of `n` zero bytes, in O(log n). Appending zeros to a CRC register multiplies
/// it by x^(8n); combination is exactly that multiplication plus an XOR with the second
/// CRC, so with the register preset to all ones and a zero second CRC it yields the zeros'
/// CRC before the final inversion.
pub(super) fn crc32_zeros(n: u64) -> u32 {
    !crc32_combine(!0, 0, n)
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// Bytes known at plan time (metadata and the zeros around it).
    Known { crc: u32, len: u64 },
    /// The payload of the zip's slot number `slot`.
    Slot { slot: usize, len: u64 },
}

/// How to assemble one planned member's CRC from its slots' CRCs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MemberCrc {
    segments: Vec<Segment>,
}

impl MemberCrc {
    /// Plans the CRC of `file`, whose slots are the zip's slots `first_slot..` in the same
    /// order. Fails (with a reason, not naming the member) when a slot names a missing
    /// tensor, or when regions and payloads overlap or leave the file: the bytes on disk
    /// would then not be the ones summed here.
    pub fn plan(
        file: &PlannedFile,
        tensors: &[Tensor],
        first_slot: usize,
    ) -> Result<MemberCrc, String> {
        enum Part<'a> {
            Region(&'a [u8]),
            Slot(usize),
        }
        let mut parts: Vec<(u64, u64, Part)> = Vec::new();
        for r in &file.regions {
            parts.push((r.offset, r.bytes.len() as u64, Part::Region(&r.bytes)));
        }
        for (i, s) in file.slots.iter().enumerate() {
            let t = tensors.get(s.tensor).ok_or_else(|| {
                format!("slot {i} names tensor {} of {}", s.tensor, tensors.len())
            })?;
            parts.push((s.offset, t.nbytes(), Part::Slot(first_slot + i)));
        }
        parts.retain(|p| p.1 > 0);
        parts.sort_by_key(|p| p.0);

        let mut segments = Vec::new();
        let mut known = crc32fast::Hasher::new();
        let mut known_len = 0u64;
        let mut at = 0u64;
        let describe = |offset: u64, len: u64, part: &Part| match part {
            Part::Region(_) => format!("metadata at {offset} + {len}"),
            Part::Slot(slot) => {
                format!("payload of slot {} at {offset} + {len}", slot - first_slot)
            }
        };
        for (offset, len, part) in &parts {
            let end = offset.checked_add(*len).filter(|&e| e <= file.len);
            let Some(end) = end else {
                return Err(format!(
                    "{} lies past the file's end {}",
                    describe(*offset, *len, part),
                    file.len
                ));
            };
            if *offset < at {
                return Err(format!(
                    "{} overlaps what ends at {at}",
                    describe(*offset, *len, part)
                ));
            }
            let gap = offset - at;
            if gap > 0 {
                known.combine(&crc32fast::Hasher::new_with_initial_len(
                    crc32_zeros(gap),
                    gap,
                ));
                known_len += gap;
            }
            match part {
                Part::Region(bytes) => {
                    known.update(bytes);
                    known_len += len;
                }
                Part::Slot(slot) => {
                    if known_len > 0 {
                        segments.push(Segment::Known {
                            crc: known.clone().finalize(),
                            len: known_len,
                        });
                    }
                    known = crc32fast::Hasher::new();
                    known_len = 0;
                    segments.push(Segment::Slot {
                        slot: *slot,
                        len: *len,
                    });
                }
            }
            at = end;
        }
        let tail = file.len - at;
        if tail > 0 {
            known.combine(&crc32fast::Hasher::new_with_initial_len(
                crc32_zeros(tail),
                tail,
            ));
            known_len += tail;
        }
        if known_len > 0 {
            segments.push(Segment::Known {
                crc: known.finalize(),
                len: known_len,
            });
        }
        Ok(MemberCrc { segments })
    }

    /// The member's CRC given every slot's CRC, indexed by zip slot number.
    pub fn finish(&self, slot_crcs: &[u32]) -> u32 {
        self.segments.iter().fold(0, |acc, s| match *s {
            Segment::Known { crc, len } => crc32_combine(acc, crc, len),
            Segment::Slot { slot, len } => crc32_combine(acc, slot_crcs[slot], len),
        })
    }

    /// How many combinations [`MemberCrc::finish`] performs.
    #[cfg(test)]
    pub fn steps(&self) -> usize {
        self.segments.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Region, Slot};
    use crate::tensor::DType;

    fn bytes_tensor(name: &str, data: Vec<u8>) -> Tensor {
        let n = data.len() as u64;
        Tensor::from_vec(name, DType::U8, vec![n], data).unwrap()
    }

    #[test]
    fn zeros_crc_matches_hashing_zeros() {
        for n in [0u64, 1, 2, 3, 7, 64, 1000, 4096, 65_537, 1 << 20] {
            assert_eq!(
                crc32_zeros(n),
                crc32fast::hash(&vec![0u8; n as usize]),
                "n={n}"
            );
        }
    }

    /// The file's bytes as the writer leaves them: zeros, payloads, then regions.
    fn materialise(file: &PlannedFile, tensors: &[Tensor]) -> Vec<u8> {
        let mut b = vec![0u8; file.len as usize];
        for s in &file.slots {
            let t = tensors[s.tensor].bytes();
            b[s.offset as usize..][..t.len()].copy_from_slice(t);
        }
        for r in &file.regions {
            b[r.offset as usize..][..r.bytes.len()].copy_from_slice(&r.bytes);
        }
        b
    }

    #[test]
    fn folds_regions_gaps_and_payloads_in_offset_order() {
        let tensors = vec![
            bytes_tensor("a", (0..100u8).collect()),
            bytes_tensor("empty", vec![]),
            bytes_tensor("b", vec![7; 33]),
        ];
        let file = PlannedFile {
            len: 1000,
            regions: vec![
                Region {
                    offset: 900,
                    bytes: b"tail".to_vec(),
                },
                Region {
                    offset: 0,
                    bytes: b"head".to_vec(),
                },
                Region {
                    offset: 4,
                    bytes: vec![],
                },
            ],
            // out of offset order on purpose; the empty payload sits inside a gap
            slots: vec![
                Slot {
                    offset: 512,
                    tensor: 2,
                },
                Slot {
                    offset: 64,
                    tensor: 0,
                },
                Slot {
                    offset: 300,
                    tensor: 1,
                },
            ],
        };
        let first_slot = 5;
        let plan = MemberCrc::plan(&file, &tensors, first_slot).unwrap();
        // known, a, known, b, known
        assert_eq!(plan.steps(), 5);
        let mut slot_crcs = vec![0xdead_beef; first_slot];
        slot_crcs.extend(
            file.slots
                .iter()
                .map(|s| crc32fast::hash(tensors[s.tensor].bytes())),
        );
        let want = crc32fast::hash(&materialise(&file, &tensors));
        assert_eq!(plan.finish(&slot_crcs), want);
    }

    #[test]
    fn payload_at_both_ends_and_empty_file() {
        let tensors = vec![
            bytes_tensor("a", vec![1, 2, 3]),
            bytes_tensor("b", vec![4; 5]),
        ];
        let file = PlannedFile {
            len: 8,
            regions: vec![],
            slots: vec![
                Slot {
                    offset: 0,
                    tensor: 0,
                },
                Slot {
                    offset: 3,
                    tensor: 1,
                },
            ],
        };
        let plan = MemberCrc::plan(&file, &tensors, 0).unwrap();
        assert_eq!(plan.steps(), 2);
        let crcs = [crc32fast::hash(&[1, 2, 3]), crc32fast::hash(&[4; 5])];
        assert_eq!(
            plan.finish(&crcs),
            crc32fast::hash(&[1, 2, 3, 4, 4, 4, 4, 4])
        );
        let empty = MemberCrc::plan(&PlannedFile::default(), &tensors, 0).unwrap();
        assert_eq!(empty.finish(&[]), 0);
    }

    #[test]
    fn overlaps_and_overruns_are_refused() {
        let tensors = vec![bytes_tensor("a", vec![1; 10])];
        let region = |offset, n| Region {
            offset,
            bytes: vec![9; n],
        };
        let cases = [
            (
                vec![region(0, 8)],
                vec![Slot {
                    offset: 4,
                    tensor: 0,
                }],
                "overlaps",
            ),
            (
                vec![region(15, 8)],
                vec![Slot {
                    offset: 10,
                    tensor: 0,
                }],
                "overlaps",
            ),
            (vec![region(95, 8)], vec![], "past the file's end 100"),
            (
                vec![],
                vec![Slot {
                    offset: 95,
                    tensor: 0,
                }],
                "past the file's end",
            ),
            (vec![region(u64::MAX, 8)], vec![], "past the file's end"),
            (
                vec![],
                vec![Slot {
                    offset: 0,
                    tensor: 3,
                }],
                "names tensor 3 of 1",
            ),
        ];
        for (regions, slots, want) in cases {
            let file = PlannedFile {
                len: 100,
                regions,
                slots,
            };
            let err = MemberCrc::plan(&file, &tensors, 0).unwrap_err();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
