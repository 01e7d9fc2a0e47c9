//! The contract between a format and the writer: every offset is decided before a byte is
//! written, so payloads can go out in parallel and metadata in a few positioned writes.

use crate::error::Result;

/// Metadata bytes at a fixed offset of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Where one tensor's payload goes: `tensor` indexes the tensor list handed to the writer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub offset: u64,
    pub tensor: usize,
}

/// A checksum the writer computes over each slot's payload while it writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Digest {
    None,
    /// IEEE CRC-32, as zip stores it.
    Crc32,
    /// CRC-32C (Castagnoli), stored per tensor in SafeTensors metadata.
    Crc32c,
}

/// A fully planned file.
pub trait Layout: Send + Sync {
    /// Total length of the file; every slot and region lies inside it.
    fn file_len(&self) -> u64;
    /// Payload slots, in any order.
    fn slots(&self) -> &[Slot];
    /// What to compute over each slot's payload; the results reach [`Layout::regions`].
    fn digest(&self) -> Digest {
        Digest::None
    }
    /// The metadata regions, given one digest per slot (in `slots()` order; empty when
    /// `digest()` is `None`). Called once, after every payload is written.
    fn regions(&self, digests: &[u32]) -> Result<Vec<Region>>;
}

/// A file whose metadata needs no payload digests: everything known at plan time. HDF5
/// plans come out this way, and a zip can embed one as a member by shifting it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlannedFile {
    pub len: u64,
    pub regions: Vec<Region>,
    pub slots: Vec<Slot>,
}

impl PlannedFile {
    /// The same file placed `base` bytes further into an enclosing file.
    pub fn shifted(mut self, base: u64) -> PlannedFile {
        for r in &mut self.regions {
            r.offset += base;
        }
        for s in &mut self.slots {
            s.offset += base;
        }
        self
    }
}

impl Layout for PlannedFile {
    fn file_len(&self) -> u64 {
        self.len
    }

    fn slots(&self) -> &[Slot] {
        &self.slots
    }

    fn regions(&self, _digests: &[u32]) -> Result<Vec<Region>> {
        Ok(self.regions.clone())
    }
}

/// Rounds `x` up to a multiple of `align` (a power of two).
pub fn align_up(x: u64, align: u64) -> u64 {
    debug_assert!(align.is_power_of_two());
    (x + align - 1) & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::align_up;

    #[test]
    fn aligns() {
        assert_eq!(align_up(0, 8), 0);
        assert_eq!(align_up(1, 8), 8);
        assert_eq!(align_up(8, 8), 8);
        assert_eq!(align_up(4097, 4096), 8192);
    }
}
