//! Order-preserving parallel map over a slice, on scoped threads. The planner stays pure
//! (no I/O, same result on any number of threads); this only spreads the CPU work of large
//! clusters across cores.

/// `items.iter().map(f).collect()`, split into contiguous chunks across the available cores,
/// with at least `min_per_thread` items per thread (below that, spawning costs more than it
/// saves).
pub(crate) fn par_map<T: Sync, R: Send>(
    items: &[T],
    min_per_thread: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.min(items.len() / min_per_thread.max(1)).max(1);
    if workers <= 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(workers);
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preserves_order() {
        let items: Vec<u32> = (0..10_000).collect();
        assert_eq!(
            par_map(&items, 64, |x| x * 2),
            items.iter().map(|x| x * 2).collect::<Vec<_>>()
        );
        assert_eq!(par_map(&items[..5], 1, |x| x + 1), vec![1, 2, 3, 4, 5]);
        assert!(par_map(&[] as &[u32], 1, |x| *x).is_empty());
    }
}
