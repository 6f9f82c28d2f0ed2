#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The modules of the model crate form a layered graph: no module reaches, through the
//! `crate::` paths it names, back to itself. A circle makes a room you cannot see into
//! alone (issue 13); this test finds one as soon as it is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name -> the modules its non-test code names with `crate::<module>`.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        // `policy/selector.rs` belongs to `policy`; `lib.rs` is the root, not a module.
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "lib" || rel.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // Unit tests may reach anywhere: only the code before them counts.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let names = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let after = &code[i + "crate::".len()..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let is_module = after[name.len()..].starts_with("::");
            if is_module && !name.is_empty() && name != module {
                names.insert(name);
            }
        }
    }
    graph
}

/// A circle through `start`, if there is one.
fn circle_from(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let here = path.last().cloned().unwrap_or_default();
        for next in graph.get(&here).into_iter().flatten() {
            if next == start {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    walk(graph, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn the_model_modules_import_each_other_in_no_circle() {
    let graph = graph();
    assert!(graph.len() > 10, "the source tree was not found: {graph:?}");
    let circles: Vec<String> = graph
        .keys()
        .filter_map(|m| circle_from(&graph, m))
        .map(|c| c.join(" -> "))
        .collect();
    assert!(
        circles.is_empty(),
        "module circles in crates/model:\n{}",
        circles.join("\n")
    );
}

#[test]
fn a_circle_is_found_when_there_is_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(str::to_string).collect()))
    .collect();
    assert_eq!(
        circle_from(&graph, "a").map(|c| c.join(" -> ")),
        Some("a -> b -> c -> a".to_string())
    );
    assert_eq!(circle_from(&graph, "d"), None);
}
