//! Reading typed values out of the YAML tree while collecting every error (Vector's habit:
//! a user fixes a file in one round, not one error per run).
//!
//! Each reader returns `Option<T>`: `None` means "an error was recorded here", so the caller
//! goes on with its siblings and builds its own value only when every part is `Some`.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::error::{Diagnostic, display_path};
use super::model::Keyword;
use super::units::{Percent, parse_duration, parse_percent};
use super::yaml::{Node, Pos, Value};

/// Decoding context: the file name and the errors so far.
pub(crate) struct Cx {
    pub file: String,
    pub diags: Vec<Diagnostic>,
}

impl Cx {
    pub fn new(file: &str) -> Cx {
        Cx {
            file: file.to_owned(),
            diags: Vec::new(),
        }
    }

    pub fn error(&mut self, pos: Pos, path: &str, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            path: display_path(path),
            message: message.into(),
        });
    }

    /// "expected X, found Y" at `node`.
    pub fn wrong_type(&mut self, node: &Node, path: &str, expected: &str) {
        let found = node.value.describe();
        self.error(
            node.pos,
            path,
            format!("expected {expected}, found {found}"),
        );
    }
}

/// `path.key`, or `key` at the top.
pub(crate) fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// `path[i]`.
pub(crate) fn item(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

/// A field read from a mapping.
pub(crate) enum Field<T> {
    /// Not in the file (or `~`): the default applies.
    Absent,
    /// In the file but wrong; the error is recorded.
    Bad,
    Set(T),
}

impl<T> Field<T> {
    /// The value, or `default` when absent; `None` when bad.
    pub fn or(self, default: T) -> Option<T> {
        match self {
            Field::Absent => Some(default),
            Field::Bad => None,
            Field::Set(v) => Some(v),
        }
    }

    /// `Some(None)` when absent, `None` when bad.
    pub fn optional(self) -> Option<Option<T>> {
        match self {
            Field::Absent => Some(None),
            Field::Bad => None,
            Field::Set(v) => Some(Some(v)),
        }
    }

    pub fn is_set(&self) -> bool {
        matches!(self, Field::Set(_))
    }
}

/// The fields of one YAML mapping, read by name; `finish` reports the ones nobody read.
pub(crate) struct MapReader<'a> {
    pub pos: Pos,
    pub path: String,
    fields: &'static [&'static str],
    entries: Vec<(&'a str, &'a Node, &'a Node)>,
    used: Vec<bool>,
    /// A duplicate or non-scalar key was reported.
    bad_keys: bool,
}

impl<'a> MapReader<'a> {
    /// Reads `node` as a mapping whose known fields are `fields`. Reports non-mappings (then
    /// `None`), non-scalar keys and duplicate keys.
    pub fn new(
        cx: &mut Cx,
        node: &'a Node,
        path: &str,
        fields: &'static [&'static str],
    ) -> Option<MapReader<'a>> {
        let pairs: &[(Node, Node)] = match &node.value {
            Value::Map(pairs) => pairs,
            // `section:` with nothing after it is the section with all its defaults.
            Value::Null => &[],
            _ => {
                cx.wrong_type(node, path, "a mapping");
                return None;
            }
        };
        let mut entries = Vec::with_capacity(pairs.len());
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        let mut ok = true;
        for (k, v) in pairs {
            let Value::Scalar { text, .. } = &k.value else {
                cx.error(k.pos, path, "expected a field name");
                ok = false;
                continue;
            };
            if let Some(first) = seen.get(text.as_str()) {
                let msg = format!("duplicate field `{text}` (first at line {})", first.line);
                cx.error(k.pos, &child(path, text), msg);
                ok = false;
                continue;
            }
            seen.insert(text, k.pos);
            entries.push((text.as_str(), k, v));
        }
        let used = vec![false; entries.len()];
        // With a bad key the mapping is still read (first occurrence wins), so the errors of
        // its other fields are reported too; `finish` then fails it.
        Some(MapReader {
            pos: node.pos,
            path: path.to_owned(),
            fields,
            entries,
            used,
            bad_keys: !ok,
        })
    }

    /// Position of `key`'s value when it is in the file.
    pub fn pos_of(&self, key: &str) -> Option<Pos> {
        self.entries
            .iter()
            .find(|(k, _, v)| *k == key && v.value != Value::Null)
            .map(|(_, _, v)| v.pos)
    }

    pub fn child(&self, key: &str) -> String {
        child(&self.path, key)
    }

    /// The value of `key`, marked as read; `None` when absent or null.
    pub fn take(&mut self, key: &str) -> Option<&'a Node> {
        debug_assert!(self.fields.contains(&key), "`{key}` not declared");
        let i = self.entries.iter().position(|(k, _, _)| *k == key)?;
        self.used[i] = true;
        let node = self.entries[i].2;
        (node.value != Value::Null).then_some(node)
    }

    /// Reads an optional field with `read`.
    pub fn get<T>(
        &mut self,
        cx: &mut Cx,
        key: &str,
        read: impl FnOnce(&mut Cx, &'a Node, &str) -> Option<T>,
    ) -> Field<T> {
        let Some(node) = self.take(key) else {
            return Field::Absent;
        };
        let path = self.child(key);
        match read(cx, node, &path) {
            Some(v) => Field::Set(v),
            None => Field::Bad,
        }
    }

    /// Reads an optional section: unlike a scalar, a section written with nothing after it
    /// (`health_check:`) is present with its defaults, not absent.
    pub fn section<T>(
        &mut self,
        cx: &mut Cx,
        key: &str,
        read: impl FnOnce(&mut Cx, &'a Node, &str) -> Option<T>,
    ) -> Field<T> {
        debug_assert!(self.fields.contains(&key), "`{key}` not declared");
        let Some(i) = self.entries.iter().position(|(k, _, _)| *k == key) else {
            return Field::Absent;
        };
        self.used[i] = true;
        let path = self.child(key);
        match read(cx, self.entries[i].2, &path) {
            Some(v) => Field::Set(v),
            None => Field::Bad,
        }
    }

    /// Reads a required field; a missing one is reported at this mapping.
    pub fn required<T>(
        &mut self,
        cx: &mut Cx,
        key: &str,
        read: impl FnOnce(&mut Cx, &'a Node, &str) -> Option<T>,
    ) -> Option<T> {
        match self.get(cx, key, read) {
            Field::Set(v) => Some(v),
            Field::Bad => None,
            Field::Absent => {
                cx.error(self.pos, &self.child(key), "required field is missing");
                None
            }
        }
    }

    /// Reports every field that is not one of `fields`. Returns false if there was any, or
    /// if a key was bad.
    pub fn finish(self, cx: &mut Cx) -> bool {
        let mut ok = !self.bad_keys;
        for (i, (key, k, _)) in self.entries.iter().enumerate() {
            if self.used[i] || self.fields.contains(key) {
                continue;
            }
            let expected = self
                .fields
                .iter()
                .map(|f| format!("`{f}`"))
                .collect::<Vec<_>>()
                .join(", ");
            let msg = format!("unknown field `{key}`; expected one of {expected}");
            cx.error(k.pos, &self.child(key), msg);
            ok = false;
        }
        ok
    }
}

/// A list's items, or an error.
pub(crate) fn seq<'a>(cx: &mut Cx, node: &'a Node, path: &str) -> Option<&'a [Node]> {
    match &node.value {
        Value::Seq(items) => Some(items),
        _ => {
            cx.wrong_type(node, path, "a list");
            None
        }
    }
}

/// Any scalar as text. Plain scalars that read as numbers or booleans are accepted too:
/// `name: 2024` means the string "2024" to a user.
pub(crate) fn string(cx: &mut Cx, node: &Node, path: &str) -> Option<String> {
    match &node.value {
        Value::Scalar { text, .. } => Some(text.clone()),
        _ => {
            cx.wrong_type(node, path, "a string");
            None
        }
    }
}

/// Why a number is outside `range`: "must be between 1 and 65535" for a bounded range;
/// for one bounded only by its type, the side that was crossed ("must be at least 1",
/// "must be at most 4294967295").
pub(crate) fn range_message(range: &RangeInclusive<u64>, below: bool) -> String {
    let (start, end) = (*range.start(), *range.end());
    let unbounded = end == u64::MAX || end == u64::from(u32::MAX);
    match (unbounded, below) {
        (false, _) => format!("must be between {start} and {end}"),
        (true, true) if start == 0 => "must not be negative".into(),
        (true, true) => format!("must be at least {start}"),
        (true, false) => format!("must be at most {end}"),
    }
}

/// An integer within `range`. Quoted numbers are refused with a hint: a policy generator
/// that quotes them has a bug worth seeing.
pub(crate) fn int(cx: &mut Cx, node: &Node, path: &str, range: RangeInclusive<u64>) -> Option<u64> {
    let Value::Scalar { text, plain } = &node.value else {
        cx.wrong_type(node, path, "an integer");
        return None;
    };
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    let numeric = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    if !numeric {
        cx.wrong_type(node, path, "an integer");
        return None;
    }
    if !plain {
        let msg = format!("expected an integer, found the string \"{text}\" (remove the quotes)");
        cx.error(node.pos, path, msg);
        return None;
    }
    let negative = text.starts_with('-') && digits.bytes().any(|b| b != b'0');
    // Digits that overflow u64 are above every range.
    let value = if negative {
        None
    } else {
        digits.parse::<u64>().ok()
    };
    match value {
        Some(v) if range.contains(&v) => Some(v),
        v => {
            let below = negative || v.is_some_and(|v| v < *range.start());
            cx.error(node.pos, path, range_message(&range, below));
            None
        }
    }
}

/// An integer that fits `u32` (`range` must lie within it).
pub(crate) fn int_u32(
    cx: &mut Cx,
    node: &Node,
    path: &str,
    range: RangeInclusive<u64>,
) -> Option<u32> {
    int(cx, node, path, range).and_then(|v| u32::try_from(v).ok())
}

/// An integer of at least 1 that fits `u32`: counts and thresholds.
pub(crate) fn count(cx: &mut Cx, node: &Node, path: &str) -> Option<u32> {
    int_u32(cx, node, path, 1..=u64::from(u32::MAX))
}

/// `true` or `false` (YAML 1.2 core schema spellings); `yes`/`no` are refused, not guessed.
pub(crate) fn boolean(cx: &mut Cx, node: &Node, path: &str) -> Option<bool> {
    match &node.value {
        Value::Scalar { text, plain: true } => match text.as_str() {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => {
                cx.wrong_type(node, path, "true or false");
                None
            }
        },
        _ => {
            cx.wrong_type(node, path, "true or false");
            None
        }
    }
}

/// One of a keyword enum's words.
pub(crate) fn keyword<K: Keyword>(cx: &mut Cx, node: &Node, path: &str) -> Option<K> {
    let words = K::ALL
        .iter()
        .map(|k| format!("`{}`", k.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    if let Value::Scalar { text, .. } = &node.value
        && let Some(k) = K::ALL.iter().find(|k| k.as_str() == text)
    {
        return Some(*k);
    }
    cx.wrong_type(node, path, &format!("one of {words}"));
    None
}

/// A string turned into a value by `parse`, whose error is the message.
pub(crate) fn parsed<T, E: std::fmt::Display>(
    cx: &mut Cx,
    node: &Node,
    path: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Option<T> {
    let text = string(cx, node, path)?;
    match parse(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            cx.error(node.pos, path, e.to_string());
            None
        }
    }
}

pub(crate) fn duration(cx: &mut Cx, node: &Node, path: &str) -> Option<Duration> {
    parsed(cx, node, path, parse_duration)
}

/// A duration that must not be zero (intervals, windows, timeouts).
pub(crate) fn positive_duration(cx: &mut Cx, node: &Node, path: &str) -> Option<Duration> {
    let d = duration(cx, node, path)?;
    if d.is_zero() {
        cx.error(node.pos, path, "must be greater than 0");
        return None;
    }
    Some(d)
}

pub(crate) fn percent(cx: &mut Cx, node: &Node, path: &str) -> Option<Percent> {
    parsed(cx, node, path, parse_percent)
}

/// How a duration reads in a message, in its largest whole unit: `500ms`, `10m`, `1500ms`.
pub(crate) fn show(d: Duration) -> String {
    let ns = d.as_nanos();
    let units: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    match units.iter().find(|(n, _)| ns != 0 && ns.is_multiple_of(*n)) {
        Some((n, unit)) => format!("{}{unit}", ns / n),
        None => "0s".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::Protocol;
    use crate::config::yaml::parse;

    fn value(src: &str) -> Node {
        let root = parse(&format!("v: {src}\n")).unwrap();
        let Value::Map(mut entries) = root.value else {
            panic!("expected a mapping")
        };
        entries.remove(0).1
    }

    fn messages(cx: &Cx) -> Vec<String> {
        cx.diags.iter().map(|d| d.message.clone()).collect()
    }

    #[test]
    fn integers() {
        let mut cx = Cx::new("f");
        assert_eq!(int(&mut cx, &value("80"), "p", 1..=65535), Some(80));
        assert_eq!(int(&mut cx, &value("0"), "p", 1..=65535), None);
        assert_eq!(int(&mut cx, &value("70000"), "p", 1..=65535), None);
        assert_eq!(int(&mut cx, &value("-1"), "p", 1..=65535), None);
        assert_eq!(int(&mut cx, &value("'80'"), "p", 1..=65535), None);
        assert_eq!(int(&mut cx, &value("1.5"), "p", 1..=65535), None);
        assert_eq!(int(&mut cx, &value("[1]"), "p", 1..=65535), None);
        assert_eq!(
            int(&mut cx, &value("99999999999999999999999"), "p", 1..=9),
            None
        );
        assert_eq!(count(&mut cx, &value("5000000000"), "p"), None);
        assert_eq!(count(&mut cx, &value("0"), "p"), None);
        assert_eq!(int(&mut cx, &value("-3"), "p", 0..=u64::MAX), None);
        assert_eq!(
            int(
                &mut cx,
                &value("99999999999999999999999"),
                "p",
                0..=u64::MAX
            ),
            None
        );
        assert_eq!(int(&mut cx, &value("-0"), "p", 0..=5), Some(0));
        assert_eq!(
            messages(&cx),
            [
                "must be between 1 and 65535",
                "must be between 1 and 65535",
                "must be between 1 and 65535",
                "expected an integer, found the string \"80\" (remove the quotes)",
                "expected an integer, found `1.5`",
                "expected an integer, found a list",
                "must be between 1 and 9",
                "must be at most 4294967295",
                "must be at least 1",
                "must not be negative",
                "must be at most 18446744073709551615",
            ]
        );
    }

    #[test]
    fn durations_read_in_whole_units() {
        assert_eq!(show(Duration::from_secs(600)), "10m");
        assert_eq!(show(Duration::from_millis(1500)), "1500ms");
        assert_eq!(show(Duration::from_secs(7200)), "2h");
        assert_eq!(show(Duration::from_nanos(7)), "7ns");
        assert_eq!(show(Duration::ZERO), "0s");
    }

    #[test]
    fn booleans_and_keywords() {
        let mut cx = Cx::new("f");
        assert_eq!(boolean(&mut cx, &value("true"), "b"), Some(true));
        assert_eq!(boolean(&mut cx, &value("yes"), "b"), None);
        assert_eq!(
            keyword::<Protocol>(&mut cx, &value("udp"), "k"),
            Some(Protocol::Udp)
        );
        assert_eq!(keyword::<Protocol>(&mut cx, &value("icmp"), "k"), None);
        assert_eq!(
            messages(&cx),
            [
                "expected true or false, found `yes`",
                "expected one of `tcp`, `udp`, `any`, found `icmp`",
            ]
        );
    }

    #[test]
    fn map_reader_reports_unknown_duplicate_and_missing() {
        let root = parse("a: 1\nb: 2\na: 3\n").unwrap();
        let mut cx = Cx::new("f");
        let mut m = MapReader::new(&mut cx, &root, "", &["a", "b"]).unwrap();
        assert_eq!(m.required(&mut cx, "a", string).as_deref(), Some("1"));
        assert!(!m.finish(&mut cx), "a duplicate key fails the mapping");
        assert_eq!(messages(&cx), ["duplicate field `a` (first at line 1)"]);

        let root = parse("b: 2\nzz: 4\n").unwrap();
        let mut cx = Cx::new("f");
        let mut m = MapReader::new(&mut cx, &root, "x", &["a", "b"]).unwrap();
        assert_eq!(m.required(&mut cx, "a", string), None);
        assert_eq!(m.required(&mut cx, "b", string).as_deref(), Some("2"));
        assert!(!m.finish(&mut cx));
        let d: Vec<_> = cx.diags.iter().map(|d| d.to_string()).collect();
        assert_eq!(
            d,
            [
                "f:1:1: x.a: required field is missing",
                "f:2:1: x.zz: unknown field `zz`; expected one of `a`, `b`",
            ]
        );
    }
}
