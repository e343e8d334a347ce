//! YAML text -> a small tree whose every node knows its line and column.
//!
//! serde_yaml reports one position for its own first error and none for values, but a policy
//! error must point at the value it is about, and every error must be reported at once. So the
//! policy is read from `saphyr-parser` events into this tree, and `decode` walks the tree.
//!
//! Limits keep hostile input cheap: nesting depth, and the node count after expanding aliases
//! (a "billion laughs" file is refused, not expanded).

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use saphyr_parser::{Event, Parser, ScalarStyle, Span, Tag};

/// A 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// `~`, `null`, or nothing at all (`key:`).
    Null,
    /// `plain` is false for quoted and block scalars and for `!!str`: those are strings even
    /// when they read like numbers.
    Scalar {
        text: String,
        plain: bool,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// What the value is, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "nothing".into(),
            Value::Scalar { text, .. } => format!("`{}`", text.escape_debug()),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }
}

/// A YAML syntax error, or input refused by the limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    /// The field being read when the error came, e.g. `services[0].match`; empty at the top.
    pub path: String,
    pub message: String,
}

/// Deeper nesting than any policy needs.
const MAX_DEPTH: usize = 64;
/// Nodes after alias expansion: a policy of 1024 services has about 100,000.
const MAX_NODES: usize = 1_000_000;

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// An anchored node with its size and height, so an alias can be checked against the limits
/// before it is copied.
struct Anchored {
    node: Node,
    nodes: usize,
    height: usize,
}

fn size_and_height(node: &Node) -> (usize, usize) {
    match &node.value {
        Value::Null | Value::Scalar { .. } => (1, 1),
        Value::Seq(items) => items.iter().fold((1, 1), |(n, h), i| {
            let (ni, hi) = size_and_height(i);
            (n + ni, h.max(hi + 1))
        }),
        Value::Map(entries) => entries.iter().fold((1, 1), |(n, h), (k, v)| {
            let (nk, hk) = size_and_height(k);
            let (nv, hv) = size_and_height(v);
            (n + nk + nv, h.max(hk.max(hv) + 1))
        }),
    }
}

fn pos_of(span: &Span) -> Pos {
    Pos {
        line: span.start.line().max(1),
        column: span.start.col() + 1,
    }
}

struct Builder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, Anchored>,
    root: Option<Node>,
    documents: usize,
    nodes: usize,
}

impl Builder {
    /// Path of the place the next node goes, for syntax errors.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::Seq { items, .. } => path.push_str(&format!("[{}]", items.len())),
                Frame::Map { key: Some(k), .. } => {
                    let name = match &k.value {
                        Value::Scalar { text, .. } => text.as_str(),
                        _ => "?",
                    };
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(name);
                }
                Frame::Map { key: None, .. } => break,
            }
        }
        path
    }

    fn error(&self, pos: Pos, message: impl Into<String>) -> SyntaxError {
        SyntaxError {
            pos,
            path: self.path(),
            message: message.into(),
        }
    }

    fn count(&mut self, n: usize, pos: Pos) -> Result<(), SyntaxError> {
        self.nodes += n;
        if self.nodes > MAX_NODES {
            return Err(self.error(
                pos,
                format!("the document has more than {MAX_NODES} nodes (after expanding aliases)"),
            ));
        }
        Ok(())
    }

    /// Files a finished node under its anchor and into its parent.
    fn complete(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            let (nodes, height) = size_and_height(&node);
            self.anchors.insert(
                anchor,
                Anchored {
                    node: node.clone(),
                    nodes,
                    height,
                },
            );
        }
        match self.stack.last_mut() {
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                Some(k) => entries.push((k, node)),
                None => *key = Some(node),
            },
            None => {
                if self.root.is_some() {
                    return Err(self.error(node.pos, "only one YAML document per file"));
                }
                self.root = Some(node);
            }
        }
        Ok(())
    }

    fn open(&mut self, frame: Frame, pos: Pos) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(pos, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        self.count(1, pos)?;
        self.stack.push(frame);
        Ok(())
    }

    fn event(&mut self, event: Event<'_>, pos: Pos) -> Result<(), SyntaxError> {
        match event {
            Event::DocumentStart(_) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(self.error(pos, "only one YAML document per file"));
                }
            }
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1, pos)?;
                let plain = match tag.as_deref() {
                    None => style == ScalarStyle::Plain,
                    Some(t) => match core_tag(t) {
                        Some("str") => false,
                        Some("int" | "float" | "bool" | "null") => true,
                        _ => return Err(self.error(pos, format!("unsupported YAML tag `{t}`"))),
                    },
                };
                let is_null = plain
                    && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL")
                    && tag.as_deref().is_none_or(|t| core_tag(t) == Some("null"));
                // `key:` with nothing after it: the parser places the empty value at the
                // colon; messages about it read better at the key.
                let pos = match self.stack.last() {
                    Some(Frame::Map { key: Some(k), .. }) if is_null && text.is_empty() => k.pos,
                    _ => pos,
                };
                let value = if is_null {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        plain,
                    }
                };
                self.complete(Node { pos, value }, anchor)?;
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_collection_tag(tag.as_deref(), "seq", pos)?;
                let frame = Frame::Seq {
                    pos,
                    anchor,
                    items: Vec::new(),
                };
                self.open(frame, pos)?;
            }
            Event::MappingStart(anchor, tag) => {
                self.check_collection_tag(tag.as_deref(), "map", pos)?;
                let frame = Frame::Map {
                    pos,
                    anchor,
                    entries: Vec::new(),
                    key: None,
                };
                self.open(frame, pos)?;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { pos, anchor, items }) => (
                        Node {
                            pos,
                            value: Value::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            pos,
                            value: Value::Map(entries),
                        },
                        anchor,
                    ),
                    None => return Err(self.error(pos, "unbalanced end of a collection")),
                };
                self.complete(node, anchor)?;
            }
            Event::Alias(id) => {
                let Some(anchored) = self.anchors.get(&id) else {
                    return Err(self.error(pos, "alias to an unknown anchor"));
                };
                let (nodes, height) = (anchored.nodes, anchored.height);
                if self.stack.len() + height > 2 * MAX_DEPTH {
                    return Err(self.error(pos, "alias nests deeper than 128 levels"));
                }
                let mut node = anchored.node.clone();
                node.pos = pos;
                self.count(nodes, pos)?;
                self.complete(node, 0)?;
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
        Ok(())
    }

    fn check_collection_tag(
        &self,
        tag: Option<&Tag>,
        expected: &str,
        pos: Pos,
    ) -> Result<(), SyntaxError> {
        match tag {
            Some(t) if core_tag(t) != Some(expected) => {
                Err(self.error(pos, format!("unsupported YAML tag `{t}`")))
            }
            _ => Ok(()),
        }
    }
}

/// The suffix of a core-schema tag (`!!str` -> `str`).
fn core_tag(tag: &Tag) -> Option<&str> {
    tag.is_yaml_core_schema().then_some(tag.suffix.as_str())
}

/// Parses one YAML document. An empty document is a `Null` node at line 1, column 1.
pub(crate) fn parse(src: &str) -> Result<Node, SyntaxError> {
    // saphyr-parser has `unwrap`s on internal states; a bug there must become an error
    // message, not a crash of `agent check` or of a running agent's reload.
    let parsed = catch_unwind(AssertUnwindSafe(|| parse_events(src)));
    parsed.unwrap_or_else(|_| {
        Err(SyntaxError {
            pos: Pos::START,
            path: String::new(),
            message: "the YAML parser failed on this input".into(),
        })
    })
}

fn parse_events(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder {
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        documents: 0,
        nodes: 0,
    };
    for item in Parser::new_from_str(src) {
        match item {
            Ok((event, span)) => builder.event(event, pos_of(&span))?,
            Err(e) => {
                let pos = Pos {
                    line: e.marker().line().max(1),
                    column: e.marker().col() + 1,
                };
                return Err(builder.error(pos, e.info().to_owned()));
            }
        }
    }
    Ok(builder.root.unwrap_or(Node {
        pos: Pos::START,
        value: Value::Null,
    }))
}

/// Where each field path's value is, so checks that run after decoding (and the lead's
/// runtime checks) can point at a value by its path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SpanIndex {
    positions: HashMap<String, Pos>,
}

impl SpanIndex {
    pub fn build(root: &Node) -> SpanIndex {
        let mut index = SpanIndex::default();
        index.positions.insert(String::new(), root.pos);
        index.walk(root, String::new());
        index
    }

    fn walk(&mut self, node: &Node, path: String) {
        match &node.value {
            Value::Seq(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = format!("{path}[{i}]");
                    self.positions.entry(p.clone()).or_insert(item.pos);
                    self.walk(item, p);
                }
            }
            Value::Map(entries) => {
                for (k, v) in entries {
                    if let Value::Scalar { text, .. } = &k.value {
                        let p = if path.is_empty() {
                            text.clone()
                        } else {
                            format!("{path}.{text}")
                        };
                        if !self.positions.contains_key(&p) {
                            self.positions.insert(p.clone(), v.pos);
                            self.walk(v, p);
                        }
                    }
                }
            }
            Value::Null | Value::Scalar { .. } => {}
        }
    }

    /// Position of `path`'s value; for a path that is not in the file (a defaulted or missing
    /// field), the position of the closest enclosing value that is.
    pub fn lookup(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.positions.get("").copied().unwrap_or(Pos::START),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(line: usize, column: usize) -> Pos {
        Pos { line, column }
    }

    #[test]
    fn positions_of_values() {
        let src = "a: 1\nb:\n  c: 'x'\n  d:\n    - 5\n    - e: f\n";
        let root = parse(src).unwrap();
        let index = SpanIndex::build(&root);
        assert_eq!(index.lookup("a"), at(1, 4));
        assert_eq!(index.lookup("b.c"), at(3, 6));
        assert_eq!(index.lookup("b.d[0]"), at(5, 7));
        assert_eq!(index.lookup("b.d[1].e"), at(6, 10));
        // Missing fields fall back to the enclosing mapping.
        assert_eq!(index.lookup("b.d[1].zzz"), index.lookup("b.d[1]"));
        assert_eq!(index.lookup("nothing.at.all"), index.lookup(""));
    }

    #[test]
    fn scalars_keep_their_style() {
        let root = parse("a: 80\nb: '80'\nc: ~\nd:\ne: !!str 5\n").unwrap();
        let Value::Map(entries) = root.value else {
            panic!("expected a map, got {root:?}")
        };
        let values: Vec<_> = entries.into_iter().map(|(_, v)| v.value).collect();
        assert_eq!(
            values,
            vec![
                Value::Scalar {
                    text: "80".into(),
                    plain: true
                },
                Value::Scalar {
                    text: "80".into(),
                    plain: false
                },
                Value::Null,
                Value::Null,
                Value::Scalar {
                    text: "5".into(),
                    plain: false
                },
            ]
        );
    }

    #[test]
    fn syntax_errors_have_positions_and_paths() {
        let e = parse("a:\n  b: [1, 2\n").unwrap_err();
        assert_eq!(e.path, "a.b[2]");
        assert!(e.pos.line >= 2, "{e:?}");
        let e = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.message, "only one YAML document per file");
    }

    #[test]
    fn aliases_expand_within_limits() {
        let root = parse("a: &x {k: 1}\nb: *x\n").unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("expected a map")
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let e = parse(&bomb).unwrap_err();
        assert!(e.message.contains("more than"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(10_000);
        assert!(parse(&deep).is_err());
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let e = parse(&deep).unwrap_err();
        assert!(e.message.contains("nesting deeper"), "{e:?}");
    }

    #[test]
    fn empty_input_is_null() {
        assert_eq!(parse("").unwrap().value, Value::Null);
        assert_eq!(parse("# only a comment\n").unwrap().value, Value::Null);
    }
}
