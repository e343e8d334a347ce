//! POLICY.md, the user's reference, stays true to the model: its annotated example is a valid
//! policy and sets every field the model accepts, in every section. A field added to the model
//! and not to the reference fails here, named.

use super::{load_str, read};

const REFERENCE: &str = include_str!("../../../POLICY.md");
/// A key no section has: each section's refusal of it lists the fields the section accepts.
const PROBE: &str = "zz_probe";

/// The first ```yaml block of POLICY.md.
fn example() -> &'static str {
    let start = REFERENCE
        .find("```yaml\n")
        .expect("POLICY.md has a ```yaml block")
        + 8;
    let len = REFERENCE[start..]
        .find("```")
        .expect("the ```yaml block is closed");
    &REFERENCE[start..start + len]
}

#[test]
fn the_reference_example_is_a_valid_policy() {
    if let Err(e) = load_str(example(), "POLICY.md") {
        panic!("POLICY.md's example is not a valid policy:\n{e}");
    }
}

/// The fields the section at `parent` accepts, as the model says when it refuses `PROBE`
/// written on the line after `anchor` (a key of that section whose value fits on its line).
fn accepted_fields(src: &str, parent: &str, anchor: read::Pos) -> Vec<String> {
    let mut lines: Vec<&str> = src.lines().collect();
    let probe = format!("{}{PROBE}: 0", " ".repeat(anchor.column - 1));
    lines.insert(anchor.line, &probe);
    let errors = load_str(&lines.join("\n"), "POLICY.md")
        .expect_err("a section took an unknown field")
        .0;
    let path = if parent.is_empty() {
        PROBE.to_owned()
    } else {
        format!("{parent}.{PROBE}")
    };
    let refusal = errors
        .iter()
        .find(|d| d.path == path)
        .unwrap_or_else(|| panic!("no refusal of {path} in {errors:?}"));
    let (_, list) = refusal
        .message
        .split_once("expected one of ")
        .unwrap_or_else(|| panic!("{path}: {}", refusal.message));
    list.split(", ")
        .map(|f| f.trim_matches('`').to_owned())
        .collect()
}

#[test]
fn the_reference_example_sets_every_field() {
    let src = example();
    let index = read::index(src).unwrap().unwrap();
    // Each section of the example (a path with keys under it) and one of its keys on a line
    // of its own: the first one whose value is not a section or a list itself.
    let mut sections: std::collections::BTreeMap<String, read::Pos> = Default::default();
    let reverse = index.reverse();
    let mut keys: Vec<(read::Pos, &str)> = reverse.keys().collect();
    keys.sort_by_key(|(pos, _)| (pos.line, pos.column));
    let has_children = |path: &str| {
        keys.iter().any(|(_, k)| {
            k.len() > path.len() && k.starts_with(path) && k[path.len()..].starts_with(['.', '['])
        })
    };
    for (pos, path) in &keys {
        let parent = path.rfind('.').map_or("", |i| &path[..i]);
        if !has_children(path) {
            sections.entry(parent.to_owned()).or_insert(*pos);
        }
    }
    // A list's items are one kind of section: a field set in any item is documented.
    let unindexed = |path: &str| {
        let mut out = String::new();
        let mut in_index = false;
        for c in path.chars() {
            match c {
                '[' => in_index = true,
                ']' => in_index = false,
                _ if in_index => continue,
                _ => {}
            }
            out.push(c);
        }
        out
    };
    let documented: std::collections::BTreeSet<String> =
        keys.iter().map(|(_, path)| unindexed(path)).collect();
    let mut missing = std::collections::BTreeSet::new();
    for (parent, anchor) in &sections {
        for field in accepted_fields(src, parent, *anchor) {
            let path = if parent.is_empty() {
                field.clone()
            } else {
                format!("{parent}.{field}")
            };
            // Read only to be refused with a message of its own (see POLICY.md).
            let removed = unindexed(&path) == "services[].load_balancing.max_connections";
            if !removed && !index.mentions(&path) && !documented.contains(&unindexed(&path)) {
                missing.insert(unindexed(&path));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields the model accepts that POLICY.md's example does not set: {missing:?}"
    );
    // The sections it found: a guard against a walk that found nothing to check.
    for section in [
        "",
        "agent",
        "services[0].health_check.retry",
        "services[0].shaping",
    ] {
        assert!(
            sections.contains_key(section),
            "{section} not walked: {sections:?}"
        );
    }
}
