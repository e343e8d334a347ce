//! Reading a valid policy in one pass over the text.
//!
//! The reference reader (read.rs) parses the text twice through serde-saphyr: once for the
//! index of positions, once for the model. Here the parser serde-saphyr itself uses
//! (granit-parser, with the same settings) runs once; its events become a flat tree of nodes,
//! the index is recorded on the way, and the model is deserialized from the tree by the same
//! `Deserialize` impls and leaf readers. That is what makes a reload of a large policy fast.
//!
//! It reads only what a file without reading errors needs and gives up (`None`) on anything
//! else: a syntax error, a tag, an anchor or alias, a duplicate key, a number it would have to
//! guess at, a wrong value, a field the model does not know, a shape it does not expect.
//! `load_str` then reads the file with the reference reader, which reports every error of
//! reading. Where it does not give up, policy and index are the reference reader's, exactly,
//! so validation finds what it would find there; the tests hold it to that on every file and
//! variant they have.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::value::{SeqDeserializer, StrDeserializer};
use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor,
};
use serde_saphyr::granit_parser::{self as granit, Event, ScalarStyle, Span};
use serde_saphyr::options::DuplicateKeyPolicy;

use super::model::Policy;
use super::read::{self, Index, Pos};

/// Bounds well inside the reference reader's (its budget refuses a file beyond them), so
/// that nothing it refuses for size is read here.
const MAX_OPEN: usize = read::MAX_DEPTH - 4;
const MAX_NODES: usize = read::MAX_NODES / 2;
const MAX_BYTES: usize = 32 << 20;
/// More keys than any section of the model has fields: such a mapping is not a valid one.
const MAX_KEYS: usize = 32;

/// Reads a policy that reads without errors: the model as read (before validation) and the
/// index of its file. `None`: leave the file to the reference reader.
pub(crate) fn read(src: &str) -> Option<(Policy, Index)> {
    if src.len() > MAX_BYTES {
        return None;
    }
    let tree = build(src)?;
    if matches!(tree.nodes.first()?.value, Value::Null) {
        return None;
    }
    let (policy, wrong) = read::collecting(src, || {
        Policy::deserialize(NodeDe {
            nodes: &tree.nodes,
            i: 0,
        })
    });
    match (policy, wrong.is_empty()) {
        (Ok(policy), true) => Some((policy, tree.index)),
        _ => None,
    }
}

/// A node of the document. Nodes are in document order: a collection's children follow it,
/// a mapping's as key, value, key, value.
struct Node<'a> {
    value: Value<'a>,
    at: Loc,
    /// One past the last node of this node's subtree.
    end: u32,
}

/// A scalar as serde-saphyr resolves it for `deserialize_any`, or a collection.
#[derive(Debug, PartialEq)]
enum Value<'a> {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    Str(Cow<'a, str>),
    List,
    Map,
}

/// Where a node is: a serde-saphyr `Location` in parts (line and column 1-based, offset and
/// length in characters, then in bytes).
#[derive(Debug, Clone, Copy)]
struct Loc {
    line: u32,
    column: u32,
    offset: u32,
    len: u32,
    byte: u32,
    byte_len: u32,
}

impl Loc {
    /// As serde-saphyr's `location_from_span`; `None` for anything out of the ordinary.
    fn of(span: &Span) -> Option<Loc> {
        let n = |v: usize| u32::try_from(v).ok();
        let (start, end) = (&span.start, &span.end);
        let byte = start.byte_offset()?;
        Some(Loc {
            line: n(start.line())?,
            column: n(start.col().checked_add(1)?)?,
            offset: n(start.index())?,
            len: n(end.index().checked_sub(start.index())?)?,
            byte: n(byte)?,
            byte_len: n(end.byte_offset()?.checked_sub(byte)?)?,
        })
    }

    fn pos(&self) -> Pos {
        let n = |v: u32| usize::try_from(v).unwrap_or(usize::MAX).max(1);
        Pos {
            line: n(self.line),
            column: n(self.column),
        }
    }
}

/// serde-saphyr's resolution of a plain scalar without a tag in `deserialize_any`
/// (`YamlDeserializer::deserialize_any`, `parse_scalars.rs`): null, a YAML 1.1 boolean, an
/// integer, a float, else a string. `None` where that takes more than is written here
/// (leading zeros, other radixes, digit separators, overflow, `.inf` and `.nan`, which it
/// refuses as typeless values): the reference reader decides those.
fn resolve(v: Cow<'_, str>) -> Option<Value<'_>> {
    if matches!(&*v, "" | "~" | "null" | "Null" | "NULL") {
        return Some(Value::Null);
    }
    let is = |words: &[&str]| words.iter().any(|w| v.eq_ignore_ascii_case(w));
    if is(&["true", "yes", "y", "on"]) {
        return Some(Value::Bool(true));
    }
    if is(&["false", "no", "n", "off"]) {
        return Some(Value::Bool(false));
    }
    // A plain scalar has no padding; serde-saphyr trims some before it parses.
    if v.trim_matches([' ', '\t', '\r', '\n']) != v {
        return None;
    }
    let unsigned = v.strip_prefix(['+', '-']).unwrap_or(&v);
    let first = unsigned.bytes().next();
    if first.is_some_and(|b| b.is_ascii_digit()) {
        if unsigned.bytes().all(|b| b.is_ascii_digit()) {
            if unsigned.len() > 1 && unsigned.starts_with('0') {
                return None;
            }
            return if v.starts_with('-') {
                v.parse().ok().map(Value::I64)
            } else {
                unsigned.parse().ok().map(Value::U64)
            };
        }
        let radix = unsigned.len() > 1 && matches!(unsigned.as_bytes()[1], b'x' | b'o' | b'b');
        if radix || unsigned.contains(['_', 'X', 'O', 'B']) {
            return None;
        }
    } else if first == Some(b'.') && unsigned.contains(['i', 'I', 'n', 'N']) {
        // `.inf`, `.nan` and their spellings.
        return None;
    }
    // Rust's float syntax is the one serde-saphyr uses for finite floats; the words it also
    // takes (`inf`, `nan`, `infinity`) are strings to serde-saphyr.
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => Some(Value::F64(x)),
        Ok(_) if first.is_some_and(|b| b.is_ascii_digit()) => None,
        _ => Some(Value::Str(v)),
    }
}

struct Tree<'a> {
    nodes: Vec<Node<'a>>,
    index: Index,
}

/// An open collection.
struct Open {
    node: usize,
    /// The length of the collection's own path.
    path_len: usize,
    /// A list's next item, or a mapping's key count.
    count: usize,
    /// A mapping: the position of the key whose value comes next, if one does.
    key: Option<Pos>,
    map: bool,
}

#[derive(Default)]
struct Builder<'a> {
    nodes: Vec<Node<'a>>,
    index: Index,
    open: Vec<Open>,
    /// The path of the value being read.
    path: String,
    scalar_bytes: usize,
}

/// The parser's settings of the reference reader (serde-saphyr's `Budget::parser_options`
/// for its budget and options).
fn parser_options() -> Option<granit::Options> {
    let options = read::options(DuplicateKeyPolicy::FirstWins);
    let budget = options.budget?;
    let mut o = granit::Options::default();
    o.block_nesting_limit = o
        .block_nesting_limit
        .max(budget.max_depth.saturating_add(1));
    o.simple_key_max_lookahead = budget.simple_key_max_lookahead;
    o.flow_nesting_limit = budget.flow_nesting_limit;
    o.emit_comments = false;
    o.strict_indentation = options.strict_indentation;
    o.bom_inside_document_as_content = options.bom_inside_document_as_content;
    Some(o)
}

/// The events of `src` as a tree, and its index: `None` for anything but a single document of
/// plain mappings, lists and scalars within the bounds.
fn build(src: &str) -> Option<Tree<'_>> {
    // A node takes some 8 bytes of text or more.
    let mut b = Builder {
        index: Index::with_capacity(src.len() / 8),
        ..Builder::default()
    };
    let mut documents = 0;
    for event in granit::Parser::new_from_str_with_options(src, parser_options()?) {
        let (event, span) = event.ok()?;
        match event {
            Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
            Event::DocumentStart(..) => {
                documents += 1;
                if documents > 1 {
                    return None;
                }
            }
            Event::Scalar(value, style, 0, None) => {
                b.scalar_bytes = b.scalar_bytes.saturating_add(value.len());
                let value = match style {
                    ScalarStyle::Plain => resolve(value)?,
                    _ => Value::Str(value),
                };
                b.scalar(value, Loc::of(&span)?)?;
            }
            Event::SequenceStart(_, 0, None) => b.start(Value::List, Loc::of(&span)?)?,
            Event::MappingStart(_, 0, None) => b.start(Value::Map, Loc::of(&span)?)?,
            Event::SequenceEnd | Event::MappingEnd => b.close()?,
            _ => return None,
        }
        if b.nodes.len() > MAX_NODES || b.scalar_bytes > MAX_BYTES {
            return None;
        }
    }
    if !b.open.is_empty() || b.nodes.is_empty() {
        return None;
    }
    Some(Tree {
        nodes: b.nodes,
        index: b.index,
    })
}

impl<'a> Builder<'a> {
    fn scalar(&mut self, value: Value<'a>, at: Loc) -> Option<()> {
        match self.open.last() {
            Some(o) if o.map && o.key.is_none() => self.key(value, at),
            _ => {
                let node = self.begin(value, at)?;
                self.end(node)
            }
        }
    }

    fn start(&mut self, value: Value<'a>, at: Loc) -> Option<()> {
        if self.open.last().is_some_and(|o| o.map && o.key.is_none()) {
            return None;
        }
        if self.open.len() >= MAX_OPEN {
            return None;
        }
        let map = value == Value::Map;
        let node = self.begin(value, at)?;
        self.open.push(Open {
            node,
            path_len: self.path.len(),
            count: 0,
            key: None,
            map,
        });
        Some(())
    }

    fn close(&mut self) -> Option<()> {
        let open = self.open.pop()?;
        if open.key.is_some() {
            return None;
        }
        self.end(open.node)
    }

    /// A key of the innermost mapping: a string, not one it already has. The path becomes
    /// that of its value.
    fn key(&mut self, value: Value<'a>, at: Loc) -> Option<()> {
        let Value::Str(name) = &value else {
            return None;
        };
        let open = self.open.last_mut()?;
        open.count += 1;
        if open.count > MAX_KEYS {
            return None;
        }
        // The mapping's keys so far, each followed by its (complete) value.
        let mut k = open.node + 1;
        while k < self.nodes.len() {
            if matches!(&self.nodes[k].value, Value::Str(s) if s == name) {
                return None;
            }
            let next = usize::try_from(self.nodes.get(k + 1)?.end).ok()?;
            if next <= k {
                return None;
            }
            k = next;
        }
        open.key = Some(at.pos());
        if !self.path.is_empty() {
            self.path.push('.');
        }
        self.path.push_str(name);
        let end = u32::try_from(self.nodes.len() + 1).ok()?;
        self.nodes.push(Node { value, at, end });
        Some(())
    }

    /// A value starts: in a list, its path is the next item's.
    fn begin(&mut self, value: Value<'a>, at: Loc) -> Option<usize> {
        if let Some(open) = self.open.last()
            && !open.map
        {
            use std::fmt::Write;
            write!(self.path, "[{}]", open.count).ok()?;
        } else if self.open.is_empty() && !self.nodes.is_empty() {
            return None;
        }
        self.nodes.push(Node { value, at, end: 0 });
        Some(self.nodes.len() - 1)
    }

    /// A value ends: recorded in the index at its path, which then becomes its parent's.
    fn end(&mut self, node: usize) -> Option<()> {
        let end = u32::try_from(self.nodes.len()).ok()?;
        let n = &mut self.nodes[node];
        n.end = end;
        let (at, null) = (n.at, n.value == Value::Null);
        let (key, parent) = match self.open.last_mut() {
            Some(open) if open.map => (open.key.take(), open.path_len),
            Some(open) => {
                open.count += 1;
                (None, open.path_len)
            }
            None => (None, 0),
        };
        let empty = null && at.len == 0;
        self.index.record(&self.path, at.pos(), null, empty, key);
        self.path.truncate(parent);
        Some(())
    }
}

/// Why reading stopped here: the reference reader will say what is wrong, if anything is.
#[derive(Debug)]
struct GiveUp;

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("left to the reference reader")
    }
}

impl std::error::Error for GiveUp {}

impl de::Error for GiveUp {
    fn custom<T: fmt::Display>(_: T) -> GiveUp {
        GiveUp
    }
}

/// The name serde-saphyr's `Spanned` asks a deserializer for, and the marker field of the
/// map it then expects (serde-saphyr's `spanned.rs`).
const SPANNED: &str = "__yaml_spanned";
const SPANNED_MARKER: &str = "__serde_saphyr_private_spanned";

/// A node as serde-saphyr's deserializer presents it, for what the model asks of it: any
/// value, an option, a section (struct), a `Spanned` leaf. Anything else gives up.
#[derive(Clone, Copy)]
struct NodeDe<'t, 'a> {
    nodes: &'t [Node<'a>],
    i: usize,
}

impl<'t, 'a> NodeDe<'t, 'a> {
    fn node(&self) -> &'t Node<'a> {
        &self.nodes[self.i]
    }

    fn children(&self) -> Children<'t, 'a> {
        Children {
            nodes: self.nodes,
            next: self.i + 1,
            end: self.node().end as usize,
            value: 0,
        }
    }
}

macro_rules! give_up {
    ($($method:ident($($arg:ty),*)),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, $(_: $arg,)* _: V) -> Result<V::Value, GiveUp> {
            Err(GiveUp)
        }
    )*};
}

impl<'de> Deserializer<'de> for NodeDe<'_, '_> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        match &self.node().value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(v) => visitor.visit_bool(*v),
            Value::U64(v) => visitor.visit_u64(*v),
            Value::I64(v) => visitor.visit_i64(*v),
            Value::F64(v) => visitor.visit_f64(*v),
            Value::Str(v) => visitor.visit_str(v),
            Value::List => visitor.visit_seq(self.children()),
            Value::Map => visitor.visit_map(self.children()),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        match self.node().value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        _: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, GiveUp> {
        match self.node().value {
            Value::Map => visitor.visit_map(self.children()),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, GiveUp> {
        match name {
            SPANNED => visitor.visit_newtype_struct(SpannedDe(self)),
            _ => Err(GiveUp),
        }
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        visitor.visit_unit()
    }

    give_up! {
        deserialize_bool(), deserialize_i8(), deserialize_i16(), deserialize_i32(),
        deserialize_i64(), deserialize_i128(), deserialize_u8(), deserialize_u16(),
        deserialize_u32(), deserialize_u64(), deserialize_u128(), deserialize_f32(),
        deserialize_f64(), deserialize_char(), deserialize_str(), deserialize_string(),
        deserialize_bytes(), deserialize_byte_buf(), deserialize_unit(), deserialize_seq(),
        deserialize_map(), deserialize_identifier(), deserialize_unit_struct(&'static str),
        deserialize_tuple(usize), deserialize_tuple_struct(&'static str, usize),
        deserialize_enum(&'static str, &'static [&'static str]),
    }
}

/// The items of a list, or the entries of a mapping.
struct Children<'t, 'a> {
    nodes: &'t [Node<'a>],
    next: usize,
    end: usize,
    /// A mapping: the value of the key read last.
    value: usize,
}

impl<'t, 'a> Children<'t, 'a> {
    /// The next child, and the node after its subtree.
    fn take(&mut self) -> Option<NodeDe<'t, 'a>> {
        if self.next >= self.end {
            return None;
        }
        let i = self.next;
        self.next = self.nodes[i].end as usize;
        Some(NodeDe {
            nodes: self.nodes,
            i,
        })
    }
}

impl<'de> SeqAccess<'de> for Children<'_, '_> {
    type Error = GiveUp;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, GiveUp> {
        self.take().map(|item| seed.deserialize(item)).transpose()
    }
}

impl<'de> MapAccess<'de> for Children<'_, '_> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, GiveUp> {
        let Some(key) = self.take() else {
            return Ok(None);
        };
        let Value::Str(name) = &key.node().value else {
            return Err(GiveUp);
        };
        self.value = self.next;
        self.take().ok_or(GiveUp)?;
        seed.deserialize(StrDeserializer::new(name)).map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, GiveUp> {
        seed.deserialize(NodeDe {
            nodes: self.nodes,
            i: self.value,
        })
    }
}

/// A node as serde-saphyr presents it to `Spanned`: a map of a marker, the value, and where
/// it is referenced and defined (the same place: there are no aliases here).
struct SpannedDe<'t, 'a>(NodeDe<'t, 'a>);

impl<'de> Deserializer<'de> for SpannedDe<'_, '_> {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        visitor.visit_map(SpannedFields {
            node: self.0,
            field: 0,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct SpannedFields<'t, 'a> {
    node: NodeDe<'t, 'a>,
    field: usize,
}

const SPANNED_FIELDS: [&str; 4] = [SPANNED_MARKER, "value", "referenced", "defined"];

impl<'de> MapAccess<'de> for SpannedFields<'_, '_> {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, GiveUp> {
        let Some(name) = SPANNED_FIELDS.get(self.field) else {
            return Ok(None);
        };
        self.field += 1;
        seed.deserialize(StrDeserializer::new(name)).map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, GiveUp> {
        match self.field {
            1 => seed.deserialize(true.into_deserializer()),
            2 => seed.deserialize(self.node),
            _ => seed.deserialize(Field::Location(self.node.node().at)),
        }
    }
}

/// A part of a serde-saphyr `Location`, as its `Deserialize` impl reads it.
#[derive(Clone, Copy)]
enum Field {
    Number(u32),
    Location(Loc),
    Span(Loc),
    Bytes(Loc),
}

impl<'de> Deserializer<'de> for Field {
    type Error = GiveUp;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, GiveUp> {
        match self {
            Field::Number(n) => visitor.visit_u32(n),
            Field::Location(at) => visitor.visit_map(Fields {
                fields: [
                    ("line", Field::Number(at.line)),
                    ("column", Field::Number(at.column)),
                    ("span", Field::Span(at)),
                ],
                next: 0,
            }),
            Field::Span(at) => visitor.visit_map(Fields {
                fields: [
                    ("offset", Field::Number(at.offset)),
                    ("len", Field::Number(at.len)),
                    ("byte_info", Field::Bytes(at)),
                ],
                next: 0,
            }),
            Field::Bytes(at) => {
                visitor.visit_seq(SeqDeserializer::new([at.byte, at.byte_len].into_iter()))
            }
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct Fields {
    fields: [(&'static str, Field); 3],
    next: usize,
}

impl<'de> MapAccess<'de> for Fields {
    type Error = GiveUp;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, GiveUp> {
        let Some((name, _)) = self.fields.get(self.next) else {
            return Ok(None);
        };
        self.next += 1;
        seed.deserialize(StrDeserializer::new(name)).map(Some)
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, GiveUp> {
        let (_, field) = self.fields.get(self.next.wrapping_sub(1)).ok_or(GiveUp)?;
        seed.deserialize(*field)
    }
}
