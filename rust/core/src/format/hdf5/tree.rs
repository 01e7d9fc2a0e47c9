//! From a flat list of [`Node`]s to a checked tree of groups and datasets.

use std::collections::{HashMap, HashSet};

use super::{AttrValue, Node};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub(crate) enum Kind {
    Group { children: Vec<usize> },
    Dataset { tensor: usize },
}

pub(crate) struct Object<'a> {
    /// Absolute path, for error messages.
    pub path: &'a str,
    /// The link name in the parent group; empty for the root.
    pub name: &'a str,
    pub kind: Kind,
    pub attrs: &'a [(String, AttrValue)],
}

/// Objects by id; the root group is id 0.
pub(crate) struct Tree<'a> {
    pub objects: Vec<Object<'a>>,
}

const ROOT: usize = 0;
const NO_ATTRS: &[(String, AttrValue)] = &[];

struct Builder<'a> {
    objects: Vec<Object<'a>>,
    /// Objects a node defined, as opposed to intermediate groups made on the way.
    defined: Vec<bool>,
    by_path: HashMap<&'a str, usize>,
}

impl<'a> Tree<'a> {
    pub(crate) fn build(nodes: &'a [Node], tensors: &[Tensor]) -> Result<Tree<'a>> {
        let mut b = Builder {
            objects: Vec::with_capacity(nodes.len() + 1),
            defined: Vec::with_capacity(nodes.len() + 1),
            by_path: HashMap::with_capacity(nodes.len() + 1),
        };
        b.objects.push(Object {
            path: "/",
            name: "",
            kind: Kind::Group {
                children: Vec::new(),
            },
            attrs: NO_ATTRS,
        });
        b.defined.push(false);
        b.by_path.insert("/", ROOT);
        for node in nodes {
            b.add(node, tensors)?;
        }
        Ok(Tree { objects: b.objects })
    }

    /// Object ids with every group before its children, children in the order given.
    pub(crate) fn preorder(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.objects.len());
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            order.push(id);
            if let Kind::Group { children } = &self.objects[id].kind {
                stack.extend(children.iter().rev());
            }
        }
        order
    }
}

impl<'a> Builder<'a> {
    fn add(&mut self, node: &'a Node, tensors: &[Tensor]) -> Result<()> {
        let path = node.path.as_str();
        check_path(path)?;
        check_attrs(path, &node.attrs)?;
        if path == "/" && node.tensor.is_some() {
            return Err(Error::invalid(
                "HDF5 path \"/\" is the root group; it cannot hold a tensor",
            ));
        }
        if let Some(t) = node.tensor {
            if t >= tensors.len() {
                return Err(Error::invalid(format!(
                    "HDF5 path {path:?}: tensor index {t} is out of range ({} tensors)",
                    tensors.len()
                )));
            }
        }
        let id = match self.by_path.get(path) {
            Some(&id) => {
                if self.defined[id] {
                    return Err(Error::invalid(format!("HDF5 path {path:?} appears twice")));
                }
                // Made earlier as the parent of another path, so it must stay a group.
                if node.tensor.is_some() {
                    return Err(Error::invalid(format!(
                        "HDF5 path {path:?} is given a tensor, but other paths use it as a group"
                    )));
                }
                id
            }
            None => {
                let parent = self.group(parent_of(path), path)?;
                let kind = match node.tensor {
                    Some(tensor) => Kind::Dataset { tensor },
                    None => Kind::Group {
                        children: Vec::new(),
                    },
                };
                self.insert(parent, path, kind)
            }
        };
        self.defined[id] = true;
        self.objects[id].attrs = &node.attrs;
        Ok(())
    }

    /// The group at `path`, creating it and any missing ancestors. `child` is the path that
    /// needs it, for the error when `path` is a dataset.
    fn group(&mut self, path: &'a str, child: &str) -> Result<usize> {
        let mut missing = Vec::new();
        let mut at = path;
        let mut id = loop {
            if let Some(&id) = self.by_path.get(at) {
                break id;
            }
            missing.push(at);
            at = parent_of(at);
        };
        if let Kind::Dataset { .. } = self.objects[id].kind {
            return Err(Error::invalid(format!(
                "HDF5 path {child:?}: its parent {:?} is a dataset, not a group",
                self.objects[id].path
            )));
        }
        for p in missing.into_iter().rev() {
            id = self.insert(
                id,
                p,
                Kind::Group {
                    children: Vec::new(),
                },
            );
        }
        Ok(id)
    }

    fn insert(&mut self, parent: usize, path: &'a str, kind: Kind) -> usize {
        let id = self.objects.len();
        self.objects.push(Object {
            path,
            name: &path[path.rfind('/').map_or(0, |i| i + 1)..],
            kind,
            attrs: NO_ATTRS,
        });
        self.defined.push(false);
        self.by_path.insert(path, id);
        match &mut self.objects[parent].kind {
            Kind::Group { children } => children.push(id),
            Kind::Dataset { .. } => unreachable!("parents are checked to be groups"),
        }
        id
    }
}

/// `"/a/b"` -> `"/a"`, `"/a"` -> `"/"`.
fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::invalid(format!(
            "HDF5 path {path:?} must be absolute (start with '/')"
        )));
    }
    if path == "/" {
        return Ok(());
    }
    for name in path[1..].split('/') {
        let problem = match name {
            "" => "has an empty name (a doubled or trailing '/')",
            "." | ".." => "has a '.' or '..' name, which HDF5 paths cannot reach",
            _ if name.contains('\0') => "has a name containing a NUL character",
            _ => continue,
        };
        return Err(Error::invalid(format!("HDF5 path {path:?} {problem}")));
    }
    Ok(())
}

fn check_attrs(path: &str, attrs: &[(String, AttrValue)]) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, (name, value)) in attrs.iter().enumerate() {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::invalid(format!(
                "HDF5 path {path:?}: attribute {name:?} needs a non-empty name without NUL"
            )));
        }
        // Attributes are few per object; a set only pays off for long lists.
        let dup = if attrs.len() <= 16 {
            attrs[..i].iter().any(|(n, _)| n == name)
        } else {
            !seen.insert(name.as_str())
        };
        if dup {
            return Err(Error::invalid(format!(
                "HDF5 path {path:?}: attribute {name:?} appears twice"
            )));
        }
        value.check().map_err(|why| {
            Error::invalid(format!("HDF5 path {path:?}: attribute {name:?} {why}"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    fn node(path: &str, tensor: Option<usize>) -> Node {
        Node {
            path: path.into(),
            tensor,
            attrs: vec![],
        }
    }

    fn tensors(n: usize) -> Vec<Tensor> {
        (0..n)
            .map(|i| Tensor::from_vec(format!("t{i}"), DType::U8, vec![1], vec![i as u8]).unwrap())
            .collect()
    }

    fn paths<'a>(tree: &Tree<'a>) -> Vec<&'a str> {
        tree.preorder()
            .into_iter()
            .map(|id| tree.objects[id].path)
            .collect()
    }

    #[test]
    fn creates_missing_groups_in_preorder() {
        let nodes = [
            node("/a/b/c", Some(0)),
            node("/a", None),
            node("/x", Some(1)),
            node("/a/d", None),
        ];
        let t = tensors(2);
        let tree = Tree::build(&nodes, &t).unwrap();
        assert_eq!(paths(&tree), ["/", "/a", "/a/b", "/a/b/c", "/a/d", "/x"]);
        let names: Vec<_> = tree
            .preorder()
            .into_iter()
            .map(|id| tree.objects[id].name)
            .collect();
        assert_eq!(names, ["", "a", "b", "c", "d", "x"]);
    }

    #[test]
    fn root_may_carry_attributes() {
        let mut root = node("/", None);
        root.attrs
            .push(("backend".into(), AttrValue::Utf8("tensorflow".into())));
        let nodes = [node("/g", None), root];
        let tree = Tree::build(&nodes, &[]).unwrap();
        assert_eq!(tree.objects[0].attrs.len(), 1);
    }

    fn error(nodes: &[Node], n_tensors: usize) -> String {
        match Tree::build(nodes, &tensors(n_tensors)) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn rejects_bad_trees_naming_the_path() {
        let e = error(&[node("/a/b", None), node("/a/b", Some(0))], 1);
        assert!(e.contains("\"/a/b\" appears twice"), "{e}");
        let e = error(&[node("/", None), node("/", None)], 0);
        assert!(e.contains("\"/\" appears twice"), "{e}");
        let e = error(&[node("/a", Some(0)), node("/a/b", None)], 1);
        assert!(
            e.contains("\"/a/b\": its parent \"/a\" is a dataset"),
            "{e}"
        );
        let e = error(&[node("/a", Some(0)), node("/a/b/c", None)], 1);
        assert!(
            e.contains("\"/a/b/c\": its parent \"/a\" is a dataset"),
            "{e}"
        );
        let e = error(&[node("/a/b", None), node("/a", Some(0))], 1);
        assert!(
            e.contains("\"/a\" is given a tensor, but other paths use it as a group"),
            "{e}"
        );
        let e = error(&[node("/", Some(0))], 1);
        assert!(e.contains("root group"), "{e}");
        let e = error(&[node("/a", Some(3))], 1);
        assert!(
            e.contains("\"/a\": tensor index 3 is out of range (1 tensors)"),
            "{e}"
        );
    }

    #[test]
    fn rejects_bad_names() {
        for (path, why) in [
            ("a/b", "must be absolute"),
            ("", "must be absolute"),
            ("/a//b", "empty name"),
            ("/a/", "empty name"),
            ("//", "empty name"),
            ("/a/./b", "'.' or '..'"),
            ("/..", "'.' or '..'"),
            ("/a\0b", "NUL"),
        ] {
            let e = error(&[node(path, None)], 0);
            assert!(
                e.contains(&format!("{path:?}")) && e.contains(why),
                "{path:?}: {e}"
            );
        }
        // Dots inside a name are ordinary characters.
        assert!(Tree::build(&[node("/a.b/..c/d.", None)], &[]).is_ok());
    }

    #[test]
    fn rejects_bad_attributes() {
        let with = |attrs: Vec<(String, AttrValue)>| Node {
            path: "/g".into(),
            tensor: None,
            attrs,
        };
        let utf8 = |s: &str| AttrValue::Utf8(s.into());
        let e = error(&[with(vec![("".into(), utf8("x"))])], 0);
        assert!(e.contains("\"/g\": attribute \"\""), "{e}");
        let e = error(
            &[with(vec![("n".into(), utf8("x")), ("n".into(), utf8("y"))])],
            0,
        );
        assert!(e.contains("\"/g\": attribute \"n\" appears twice"), "{e}");
        let many: Vec<_> = (0..40)
            .map(|i| (format!("a{}", i % 39), utf8("v")))
            .collect();
        let e = error(&[with(many)], 0);
        assert!(e.contains("attribute \"a0\" appears twice"), "{e}");
    }
}
