//! Node names: the identity every lease is keyed by.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest node name accepted (a DNS subdomain, as Kubernetes requires).
pub const MAX_NODE_NAME_LEN: usize = 253;

/// A validated node name: 1 to 253 characters, lowercase RFC 1123 subdomain
/// (`[a-z0-9]([-a-z0-9]*[a-z0-9])?` labels joined by dots), as Kubernetes
/// node names are.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

/// Why a node name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeNameError {
    /// The name is empty.
    #[error("node name is empty")]
    Empty,
    /// The name is longer than [`MAX_NODE_NAME_LEN`].
    #[error("node name is {0} characters long, the limit is {MAX_NODE_NAME_LEN}")]
    TooLong(usize),
    /// The name is not a lowercase RFC 1123 subdomain.
    #[error(
        "node name {0:?} is not a lowercase RFC 1123 name ([a-z0-9.-], labels start and end alphanumeric)"
    )]
    Invalid(String),
}

impl NodeName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, NodeNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(NodeNameError::Empty);
        }
        if name.len() > MAX_NODE_NAME_LEN {
            return Err(NodeNameError::TooLong(name.len()));
        }
        let label_ok = |label: &str| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 63
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        };
        if !name.split('.').all(label_ok) {
            return Err(NodeNameError::Invalid(name));
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeName {
    type Error = NodeNameError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<NodeName> for String {
    fn from(value: NodeName) -> Self {
        value.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for NodeName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_style_names() {
        for name in [
            "n1",
            "worker-3",
            "ip-10-0-0-1.eu-west-1.compute.internal",
            "a",
        ] {
            assert!(NodeName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn refuses_empty_oversized_and_malformed_names() {
        assert_eq!(NodeName::new(""), Err(NodeNameError::Empty));
        assert_eq!(
            NodeName::new("a".repeat(254)),
            Err(NodeNameError::TooLong(254))
        );
        for name in ["Node1", "-n", "n-", "a..b", "n_1", "n 1", "n/1", "ü", ".a"] {
            assert!(
                matches!(NodeName::new(name), Err(NodeNameError::Invalid(_))),
                "{name}"
            );
        }
        assert!(NodeName::new(format!("{}.b", "a".repeat(64))).is_err());
    }
}
