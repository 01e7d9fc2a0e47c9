//! Host tensors as the writer sees them: a name, a dtype, a shape and their bytes, which
//! are borrowed from memory (a snapshot) or read piece by piece from elsewhere while the
//! file is written (a conversion copying from another checkpoint, see [`crate::source`]).

use std::fmt;
use std::io;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Element types a checkpoint can hold. Names follow numpy (`bfloat16` as ml_dtypes names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
}

impl DType {
    pub const ALL: [DType; 13] = [
        DType::Bool,
        DType::U8,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The numpy name of the type (`float32`, `bfloat16`, `bool`, ...).
    pub fn numpy_name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        }
    }

    /// Parses a numpy dtype name; `None` for anything a checkpoint cannot hold.
    pub fn from_numpy_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.numpy_name() == name)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.numpy_name())
    }
}

/// Something that owns (or keeps alive) a tensor's bytes for as long as a write needs them.
pub trait TensorBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl TensorBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// Where a tensor's bytes come from while it is written: memory, or a source read piece by
/// piece (so that copying a checkpoint never holds all of it in memory).
pub trait Payload: Send + Sync {
    /// The payload's length in bytes.
    fn len(&self) -> u64;
    /// Whether the payload is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The bytes, when they are all in memory.
    fn in_memory(&self) -> Option<&[u8]> {
        None
    }
    /// Bytes `[start, start + out.len())`, copied into `out`.
    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()>;
}

/// Memory payloads are served from memory.
struct InMemory(Arc<dyn TensorBytes>);

impl Payload for InMemory {
    fn len(&self) -> u64 {
        self.0.bytes().len() as u64
    }

    fn in_memory(&self) -> Option<&[u8]> {
        Some(self.0.bytes())
    }

    fn read_at(&self, start: u64, out: &mut [u8]) -> io::Result<()> {
        let start = start as usize;
        out.copy_from_slice(&self.0.bytes()[start..start + out.len()]);
        Ok(())
    }
}

/// One named tensor: C-order, native (little-endian) bytes.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    data: Arc<dyn Payload>,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("nbytes", &self.nbytes())
            .finish()
    }
}

impl Tensor {
    /// Builds a tensor, checking that the byte length matches `dtype` and `shape`.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        data: Arc<dyn TensorBytes>,
    ) -> Result<Tensor> {
        Tensor::from_payload(name, dtype, shape, Arc::new(InMemory(data)))
    }

    /// Builds a tensor whose bytes come from `data`, checking its length against `dtype`
    /// and `shape`.
    pub fn from_payload(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        data: Arc<dyn Payload>,
    ) -> Result<Tensor> {
        let name = name.into();
        let expected = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::invalid(format!("{name}: shape {shape:?} overflows")))?;
        let actual = data.len();
        if expected != actual {
            return Err(Error::invalid(format!(
                "{name}: {actual} bytes do not match dtype {dtype} and shape {shape:?} \
                 ({expected} bytes expected)"
            )));
        }
        Ok(Tensor {
            name,
            dtype,
            shape,
            data,
        })
    }

    /// Convenience for tests and Rust callers: a tensor that owns its bytes.
    pub fn from_vec(
        name: impl Into<String>,
        dtype: DType,
        shape: Vec<u64>,
        data: Vec<u8>,
    ) -> Result<Tensor> {
        Tensor::new(name, dtype, shape, Arc::new(data))
    }

    /// The bytes of a tensor held in memory; panics for one read from a source (tests and
    /// in-memory callers only).
    pub fn bytes(&self) -> &[u8] {
        self.data
            .in_memory()
            .expect("the tensor's bytes are not in memory")
    }

    /// The bytes, when they are in memory.
    pub fn in_memory(&self) -> Option<&[u8]> {
        self.data.in_memory()
    }

    /// Bytes `[start, start + len)`: borrowed when in memory, else read into `scratch`.
    pub fn piece<'a>(
        &'a self,
        start: usize,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> io::Result<&'a [u8]> {
        if let Some(bytes) = self.data.in_memory() {
            return Ok(&bytes[start..start + len]);
        }
        scratch.resize(len, 0);
        self.data.read_at(start as u64, scratch)?;
        Ok(&scratch[..])
    }

    pub fn nbytes(&self) -> u64 {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_numpy_name(d.numpy_name()), Some(d));
        }
        assert_eq!(DType::from_numpy_name("complex64"), None);
    }

    #[test]
    fn byte_length_is_checked() {
        let err = Tensor::from_vec("w", DType::F32, vec![2, 3], vec![0; 20]).unwrap_err();
        assert!(err.to_string().contains("w: 20 bytes"), "{err}");
        assert!(Tensor::from_vec("s", DType::F64, vec![], vec![0; 8]).is_ok());
        assert!(Tensor::from_vec("z", DType::I8, vec![0, 5], vec![]).is_ok());
    }
}
