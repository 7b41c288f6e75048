//! [`RangeSet`]: a set of offsets kept as a floor plus disjoint ranges
//! above it (settled messages, removed dead letters).

use std::collections::BTreeMap;

/// A set of offsets as disjoint half-open ranges, with a floor below which
/// every offset is in the set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    floor: u64,
    /// start -> end (exclusive), all starts > floor, disjoint, non-adjacent.
    ranges: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub fn with_floor(floor: u64) -> Self {
        Self {
            floor,
            ranges: BTreeMap::new(),
        }
    }

    /// Every offset below this is in the set; the floor itself is not.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn contains(&self, x: u64) -> bool {
        if x < self.floor {
            return true;
        }
        self.ranges
            .range(..=x)
            .next_back()
            .is_some_and(|(_, end)| x < *end)
    }

    /// Adds `[start, end)`. Returns how many offsets were newly added.
    pub fn insert(&mut self, start: u64, end: u64) -> u64 {
        let start = start.max(self.floor);
        if start >= end {
            return 0;
        }
        let mut added = end - start;
        let mut new_start = start;
        let mut new_end = end;
        // Merge with overlapping or adjacent ranges.
        let overlapping: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .rev()
            .take_while(|(_, e)| **e >= start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in overlapping {
            let lo = s.max(start);
            let hi = e.min(end);
            if hi > lo {
                added -= hi - lo;
            }
            new_start = new_start.min(s);
            new_end = new_end.max(e);
            self.ranges.remove(&s);
        }
        if new_start <= self.floor {
            self.floor = new_end;
            // The raised floor may now touch the next range.
            if let Some((&s, &e)) = self.ranges.iter().next() {
                if s <= self.floor {
                    self.ranges.remove(&s);
                    self.floor = self.floor.max(e);
                }
            }
        } else {
            self.ranges.insert(new_start, new_end);
        }
        added
    }

    /// Raises the floor to at least `floor`, dropping ranges below it.
    pub fn raise_floor(&mut self, floor: u64) {
        if floor <= self.floor {
            return;
        }
        self.floor = floor;
        let below: Vec<(u64, u64)> = self.ranges.range(..=floor).map(|(s, e)| (*s, *e)).collect();
        for (s, e) in below {
            self.ranges.remove(&s);
            if e > floor {
                self.floor = e;
            }
        }
    }

    /// Removes every offset at or above `end` (and lowers the floor to it).
    pub fn truncate_at(&mut self, end: u64) {
        self.floor = self.floor.min(end);
        let above: Vec<(u64, u64)> = self
            .ranges
            .range(..)
            .filter(|(_, e)| **e > end)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, _) in above {
            self.ranges.remove(&s);
            if s < end {
                self.ranges.insert(s, end);
            }
        }
    }

    /// Offsets in `[start, end)` that are in the set.
    pub fn count_in(&self, start: u64, end: u64) -> u64 {
        if start >= end {
            return 0;
        }
        let below_floor = self.floor.min(end).saturating_sub(start);
        let start = start.max(self.floor);
        let in_ranges: u64 = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, e)| **e > start)
            .map(|(s, e)| (*e).min(end) - (*s).max(start))
            .sum();
        below_floor + in_ranges
    }

    /// Offsets in the set at or above the floor.
    pub fn count_above_floor(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| e - s).sum()
    }

    /// The ranges above the floor, in order.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|(s, e)| (*s, *e))
    }

    /// Number of ranges held (memory is proportional to it).
    pub fn range_count(&self) -> usize {
        self.ranges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_set_merges_and_raises_the_floor() {
        let mut s = RangeSet::with_floor(10);
        assert_eq!(s.insert(12, 14), 2);
        assert_eq!(s.insert(15, 16), 1);
        assert_eq!(s.insert(14, 15), 1);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(12, 16)]);
        assert_eq!(s.insert(10, 12), 2);
        assert_eq!(s.floor(), 16);
        assert_eq!(s.range_count(), 0);
        assert!(s.contains(15));
        assert!(!s.contains(16));
        assert_eq!(s.insert(5, 17), 1);
        assert_eq!(s.floor(), 17);
        s.insert(20, 30);
        s.raise_floor(25);
        assert_eq!(s.floor(), 30);
    }

    #[test]
    fn truncating_forgets_offsets_past_the_end() {
        let mut s = RangeSet::with_floor(10);
        s.insert(12, 20);
        s.insert(25, 30);
        s.truncate_at(15);
        assert_eq!(s.ranges().collect::<Vec<_>>(), vec![(12, 15)]);
        assert!(!s.contains(16));
        s.truncate_at(5);
        assert_eq!(s.floor(), 5);
        assert_eq!(s.range_count(), 0);
    }

    #[test]
    fn count_in_counts_members_of_a_range() {
        let mut s = RangeSet::with_floor(10);
        s.insert(12, 14);
        s.insert(20, 25);
        assert_eq!(s.count_in(0, 30), 10 + 2 + 5);
        assert_eq!(s.count_in(10, 20), 2);
        assert_eq!(s.count_in(13, 22), 1 + 2);
        assert_eq!(s.count_in(5, 8), 3);
        assert_eq!(s.count_in(25, 40), 0);
        assert_eq!(s.count_in(9, 9), 0);
    }
}
