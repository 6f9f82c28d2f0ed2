//! Did-you-mean: a cheap typo check for annotation and config keys.

use crate::service::ANNOTATION_PREFIX;

/// A cheap typo check: same length give or take two, and most characters shared in order.
pub fn similar(known: &str, given: &str) -> bool {
    let a = known
        .trim_start_matches(ANNOTATION_PREFIX)
        .to_ascii_lowercase();
    let b = given
        .trim_start_matches(ANNOTATION_PREFIX)
        .to_ascii_lowercase();
    let (a, b) = (a.as_str(), b.as_str());
    if a == b {
        return true;
    }
    if a.len().abs_diff(b.len()) > 2 {
        return false;
    }
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    let common_tail = a
        .chars()
        .rev()
        .zip(b.chars().rev())
        .take_while(|(x, y)| x == y)
        .count();
    common + common_tail + 2 >= a.len().min(b.len())
}
