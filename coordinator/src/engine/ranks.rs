//! Positions in the wait queue without walking it: a Fenwick tree (binary
//! indexed tree) over the waiters' slots, which are handed out in join
//! order. A waiter's position is the number of waiters still queued whose
//! slot is not after its own, found in O(log n); joining and leaving cost
//! O(log n) too.

/// Counts of occupied slots, 1-based.
#[derive(Debug, Default)]
pub(super) struct Ranks {
    /// `tree[i]` sums the slots `(i - lowbit(i), i]`; `tree[0]` is unused.
    tree: Vec<i32>,
}

impl Ranks {
    /// Slots 1..=`capacity`, all empty.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            tree: vec![0; capacity + 1],
        }
    }

    /// The highest usable slot.
    pub(super) fn capacity(&self) -> usize {
        self.tree.len().saturating_sub(1)
    }

    fn add(&mut self, slot: usize, delta: i32) {
        debug_assert!(
            slot >= 1 && slot <= self.capacity(),
            "slot {slot} out of range"
        );
        let mut i = slot;
        while i < self.tree.len() {
            self.tree[i] += delta;
            i += i & i.wrapping_neg();
        }
    }

    /// Marks `slot` occupied.
    pub(super) fn insert(&mut self, slot: usize) {
        self.add(slot, 1);
    }

    /// Marks `slot` empty.
    pub(super) fn remove(&mut self, slot: usize) {
        self.add(slot, -1);
    }

    /// How many occupied slots are `<= slot`.
    pub(super) fn rank(&self, slot: usize) -> usize {
        let mut i = slot.min(self.capacity());
        let mut sum = 0i64;
        while i > 0 {
            sum += i64::from(self.tree[i]);
            i -= i & i.wrapping_neg();
        }
        sum.max(0) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Ranks agree with counting the occupied slots one by one.
        #[test]
        fn rank_counts_occupied_slots(ops in proptest::collection::vec((1usize..64, any::<bool>()), 0..200)) {
            let mut ranks = Ranks::with_capacity(64);
            let mut occupied = [false; 65];
            for (slot, insert) in ops {
                if insert && !occupied[slot] {
                    ranks.insert(slot);
                    occupied[slot] = true;
                } else if !insert && occupied[slot] {
                    ranks.remove(slot);
                    occupied[slot] = false;
                }
                for probe in 0..=64 {
                    let expected = occupied[1..=probe.max(1)].iter().filter(|o| **o).count();
                    let expected = if probe == 0 { 0 } else { expected };
                    prop_assert_eq!(ranks.rank(probe), expected);
                }
            }
        }
    }
}
