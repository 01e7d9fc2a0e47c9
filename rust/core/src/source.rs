//! Payloads read from another file while a file is written: a conversion copies a
//! checkpoint piece by piece, so memory holds a few pieces, never the whole checkpoint.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::format::zstd_decode;
use crate::tensor::Payload;

/// A file payloads are read from, opened once for all of them.
#[derive(Debug)]
pub struct SourceFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl SourceFile {
    pub fn open(path: &Path) -> Result<Arc<SourceFile>> {
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        Ok(Arc::new(SourceFile {
            path: path.to_path_buf(),
            file,
            len,
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks that `[offset, offset + len)` lies inside the file.
    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(Error::corrupt(
                &self.path,
                format!(
                    "{len} bytes at offset {offset} lie past the end of the file ({} bytes)",
                    self.len
                ),
            ));
        }
        Ok(())
    }

    fn read_exact_at(&self, out: &mut [u8], offset: u64) -> io::Result<()> {
        self.file
            .read_exact_at(out, offset)
            .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", self.path.display())))
    }
}

/// `len` bytes at `offset` of a source file: a payload stored as it is (SafeTensors, a
/// contiguous HDF5 dataset, a stored zip member's dataset).
pub struct FileRange {
    file: Arc<SourceFile>,
    offset: u64,
    len: u64,
}

impl FileRange {
    pub fn new(file: Arc<SourceFile>, offset: u64, len: u64) -> Result<FileRange> {
        file.check_range(offset, len)?;
        Ok(FileRange { file, offset, len })
    }
}

impl Payload for FileRange {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, self.offset + start)
    }
}

/// A payload stored as one zstd frame of a source file. The frame is decoded when its
/// first piece is asked for and dropped once every byte has been handed out: the writer
/// takes a tensor's pieces in order, so a few decoded tensors are held at a time (one per
/// writer thread at most).
pub struct ZstdFrame {
    file: Arc<SourceFile>,
    offset: u64,
    stored: u64,
    len: u64,
    decoded: Mutex<Decoded>,
}

#[derive(Default)]
struct Decoded {
    bytes: Option<Vec<u8>>,
    served: u64,
}

impl ZstdFrame {
    /// The frame of `stored` bytes at `offset`, which decodes to `len` bytes.
    pub fn new(file: Arc<SourceFile>, offset: u64, stored: u64, len: u64) -> Result<ZstdFrame> {
        file.check_range(offset, stored)?;
        Ok(ZstdFrame {
            file,
            offset,
            stored,
            len,
            decoded: Mutex::new(Decoded::default()),
        })
    }

    fn decode(&self) -> io::Result<Vec<u8>> {
        // The size comes from the source's header: an allocation it cannot get is an
        // error, not an abort.
        let mut out = Vec::new();
        out.try_reserve_exact(self.len as usize).map_err(|_| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "{}: no memory for the {} bytes the zstd frame at offset {} decodes to",
                    self.file.path.display(),
                    self.len,
                    self.offset
                ),
            )
        })?;
        zstd_decode::stream_frame(&self.file.file, self.offset, self.stored, self.len, |b| {
            out.extend_from_slice(b);
            Ok(())
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: the zstd frame at offset {}: {e}",
                    self.file.path.display(),
                    self.offset
                ),
            )
        })?;
        Ok(out)
    }
}

impl Payload for ZstdFrame {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let mut state = self.decoded.lock().unwrap();
        if state.bytes.is_none() {
            state.bytes = Some(self.decode()?);
        }
        let bytes = state.bytes.as_ref().expect("decoded just above");
        let start = start as usize;
        out.copy_from_slice(&bytes[start..start + out.len()]);
        state.served += out.len() as u64;
        if state.served >= self.len {
            // Every byte went out: a later read (none in a write) decodes it again.
            *state = Decoded::default();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::zstd::compress_frame;

    fn source_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<SourceFile>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("src");
        std::fs::write(&path, bytes).unwrap();
        let file = SourceFile::open(&path).unwrap();
        (dir, file)
    }

    #[test]
    fn ranges_and_frames_serve_their_bytes_in_pieces() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let frame = compress_frame(&data, 3).unwrap();
        let mut bytes = data.clone();
        bytes.extend_from_slice(&frame);
        let (_dir, file) = source_with(&bytes);
        let range = FileRange::new(file.clone(), 0, data.len() as u64).unwrap();
        let zst =
            ZstdFrame::new(file.clone(), data.len() as u64, frame.len() as u64, 100_000).unwrap();
        for payload in [&range as &dyn Payload, &zst] {
            let mut got = vec![0u8; data.len()];
            for (i, piece) in got.chunks_mut(30_000).enumerate() {
                payload.read_at(i as u64 * 30_000, piece).unwrap();
            }
            assert_eq!(got, data);
        }
        assert!(FileRange::new(file, 1, bytes.len() as u64).is_err());
    }

    #[test]
    fn a_frame_said_to_decode_to_more_than_memory_holds_is_an_error() {
        let frame = compress_frame(&[1, 2, 3], 3).unwrap();
        let (_dir, file) = source_with(&frame);
        let huge = ZstdFrame::new(file, 0, frame.len() as u64, 1 << 62).unwrap();
        let err = huge.read_at(0, &mut [0u8; 4]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::OutOfMemory);
    }
}
