//! HDF5 trees and zip members as Python hands them in.

use fastckpt_core::format::hdf5::{AttrValue, Node};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// `(name, kind, value)` with kind one of "utf8" (str), "bytes" (bytes), "str_array"
/// (list of str), "fixed_bytes_array" ((width, list of bytes)), "empty_list" (None).
pub type PyAttr<'py> = (String, String, Bound<'py, PyAny>);
/// `(path, tensor index or None, attrs)`.
pub type PyNode<'py> = (String, Option<usize>, Vec<PyAttr<'py>>);

fn attr_value(path: &str, name: &str, kind: &str, value: &Bound<'_, PyAny>) -> PyResult<AttrValue> {
    Ok(match kind {
        "utf8" => AttrValue::Utf8(value.extract()?),
        "bytes" => AttrValue::Bytes(value.extract()?),
        "str_array" => AttrValue::StrArray(value.extract()?),
        "fixed_bytes_array" => {
            let (width, items): (usize, Vec<Vec<u8>>) = value.extract()?;
            AttrValue::FixedBytesArray { width, items }
        }
        "empty_list" => AttrValue::EmptyList,
        other => {
            return Err(PyValueError::new_err(format!(
                "attribute {name:?} of {path}: unknown kind {other:?}"
            )))
        }
    })
}

pub fn nodes_from_py(nodes: Vec<PyNode<'_>>) -> PyResult<Vec<Node>> {
    nodes
        .into_iter()
        .map(|(path, tensor, attrs)| {
            let attrs = attrs
                .into_iter()
                .map(|(name, kind, value)| {
                    let v = attr_value(&path, &name, &kind, &value)?;
                    Ok((name, v))
                })
                .collect::<PyResult<Vec<_>>>()?;
            Ok(Node {
                path,
                tensor,
                attrs,
            })
        })
        .collect()
}
