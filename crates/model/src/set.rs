//! A small immutable sorted set behind an `Arc`: rules carry the Services and pools they
//! serve, and a plan holds thousands of rules, so cloning and comparing these sets must
//! cost next to nothing.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::node::PoolName;
use crate::service::ServiceRef;

/// Sorted, without duplicates, shared.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SharedSet<T>(Arc<[T]>);

/// The Services a rule serves.
pub type ServiceSet = SharedSet<ServiceRef>;
/// The pools a rule serves.
pub type PoolSet = SharedSet<PoolName>;

impl<T: Ord> SharedSet<T> {
    pub fn new() -> Self {
        SharedSet(Arc::from(Vec::new()))
    }

    /// From any vector: sorts it and drops duplicates.
    pub fn from_unsorted(mut items: Vec<T>) -> Self {
        items.sort();
        items.dedup();
        SharedSet(items.into())
    }

    /// From a vector the caller has already sorted and freed of duplicates (the planner
    /// sorts Services by rank, which is their order). Checked in debug builds.
    pub fn from_sorted(items: Vec<T>) -> Self {
        debug_assert!(
            items.windows(2).all(|w| w[0] < w[1]),
            "SharedSet::from_sorted: not sorted"
        );
        SharedSet(items.into())
    }

    pub fn contains(&self, item: &T) -> bool {
        self.0.binary_search(item).is_ok()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[T] {
        &self.0
    }
}

impl<T: Ord> Default for SharedSet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Ord> FromIterator<T> for SharedSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self::from_unsorted(iter.into_iter().collect())
    }
}

impl<T: Ord, const N: usize> From<[T; N]> for SharedSet<T> {
    fn from(items: [T; N]) -> Self {
        items.into_iter().collect()
    }
}

impl<'a, T> IntoIterator for &'a SharedSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<T: fmt::Debug> fmt::Debug for SharedSet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl<T: Serialize> Serialize for SharedSet<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de, T: Deserialize<'de> + Ord> Deserialize<'de> for SharedSet<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<T>::deserialize(d)?.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_unique_and_cheap_to_clone() {
        let s: SharedSet<u32> = [3, 1, 3, 2].into();
        assert_eq!(s.as_slice(), &[1, 2, 3]);
        assert!(s.contains(&2) && !s.contains(&4));
        let c = s.clone();
        assert!(Arc::ptr_eq(&s.0, &c.0));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, "[1,2,3]");
        let back: SharedSet<u32> = serde_json::from_str("[2,1,2]").unwrap();
        assert_eq!(back.as_slice(), &[1, 2]);
    }
}
