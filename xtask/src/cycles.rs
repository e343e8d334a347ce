//! No import cycles between the top-level modules of a crate: a module reaches only into
//! modules that do not reach back (ARCHITECTURE.md's layers). Read from the sources as text:
//! every `crate::NAME` path and every name of a `use crate::{...}` group, outside comments,
//! a file's trailing `#[cfg(test)] mod tests` and test-only `tests.rs` files. A unit test
//! holds it for every crate.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::Path,
};

/// Top-level module -> the top-level modules it names.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module graph of the crate whose sources are in `src`.
pub fn graph(src: &Path) -> io::Result<Graph> {
    let mut files = Vec::new();
    collect(src, &mut files)?;
    let module = |path: &Path| -> Option<String> {
        let rel = path.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_str()?;
        let name = first.strip_suffix(".rs").unwrap_or(first);
        (!matches!(name, "main" | "lib" | "bin")).then(|| name.to_owned())
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module(f)).collect();
    // Test-only files (`tests.rs`, `mod tests;` of a module) may reach anywhere.
    let test_only = |path: &Path| path.file_stem().is_some_and(|s| s == "tests");
    let mut graph = Graph::new();
    for file in files.iter().filter(|f| !test_only(f)) {
        let Some(from) = module(file) else { continue };
        let text = fs::read_to_string(file)?;
        let edges = graph.entry(from.clone()).or_default();
        for to in named(&code(&text)) {
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    Ok(graph)
}

fn collect(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(())
}

/// The text without line comments and without a trailing `#[cfg(test)] mod tests {`.
fn code(text: &str) -> String {
    let end = text.find("#[cfg(test)]\nmod tests {").unwrap_or(text.len());
    text[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first segment of every `crate::` path in `code`, groups included.
fn named(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `use crate::{a::b, c, d::{e, f}}`: the names at depth 0.
            let (mut depth, mut start_of_item) = (0, true);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start_of_item = true,
                    _ if start_of_item && (c.is_alphanumeric() || c == '_') => {
                        out.insert(ident(&group[j..]));
                        start_of_item = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every cycle of `graph` (its strongly connected components of more than one module).
pub fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    // Modules that reach each other both ways share a component.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_owned()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for (m, r) in &reaches {
        if done.contains(*m) || !r.contains(*m) {
            continue;
        }
        let component: Vec<String> = r
            .iter()
            .filter(|o| reaches.get(o).is_some_and(|back| back.contains(*m)))
            .cloned()
            .collect();
        done.extend(component.iter().cloned());
        out.push(component);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_crate_has_an_import_cycle() {
        let root = crate::workspace::root();
        for krate in ["agent", "agent-common", "agent-ebpf", "xtask", "tests"] {
            let graph = graph(&root.join(krate).join("src")).unwrap();
            assert!(graph.len() > 3, "{krate}: only {graph:?}");
            let cycles = cycles(&graph);
            assert!(cycles.is_empty(), "{krate}: import cycles {cycles:?}");
        }
    }

    #[test]
    fn finds_a_cycle_through_a_group() {
        assert_eq!(
            named("use crate::{a::b, c, d::{e, f}};\nlet x = crate::g::h;"),
            ["a", "c", "d", "g"].map(String::from).into()
        );
        let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
            .into_iter()
            .map(|(f, t)| (f.to_owned(), BTreeSet::from([t.to_owned()])))
            .collect();
        assert_eq!(cycles(&graph), vec![vec!["a", "b", "c"]]);
    }
}
