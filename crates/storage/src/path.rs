//! The one function that validates every path an agent, a tool call or a file
//! names. Paths are relative to `/data`, or absolute inside it. The result
//! has no `..`, no empty or `.` components, no NUL and no leading `/`, so
//! joining it beneath the prefix stays lexically inside. Symlinks are the
//! opener's business (`dir::AgentDir` never follows one).

use std::fmt;

pub const PATH_BYTES_MAX: usize = 4096;
pub const COMPONENT_BYTES_MAX: usize = 255;
pub const DEPTH_MAX: usize = 64;
const MOUNT_POINT: &str = "/data";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path {0:?} is outside /data")]
    Outside(String),
    #[error("path {0:?} contains '..'")]
    ParentComponent(String),
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is too long ({0} bytes; the limit is {PATH_BYTES_MAX})")]
    TooLong(usize),
    #[error("a path component is too long (the limit is {COMPONENT_BYTES_MAX} bytes)")]
    ComponentTooLong,
    #[error("path is nested too deeply (the limit is {DEPTH_MAX} levels)")]
    TooDeep,
}

/// A validated path beneath an agent prefix; `RelPath::root()` is the prefix.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(String);

impl RelPath {
    pub fn root() -> Self {
        Self(String::new())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/').filter(|c| !c.is_empty())
    }

    /// Parent directory and file name; `None` for the root.
    pub fn split_last(&self) -> Option<(RelPath, &str)> {
        if self.is_root() {
            return None;
        }
        Some(match self.0.rsplit_once('/') {
            Some((parent, name)) => (RelPath(parent.to_owned()), name),
            None => (RelPath::root(), self.0.as_str()),
        })
    }

    /// Appends one validated component.
    pub fn join(&self, name: &str) -> Result<RelPath, PathError> {
        if self.is_root() { validate_path(name) } else { validate_path(&format!("{}/{name}", self.0)) }
    }
}

impl fmt::Debug for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/data/{}", self.0)
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/data/{}", self.0)
    }
}

/// Validates a path named by an agent or a file. `/data`, `/data/` and `.`
/// name the root (`is_root()`); a caller that needs a file refuses the root.
pub fn validate_path(input: &str) -> Result<RelPath, PathError> {
    if input.is_empty() {
        return Err(PathError::Empty);
    }
    if input.len() > PATH_BYTES_MAX {
        return Err(PathError::TooLong(input.len()));
    }
    if input.contains('\0') {
        return Err(PathError::Nul);
    }
    let relative = if let Some(rest) = input.strip_prefix('/') {
        match rest.strip_prefix(&MOUNT_POINT[1..]) {
            Some("") => "",
            Some(tail) if tail.starts_with('/') => tail,
            _ => return Err(PathError::Outside(input.to_owned())),
        }
    } else {
        input
    };
    let mut out = String::with_capacity(relative.len());
    let mut depth = 0;
    for component in relative.split('/') {
        match component {
            "" | "." => continue,
            ".." => return Err(PathError::ParentComponent(input.to_owned())),
            c if c.len() > COMPONENT_BYTES_MAX => return Err(PathError::ComponentTooLong),
            c => {
                depth += 1;
                if depth > DEPTH_MAX {
                    return Err(PathError::TooDeep);
                }
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(c);
            }
        }
    }
    Ok(RelPath(out))
}

#[cfg(test)]
mod tests {
    use std::path::{Component, Path};

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn accepts_relative_and_data_absolute() {
        assert_eq!(validate_path("MEMORY.md").unwrap().as_str(), "MEMORY.md");
        assert_eq!(validate_path("/data/a//b/./c").unwrap().as_str(), "a/b/c");
        assert_eq!(validate_path("./notes/x.txt").unwrap().as_str(), "notes/x.txt");
        assert!(validate_path("/data").unwrap().is_root());
        assert!(validate_path("/data/").unwrap().is_root());
        assert_eq!(validate_path("a/...b").unwrap().as_str(), "a/...b");
    }

    #[test]
    fn rejects_escapes() {
        for (input, want) in [
            ("", PathError::Empty),
            ("../x", PathError::ParentComponent("../x".into())),
            ("a/../../x", PathError::ParentComponent("a/../../x".into())),
            ("/data/../etc", PathError::ParentComponent("/data/../etc".into())),
            ("/etc/passwd", PathError::Outside("/etc/passwd".into())),
            ("/database/x", PathError::Outside("/database/x".into())),
            ("/", PathError::Outside("/".into())),
            ("a\0b", PathError::Nul),
        ] {
            assert_eq!(validate_path(input), Err(want), "{input:?}");
        }
        assert_eq!(validate_path(&"a/".repeat(65)), Err(PathError::TooDeep));
        assert_eq!(validate_path(&"x".repeat(256)), Err(PathError::ComponentTooLong));
        assert!(matches!(validate_path(&"x".repeat(5000)), Err(PathError::TooLong(5000))));
    }

    #[test]
    fn join_and_split() {
        let p = validate_path("outbox/email").unwrap().join("a.json").unwrap();
        assert_eq!(p.as_str(), "outbox/email/a.json");
        let (parent, name) = p.split_last().unwrap();
        assert_eq!((parent.as_str(), name), ("outbox/email", "a.json"));
        assert!(validate_path("x").unwrap().join("..").is_err());
        assert!(RelPath::root().split_last().is_none());
    }

    proptest! {
        #[test]
        fn accepted_paths_stay_beneath_the_root(input in "(/data)?(/?(\\.\\.|\\.|[a-z]{1,3}|/|\\\\|\\x00)){0,8}") {
            if let Ok(path) = validate_path(&input) {
                let joined = Path::new("/root/prefix").join(path.as_str());
                prop_assert!(joined.starts_with("/root/prefix"));
                prop_assert!(joined.components().all(|c| !matches!(c, Component::ParentDir | Component::CurDir)));
                prop_assert!(!path.as_str().starts_with('/'));
                prop_assert!(!path.as_str().contains("//"));
                prop_assert!(path.components().all(|c| c != ".." && c != "." && !c.is_empty()));
                // Validation is idempotent on its own output.
                if !path.is_root() {
                    prop_assert_eq!(validate_path(path.as_str()).unwrap(), path.clone());
                }
            } else {
                prop_assert!(input.is_empty() || input.contains("..") || input.contains('\0')
                    || (input.starts_with('/') && !input.starts_with("/data")) || input.starts_with("/data") );
            }
        }

        #[test]
        fn any_string_never_yields_a_parent(input in any::<String>()) {
            if let Ok(path) = validate_path(&input) {
                prop_assert!(path.components().all(|c| c != ".." && c != "."));
                prop_assert!(!path.as_str().starts_with('/'));
            }
        }
    }
}
