//! Labels standalone agents send with Acquire (`--label k=v`), kept for the
//! policy's selectors. In a cluster the Node objects' labels are used
//! instead.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use super::schema::{check_label_key, check_label_value};
use crate::node::NodeName;

/// The most labels one Acquire may carry.
pub const MAX_LABELS: usize = 64;
/// The most nodes whose labels are kept (the oldest are forgotten first).
pub const MAX_NODES: usize = 10_000;

/// Checks the labels of an Acquire; the message names the bad one.
pub fn check_labels(labels: &HashMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "labels: {} labels, the limit is {MAX_LABELS}",
            labels.len()
        ));
    }
    for (k, v) in labels {
        check_label_key(k).map_err(|e| format!("labels: {e}"))?;
        check_label_value(k, v).map_err(|e| format!("labels: {e}"))?;
    }
    Ok(())
}

/// A node's labels and the sequence number of when they came.
type Entry = (u64, BTreeMap<String, String>);

/// The labels each node last sent.
#[derive(Debug, Default)]
pub struct LabelBook {
    inner: Mutex<(HashMap<NodeName, Entry>, u64)>,
}

impl LabelBook {
    /// Records what `node` sent (checked by [`check_labels`]).
    pub fn record(&self, node: &NodeName, labels: HashMap<String, String>) {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, seq) = &mut *guard;
        *seq += 1;
        map.insert(node.clone(), (*seq, labels.into_iter().collect()));
        if map.len() > MAX_NODES
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, (s, _))| *s)
                .map(|(n, _)| n.clone())
        {
            map.remove(&oldest);
        }
    }

    /// Every node and the labels it last sent.
    pub fn entries(&self) -> Vec<(NodeName, BTreeMap<String, String>)> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .0
            .iter()
            .map(|(n, (_, l))| (n.clone(), l.clone()))
            .collect()
    }

    /// The labels `node` last sent, if it sent any since this replica started.
    pub fn get(&self, node: &NodeName) -> Option<BTreeMap<String, String>> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard.0.get(node).map(|(_, l)| l.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_checked_and_bounded() {
        let ok: HashMap<String, String> =
            [("topology.kubernetes.io/zone".into(), "eu-1a".into())].into();
        assert!(check_labels(&ok).is_ok());
        let bad_value: HashMap<String, String> = [("zone".into(), "a b".into())].into();
        assert!(check_labels(&bad_value).unwrap_err().contains("zone"));
        let bad_key: HashMap<String, String> = [("-zone".into(), "a".into())].into();
        assert!(check_labels(&bad_key).is_err());
        let many: HashMap<String, String> =
            (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_labels(&many).unwrap_err().contains("limit"));
    }

    #[test]
    fn the_book_forgets_the_oldest_past_its_bound() {
        let book = LabelBook::default();
        for i in 0..=MAX_NODES {
            book.record(&NodeName::new(format!("n{i}")).unwrap(), HashMap::new());
        }
        assert!(book.get(&NodeName::new("n0").unwrap()).is_none());
        assert!(
            book.get(&NodeName::new(format!("n{MAX_NODES}")).unwrap())
                .is_some()
        );
    }
}
