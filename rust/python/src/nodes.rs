//! HDF5 trees as Python hands them in: `Node`s of typed `Attr`s.

use fastckpt_core::format::hdf5::{AttrValue, Node};
use pyo3::prelude::*;

/// An HDF5 attribute, in the form h5py gives the Python value Keras assigns.
#[pyclass(name = "Attr", module = "fastckpt._fastckpt", frozen)]
#[derive(Clone)]
pub enum PyAttr {
    /// A `str`: a scalar variable-length UTF-8 string.
    Utf8 { name: String, value: String },
    /// A `bytes`: a scalar variable-length ASCII-charset string.
    Bytes { name: String, value: Vec<u8> },
    /// A list of `bytes`: 1-D variable-length ASCII-charset strings (given decoded).
    StrArray { name: String, values: Vec<String> },
    /// A numpy `S<width>` array: 1-D fixed-length NUL-padded strings.
    FixedBytesArray {
        name: String,
        width: usize,
        items: Vec<Vec<u8>>,
    },
    /// An empty list: a 1-D float64 array of length 0.
    EmptyList { name: String },
}

impl PyAttr {
    fn to_core(&self) -> (String, AttrValue) {
        match self.clone() {
            PyAttr::Utf8 { name, value } => (name, AttrValue::Utf8(value)),
            PyAttr::Bytes { name, value } => (name, AttrValue::Bytes(value)),
            PyAttr::StrArray { name, values } => (name, AttrValue::StrArray(values)),
            PyAttr::FixedBytesArray { name, width, items } => {
                (name, AttrValue::FixedBytesArray { width, items })
            }
            PyAttr::EmptyList { name } => (name, AttrValue::EmptyList),
        }
    }
}

/// A group (`tensor=None`) or a dataset (`tensor`: its index in the tensors handed in).
#[pyclass(name = "Node", module = "fastckpt._fastckpt", frozen, get_all)]
pub struct PyNode {
    /// Absolute, like `"/layers/dense/vars/0"`; `"/"` is the root group.
    pub path: String,
    pub tensor: Option<usize>,
    pub attrs: Vec<Py<PyAttr>>,
}

#[pymethods]
impl PyNode {
    #[new]
    #[pyo3(signature = (path, tensor=None, attrs=Vec::new()))]
    fn new(path: String, tensor: Option<usize>, attrs: Vec<Py<PyAttr>>) -> Self {
        PyNode {
            path,
            tensor,
            attrs,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "Node({:?}, tensor={:?}, {} attrs)",
            self.path,
            self.tensor,
            self.attrs.len()
        )
    }
}

/// The core's tree for the nodes.
pub fn nodes_to_core(nodes: &[PyRef<'_, PyNode>]) -> Vec<Node> {
    nodes
        .iter()
        .map(|n| Node {
            path: n.path.clone(),
            tensor: n.tensor,
            attrs: n.attrs.iter().map(|a| a.get().to_core()).collect(),
        })
        .collect()
}
