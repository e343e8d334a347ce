//! Reading policy YAML with serde-saphyr without stopping at the first wrong value.
//!
//! Two passes over the same text. The first (`index`) walks the document generically and
//! records where every field path is (`Index`): that gives each error its FIELD.PATH, lets
//! validation point at values by path, and keeps `Policy::error_at` working at run time. It
//! also reports syntax errors (with the path being read) and every duplicate key.
//!
//! The second deserializes the model (model.rs). Its leaf values are read by the functions
//! here: each takes the raw scalar with its position, parses it with the one parser for that
//! fact (units.rs, net.rs), and on failure records (position, message) in the collector of
//! the current `load_str` call and yields a placeholder, so serde goes on and every wrong
//! value is reported. Validation skips the checks whose inputs were already reported.
//!
//! This is the reference reader: `load_str` reads a valid file in one pass (tree.rs) and
//! comes here for any other, and the tests hold that one pass to what is read here.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_saphyr::budget::BudgetBreach;
use serde_saphyr::options::{DuplicateKeyPolicy, MergeKeyPolicy};
use serde_saphyr::{DefaultMessageFormatter, Error, Location, MessageFormatter, Options, Spanned};

use super::model::{Keyword, Policy, StatusRange, parse_status_range};
use super::net::{Cidr, check_interface_name, parse_backend, parse_cidr};
use super::units::{Percent, Rate, parse_duration, parse_percent, parse_rate};

/// A 1-based line and column (columns count characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };

    fn of(l: &Location) -> Pos {
        let n = |v: u64| usize::try_from(v).unwrap_or(usize::MAX).max(1);
        Pos {
            line: n(l.line()),
            column: n(l.column()),
        }
    }
}

/// Deeper nesting than any policy needs.
pub(crate) const MAX_DEPTH: usize = 24;

/// Nodes (and, twice that, parser events) a policy may have: a catalog at the default
/// `agent.tables.services` (16,384) of about 60 nodes a service (a dozen backends, checks,
/// breaker, limit) fits with room to spare; serde-saphyr's default, 250,000, does not.
pub(crate) const MAX_NODES: usize = 4_000_000;

/// Parser settings of both passes. The alias limits are serde-saphyr's defaults, spelled out:
/// a "billion laughs" file is refused, not expanded.
pub(crate) fn options(duplicate_keys: DuplicateKeyPolicy) -> Options {
    serde_saphyr::options! {
        // A policy nests 8 levels deep. The readers recurse per level, so the bound keeps
        // them well inside a 2 MiB thread stack, even unoptimized.
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_nodes: MAX_NODES,
            max_events: 2 * MAX_NODES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 1_000_000,
            max_replay_stack_depth: 64,
        },
        duplicate_keys: duplicate_keys,
        // `<<` is an ordinary (hence unknown) field, as in YAML 1.2.
        merge_keys: MergeKeyPolicy::AsOrdinary,
    }
}

/// A value as written, for leaf parsers and "expected X, found Y" messages.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Raw {
    /// `~`, `null`, or nothing at all (`key:`).
    Null,
    /// `typed` when YAML read it as a number or boolean (plain, unquoted); `text` is then as
    /// written in the file.
    Scalar {
        text: String,
        typed: bool,
    },
    List,
    Mapping,
}

impl Raw {
    pub(crate) fn describe(&self) -> String {
        match self {
            Raw::Null => "nothing".into(),
            Raw::Scalar { text, .. } => format!("`{}`", text.escape_debug()),
            Raw::List => "a list".into(),
            Raw::Mapping => "a mapping".into(),
        }
    }
}

fn wrong(raw: &Raw, expected: &str) -> String {
    format!("expected {expected}, found {}", raw.describe())
}

/// Reads any value as `Raw` (a list or mapping is consumed, and `T` may take it instead).
struct RawVisitor<T>(PhantomData<T>);

/// A list of `T`, or what was there instead.
enum ListOr<T> {
    List(Vec<T>),
    Other(Raw),
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for RawVisitor<T> {
    type Value = ListOr<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(ListOr::Other(Raw::Null))
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(ListOr::Other(Raw::Null))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        let text = v.to_owned();
        Ok(ListOr::Other(Raw::Scalar { text, typed: false }))
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(typed(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(typed(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(typed(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(typed(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(ListOr::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(ListOr::Other(Raw::Mapping))
    }
}

fn typed<T>(v: impl fmt::Display) -> ListOr<T> {
    ListOr::Other(Raw::Scalar {
        text: v.to_string(),
        typed: true,
    })
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOr<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(
            match d.deserialize_any(RawVisitor::<IgnoredAny>(PhantomData))? {
                ListOr::List(_) => Raw::List,
                ListOr::Other(raw) => raw,
            },
        )
    }
}

/// What the current `load_str` call has collected: its text (for scalars as written) and
/// every wrong value so far.
struct Collector {
    src: String,
    errors: Vec<(Pos, String)>,
}

thread_local! {
    static COLLECTOR: RefCell<Option<Collector>> = const { RefCell::new(None) };
}

/// Runs `read` with a collector for `src`: what it returns, and every wrong value it reported.
pub(crate) fn collecting<R>(src: &str, read: impl FnOnce() -> R) -> (R, Vec<(Pos, String)>) {
    COLLECTOR.with(|c| {
        *c.borrow_mut() = Some(Collector {
            src: src.to_owned(),
            errors: Vec::new(),
        })
    });
    let result = read();
    let errors = COLLECTOR
        .with(|c| c.borrow_mut().take())
        .map_or(Vec::new(), |c| c.errors);
    (result, errors)
}

/// Records an error at `at`; a no-op outside `collecting`.
pub(crate) fn report(at: &Location, message: impl Into<String>) {
    COLLECTOR.with(|c| {
        if let Some(c) = c.borrow_mut().as_mut() {
            c.errors.push((Pos::of(at), message.into()));
        }
    });
}

/// `raw` with the text of a typed scalar as written (`0x10`, `1e3`, 30 digits).
fn as_written(raw: Raw, defined: &Location) -> Raw {
    let Raw::Scalar { typed: true, .. } = raw else {
        return raw;
    };
    let span = defined.span();
    let slice = COLLECTOR.with(|c| {
        let c = c.borrow();
        let (src, start, len) = (&c.as_ref()?.src, span.byte_offset()?, span.byte_len()?);
        let start = usize::try_from(start).ok()?;
        src.get(start..start.checked_add(usize::try_from(len).ok()?)?)
            .map(str::to_owned)
    });
    match slice {
        Some(text) if !text.is_empty() => Raw::Scalar { text, typed: true },
        _ => raw,
    }
}

/// Parses a spanned raw value; on failure records the message at its position.
pub(crate) fn parse_at<T>(
    value: Spanned<Raw>,
    parse: impl FnOnce(&Raw) -> Result<T, String>,
) -> Option<T> {
    let raw = as_written(value.value, &value.defined);
    parse(&raw).map_err(|e| report(&value.referenced, e)).ok()
}

/// Reads one leaf value with `parse`; a wrong one is recorded and read as `placeholder`.
fn leaf<'de, D: Deserializer<'de>, T>(
    d: D,
    placeholder: T,
    parse: impl FnOnce(&Raw) -> Result<T, String>,
) -> Result<T, D::Error> {
    Ok(parse_at(Spanned::<Raw>::deserialize(d)?, parse).unwrap_or(placeholder))
}

/// Any scalar as text: `name: 2024` means the string "2024" to a user.
fn string(raw: &Raw) -> Result<String, String> {
    match raw {
        Raw::Scalar { text, .. } => Ok(text.clone()),
        _ => Err(wrong(raw, "a string")),
    }
}

fn parsed<T, E: fmt::Display>(
    raw: &Raw,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, String> {
    parse(&string(raw)?).map_err(|e| e.to_string())
}

/// Why a number is outside `range`: "must be between 1 and 65535" for a bounded range;
/// for one bounded only by its type, the side that was crossed.
fn range_message(range: &RangeInclusive<u64>, below: bool) -> String {
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
pub(crate) fn int(raw: &Raw, range: RangeInclusive<u64>) -> Result<u64, String> {
    let Raw::Scalar { text, typed } = raw else {
        return Err(wrong(raw, "an integer"));
    };
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(wrong(raw, "an integer"));
    }
    if !typed {
        return Err(format!(
            "expected an integer, found the string \"{text}\" (remove the quotes)"
        ));
    }
    let negative = text.starts_with('-') && digits.bytes().any(|b| b != b'0');
    // Digits that overflow u64 are above every range.
    let value = (!negative).then(|| digits.parse::<u64>().ok()).flatten();
    match value {
        Some(v) if range.contains(&v) => Ok(v),
        v => {
            let below = negative || v.is_some_and(|v| v < *range.start());
            Err(range_message(&range, below))
        }
    }
}

/// `true` or `false` (YAML 1.2 core schema spellings); `yes`/`no` are refused, not guessed.
fn bool_of(raw: &Raw) -> Result<bool, String> {
    match raw {
        Raw::Scalar { text, typed: true } if matches!(&**text, "true" | "True" | "TRUE") => {
            Ok(true)
        }
        Raw::Scalar { text, typed: true } if matches!(&**text, "false" | "False" | "FALSE") => {
            Ok(false)
        }
        _ => Err(wrong(raw, "true or false")),
    }
}

/// One of a keyword enum's words.
pub(crate) fn keyword<K: Keyword>(raw: &Raw) -> Result<K, String> {
    if let Raw::Scalar { text, .. } = raw
        && let Some(k) = K::ALL.iter().find(|k| k.as_str() == text)
    {
        return Ok(*k);
    }
    let words: Vec<String> = K::ALL.iter().map(|k| format!("`{}`", k.as_str())).collect();
    Err(wrong(raw, &format!("one of {}", words.join(", "))))
}

fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// A string that can go into an HTTP request line or header: no whitespace or control
/// characters (they would split or forge the request).
fn header_safe(raw: &Raw) -> Result<String, String> {
    let s = string(raw)?;
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain spaces or control characters".into());
    }
    Ok(s)
}

/// `[a-z0-9-]`, 1 to 63 characters: the name goes into metric labels, log fields and
/// DNS-like contexts unchanged.
fn check_service_name(name: &str) -> Result<String, String> {
    if name.is_empty() {
        return Err("service name is empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(format!(
            "service name `{}` contains {c:?}; use only a-z, 0-9 and -",
            name.escape_debug()
        ));
    }
    if name.len() > 63 {
        return Err(format!(
            "service name is {} characters; at most 63",
            name.len()
        ));
    }
    Ok(name.to_owned())
}

const UNSPECIFIED: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Leaf readers for `#[serde(deserialize_with = ...)]`: one line each, the rule in its parser.
macro_rules! leaves {
    ($($(#[$m:meta])* $name:ident -> $t:ty = $placeholder:expr, $parse:expr;)*) => {$(
        $(#[$m])*
        pub(crate) fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$t, D::Error> {
            leaf(d, $placeholder, $parse)
        }
    )*};
}

leaves! {
    /// `version`: 1, the only one this agent reads.
    version -> u32 = 0, |r| match int(r, 0..=u64::MAX)? {
        1 => Ok(1),
        v => Err(format!("unsupported version {v}; this agent reads version 1")),
    };
    /// `match.port`; `~` is every port.
    port -> Option<u16> = None, |r| match r {
        Raw::Null => Ok(None),
        r => Ok(u16::try_from(int(r, 1..=65535)?).ok()),
    };
    weight -> u16 = 0, |r| Ok(u16::try_from(int(r, 0..=1000)?).unwrap_or_default());
    /// Counts and thresholds: at least 1, within u32.
    count -> u32 = 0, |r| Ok(u32::try_from(int(r, 1..=u64::from(u32::MAX))?).unwrap_or_default());
    /// Sizes of datapath tables: 1 to 2^24.
    entries -> u32 = 0, |r| {
        let max = u64::from(super::model::MAX_TABLE_ENTRIES);
        Ok(u32::try_from(int(r, 1..=max)?).unwrap_or_default())
    };
    /// An optional table size, when given: as `entries`.
    some_entries -> Option<u32> = None, |r| {
        let max = u64::from(super::model::MAX_TABLE_ENTRIES);
        Ok(u32::try_from(int(r, 1..=max)?).ok())
    };
    /// `agent.tables.services` and `.backends`.
    table_limit -> u32 = 0, |r| {
        let max = u64::from(crate::maps::MAX_TABLE_LIMIT);
        Ok(u32::try_from(int(r, 1..=max)?).unwrap_or_default())
    };
    /// `agent.tables.connections`: `auto` (`None`) or a number of entries.
    connections -> Option<u32> = None, |r| match r {
        Raw::Scalar { text, .. } if &**text == "auto" => Ok(None),
        Raw::Scalar { text, .. } if text.trim_start_matches(['-', '+']).bytes().all(|b| b.is_ascii_digit()) => {
            let max = u64::from(crate::maps::MAX_CONNECTIONS);
            Ok(u32::try_from(int(r, 1..=max)?).ok())
        }
        r => Err(wrong(r, "`auto` or a number of entries")),
    };
    /// `rate_limit.burst`: 0 stands for "not given" until validation resolves it.
    burst -> u64 = 0, |r| match int(r, 0..=u64::MAX)? {
        0 => Err("must be greater than 0".into()),
        b => Ok(b),
    };
    boolean -> bool = false, bool_of;
    duration -> Duration = Duration::ZERO, |r| parsed(r, parse_duration);
    /// Intervals, windows, timeouts: never zero.
    positive_duration -> Duration = Duration::ZERO, |r| parsed(r, parse_duration).and_then(positive);
    socket -> SocketAddr = UNSPECIFIED, |r| parsed(r, |s| s.parse::<SocketAddr>().map_err(|_| {
        format!("`{s}` is not a socket address; expected e.g. 127.0.0.1:9090 or [::1]:9090")
    }));
    backend_address -> SocketAddr = UNSPECIFIED, |r| parsed(r, parse_backend);
    absolute_path -> PathBuf = PathBuf::new(), |r| match string(r)? {
        s if s.starts_with('/') => Ok(s.into()),
        s => Err(format!("`{s}` is not an absolute path")),
    };
    interface_name -> String = String::new(), |r| parsed(r, |s| check_interface_name(s).map(|()| s.to_owned()));
    service_name -> String = String::new(), |r| parsed(r, check_service_name);
    /// `health_check.path`: an HTTP path.
    http_path -> String = String::new(), |r| match header_safe(r)? {
        s if s.starts_with('/') => Ok(s),
        _ => Err("must start with `/`".into()),
    };
    header -> String = String::new(), header_safe;
}

/// Types whose every value is one leaf read the same way wherever it appears.
macro_rules! leaf_types {
    ($($t:ty = $placeholder:expr, $parse:expr;)*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                leaf(d, $placeholder, $parse)
            }
        }
    )*};
}

leaf_types! {
    Cidr = Cidr::default(), |r| parsed(r, parse_cidr);
    Rate = Rate::Packets(0), |r| parsed(r, parse_rate);
    Percent = Percent::default(), |r| parsed(r, parse_percent);
    StatusRange = StatusRange::default(), |r| parsed(r, parse_status_range);
}

/// For the keyword enums of the model.
pub(crate) fn keyword_leaf<'de, D: Deserializer<'de>, K: Keyword + Default>(
    d: D,
) -> Result<K, D::Error> {
    leaf(d, K::default(), keyword)
}

/// A keyword that may be absent (`None`, also after a wrong one, which is reported).
pub(crate) fn known<'de, D: Deserializer<'de>, K: Keyword>(d: D) -> Result<Option<K>, D::Error> {
    leaf(d, None, |r| match r {
        Raw::Null => Ok(None),
        r => keyword(r).map(Some),
    })
}

/// A list; anything else is reported and read as an empty list (`~` is an empty list).
pub(crate) fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    let value = Spanned::<ListOr<T>>::deserialize(d)?;
    Ok(match value.value {
        ListOr::List(items) => items,
        ListOr::Other(Raw::Null) => Vec::new(),
        ListOr::Other(raw) => {
            report(
                &value.referenced,
                wrong(&as_written(raw, &value.defined), "a list"),
            );
            Vec::new()
        }
    })
}

/// A section whose absence means its defaults (`agent`, `retry`, `fallback`) or a required
/// one (`match`); `section:` with nothing after it is the section with all its defaults.
pub(crate) fn or_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An optional section: present (with its defaults) even when written with nothing after it.
pub(crate) fn section<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<Option<T>, D::Error> {
    or_default(d).map(Some)
}

/// Where each field path's value is in the file. A path is `services[0].match.port`; the
/// document itself is the empty path.
///
/// A file has a path per node (some 50,000 in a catalog of 1,000 services): each is allocated
/// once, and the one map from paths uses a fast hasher (its keys come from the operator's own
/// file). What is at a position is only asked about a file with errors (`reverse`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Index {
    /// Each path's value.
    values: foldhash::HashMap<Arc<str>, Value>,
    /// Every value as recorded, in order.
    records: Vec<Record>,
    /// Every duplicate key: (its position, its path, the line of the first).
    pub duplicates: Vec<(Pos, String, usize)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Value {
    /// Where the value is; one written as nothing (`key:`) is at its key.
    pos: Pos,
    /// Null: absent, for required fields.
    null: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    path: Arc<str>,
    /// Where the value is (also when written as nothing).
    at: Pos,
    /// Where its key is, in a mapping.
    key: Option<Pos>,
}

impl Index {
    /// An index with room for `values` values.
    pub(crate) fn with_capacity(values: usize) -> Index {
        Index {
            values: foldhash::HashMap::with_capacity_and_hasher(values, Default::default()),
            records: Vec::with_capacity(values),
            duplicates: Vec::new(),
        }
    }

    /// Position of `path`'s value; for a path that is not in the file (a defaulted or missing
    /// field), the position of the closest enclosing value that is.
    pub fn lookup(&self, path: &str) -> Pos {
        let mut p = path;
        loop {
            if let Some(v) = self.values.get(p) {
                return v.pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.values.get("").map_or(Pos::START, |v| v.pos),
            }
        }
    }

    /// Whether the file gives `path` a value (not null).
    pub fn has(&self, path: &str) -> bool {
        self.values.get(path).is_some_and(|v| !v.null)
    }

    /// What is at each position of the file.
    pub fn reverse(&self) -> Reverse<'_> {
        let mut r = Reverse::default();
        for record in &self.records {
            r.by_value.entry(record.at).or_insert(&record.path);
            if let Some(k) = record.key {
                r.by_key.entry(k).or_insert(&record.path);
            }
        }
        r
    }

    /// Whether the file has `path` at all, null or not.
    #[cfg(test)]
    pub fn mentions(&self, path: &str) -> bool {
        self.values.contains_key(path)
    }

    fn record_node(&mut self, path: String, value: &Spanned<Node>, key: Option<Pos>) {
        let null = value.value == Node::Null;
        let empty = null && value.referenced.span().is_empty();
        self.record(&path, Pos::of(&value.referenced), null, empty, key);
    }

    /// Records the value at `path`, at `at`: `null` when it is null, `empty` when it is
    /// written as nothing at all; `key` is the position of its key in a mapping. The first
    /// record of a path or position stands (a path is null if any record of it is).
    pub(crate) fn record(
        &mut self,
        path: &str,
        at: Pos,
        null: bool,
        empty: bool,
        key: Option<Pos>,
    ) {
        let pos = match key {
            Some(k) if empty => k,
            _ => at,
        };
        let path: Arc<str> = Arc::from(path);
        self.values
            .entry(path.clone())
            .and_modify(|v| v.null |= null)
            .or_insert(Value { pos, null });
        self.records.push(Record { path, at, key });
    }
}

/// The paths at positions of a file: of the value and of the key there (the first recorded).
#[derive(Default)]
pub(crate) struct Reverse<'a> {
    by_value: foldhash::HashMap<Pos, &'a str>,
    by_key: foldhash::HashMap<Pos, &'a str>,
}

impl Reverse<'_> {
    /// The path of the value at `pos`.
    pub fn value_at(&self, pos: Pos) -> Option<&str> {
        self.by_value.get(&pos).copied()
    }

    /// The path of the key at `pos`.
    pub fn key_at(&self, pos: Pos) -> Option<&str> {
        self.by_key.get(&pos).copied()
    }

    /// Every key in the file: (its position, its path). For the reference test.
    #[cfg(test)]
    pub fn keys(&self) -> impl Iterator<Item = (Pos, &str)> {
        self.by_key.iter().map(|(pos, path)| (*pos, *path))
    }
}

/// Where the index pass is: the open collections, as the old event builder kept them.
enum Frame {
    /// The index of the next item.
    List(usize),
    /// The key whose value is being read.
    Map(Option<String>),
}

#[derive(Default)]
struct Build {
    index: Index,
    stack: Vec<Frame>,
}

impl Build {
    /// The path of the place the next value goes.
    fn path(&self) -> String {
        let mut path = String::new();
        for frame in &self.stack {
            match frame {
                Frame::List(i) => path.push_str(&format!("[{i}]")),
                Frame::Map(Some(k)) => {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k);
                }
                Frame::Map(None) => break,
            }
        }
        path
    }
}

thread_local! {
    static BUILD: RefCell<Build> = RefCell::new(Build::default());
}

fn build<R>(f: impl FnOnce(&mut Build) -> R) -> R {
    BUILD.with(|b| f(&mut b.borrow_mut()))
}

/// A node of the index pass: only whether it is null matters to its parent.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Null,
    Other,
}

/// A mapping key as text (`?` for a key that is itself a collection).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Key(match Raw::deserialize(d)? {
            Raw::Scalar { text, .. } => text,
            Raw::Null => String::new(),
            Raw::List | Raw::Mapping => "?".into(),
        }))
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_str<E>(self, _: &str) -> Result<Node, E> {
        Ok(Node::Other)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
        Ok(Node::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
        Ok(Node::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
        Ok(Node::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
        Ok(Node::Other)
    }
    // On an error the frames stay: `Build::path` then says where it came.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        build(|b| b.stack.push(Frame::List(0)));
        loop {
            let path = build(|b| b.path());
            let Some(item) = seq.next_element::<Spanned<Node>>()? else {
                break;
            };
            build(|b| {
                b.index.record_node(path, &item, None);
                if let Some(Frame::List(i)) = b.stack.last_mut() {
                    *i += 1;
                }
            });
        }
        build(|b| b.stack.pop());
        Ok(Node::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        build(|b| b.stack.push(Frame::Map(None)));
        let mut first: HashMap<String, Pos> = HashMap::new();
        while let Some(key) = map.next_key::<Spanned<Key>>()? {
            let (name, at) = (key.value.0, Pos::of(&key.referenced));
            if let Some(line) = first.get(&name).map(|p| p.line) {
                map.next_value::<IgnoredAny>()?;
                build(|b| {
                    let path = child(&b.path(), &name);
                    b.index.duplicates.push((at, path, line));
                });
                continue;
            }
            first.insert(name.clone(), at);
            let path = build(|b| {
                let parent = b.path();
                if let Some(Frame::Map(k)) = b.stack.last_mut() {
                    *k = Some(name.clone());
                }
                child(&parent, &name)
            });
            let value = map.next_value::<Spanned<Node>>()?;
            build(|b| {
                b.index.record_node(path, &value, Some(at));
                if let Some(Frame::Map(k)) = b.stack.last_mut() {
                    *k = None;
                }
            });
        }
        build(|b| b.stack.pop());
        Ok(Node::Other)
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

/// A YAML syntax error, or input refused by the limits, with the path being read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub path: String,
    pub message: String,
}

/// The message of a serde-saphyr error, without position or snippet.
fn message(e: &Error) -> String {
    match e.without_snippet() {
        Error::AliasError { error, .. } => message(error),
        Error::MultipleDocuments { .. } => "only one YAML document per file".into(),
        Error::Budget { breach, .. } => match breach {
            BudgetBreach::Depth { .. } => format!("nesting deeper than {MAX_DEPTH} levels"),
            BudgetBreach::Nodes { .. } => {
                format!("the document has more than {MAX_NODES} nodes (after expanding aliases)")
            }
            BudgetBreach::RecordedAnchorEvents { .. } => format!(
                "anchors and aliases expand to more than {} events",
                serde_saphyr::Budget::default().max_recorded_anchor_events
            ),
            other => format!("the document is beyond the reader's limits ({other:?})"),
        },
        e => DefaultMessageFormatter.format_message(e).into_owned(),
    }
}

fn error_pos(e: &Error) -> Pos {
    e.location().map_or(Pos::START, |l| Pos::of(&l))
}

/// The index pass. `Ok(None)`: the document is empty (or only `~`).
pub(crate) fn index(src: &str) -> Result<Option<Index>, SyntaxError> {
    build(|b| *b = Build::default());
    // Duplicates are passed through to the visitor, which reports every one of them.
    let result = serde_saphyr::from_str_with_options::<Spanned<Node>>(
        src,
        options(DuplicateKeyPolicy::PassThrough),
    );
    let b = build(std::mem::take);
    match result {
        Ok(root) if root.value == Node::Null => Ok(None),
        Ok(root) => {
            let mut index = b.index;
            index.record_node(String::new(), &root, None);
            Ok(Some(index))
        }
        Err(e) => Err(SyntaxError {
            pos: error_pos(&e),
            path: b.path(),
            message: message(&e),
        }),
    }
}

/// What the model pass made of a file.
pub(crate) struct Read {
    /// The policy as read, placeholders where values were wrong; `None` when reading stopped.
    pub policy: Option<Policy>,
    /// Every wrong value: (position, message).
    pub wrong: Vec<(Pos, String)>,
    /// What stopped reading, if anything did: (position, path, message). A collection of the
    /// wrong kind where a section was expected, an unknown field.
    pub stopped: Option<(Pos, String, String)>,
}

/// The model pass.
pub(crate) fn read_policy(src: &str, index: &Index) -> Read {
    // Duplicates were reported by the index pass; the first occurrence is read here.
    let (result, errors) = collecting(src, || {
        serde_saphyr::from_str_with_options::<Policy>(src, options(DuplicateKeyPolicy::FirstWins))
    });
    match result {
        Ok(policy) => Read {
            policy: Some(policy),
            wrong: errors,
            stopped: None,
        },
        Err(e) => {
            let pos = error_pos(&e);
            let index = index.reverse();
            let (path, message) = match e.without_snippet() {
                Error::SerdeUnknownField {
                    field, expected, ..
                } => {
                    let expected: Vec<String> = expected.iter().map(|f| format!("`{f}`")).collect();
                    let path = index.key_at(pos).unwrap_or(field).to_owned();
                    let msg = format!(
                        "unknown field `{field}`; expected one of {}",
                        expected.join(", ")
                    );
                    (path, msg)
                }
                Error::SerdeInvalidType {
                    unexpected,
                    expected,
                    ..
                } => {
                    let expected = if expected.starts_with("struct ") {
                        "a mapping"
                    } else {
                        expected
                    };
                    let path = index.value_at(pos).unwrap_or_default().to_owned();
                    (path, format!("expected {expected}, found {unexpected}"))
                }
                _ => (
                    index.value_at(pos).unwrap_or_default().to_owned(),
                    message(&e),
                ),
            };
            Read {
                policy: None,
                wrong: errors,
                stopped: Some((pos, path, message)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::model::Protocol;
    use super::*;

    /// The value of `v: SRC`, as a leaf reader sees it.
    fn value(src: &str) -> Raw {
        let doc = format!("v: {src}\n");
        COLLECTOR.with(|c| {
            *c.borrow_mut() = Some(Collector {
                src: doc.clone(),
                errors: Vec::new(),
            })
        });
        let mut map: BTreeMap<String, Spanned<Raw>> = serde_saphyr::from_str(&doc).unwrap();
        let v = map.remove("v").unwrap();
        as_written(v.value, &v.defined)
    }

    #[test]
    fn integers() {
        let port = 1..=65535;
        assert_eq!(int(&value("80"), port.clone()), Ok(80));
        assert_eq!(int(&value("-0"), 0..=5), Ok(0));
        let count = 1..=u64::from(u32::MAX);
        let messages: Vec<String> = [
            int(&value("0"), port.clone()),
            int(&value("70000"), port.clone()),
            int(&value("-1"), port.clone()),
            int(&value("'80'"), port.clone()),
            int(&value("1.5"), port.clone()),
            int(&value("[1]"), port.clone()),
            int(&value("99999999999999999999999"), 1..=9),
            int(&value("5000000000"), count.clone()),
            int(&value("0"), count),
            int(&value("-3"), 0..=u64::MAX),
            int(&value("99999999999999999999999"), 0..=u64::MAX),
        ]
        .into_iter()
        .map(|r| r.unwrap_err())
        .collect();
        assert_eq!(
            messages,
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
    fn booleans_and_keywords() {
        assert_eq!(bool_of(&value("true")), Ok(true));
        assert_eq!(
            bool_of(&value("yes")).unwrap_err(),
            "expected true or false, found `yes`"
        );
        assert_eq!(keyword::<Protocol>(&value("udp")), Ok(Protocol::Udp));
        assert_eq!(
            keyword::<Protocol>(&value("icmp")).unwrap_err(),
            "expected one of `tcp`, `udp`, `any`, found `icmp`"
        );
    }

    #[test]
    fn scalars_keep_their_style() {
        let scalar = |text: &str, typed| Raw::Scalar {
            text: text.into(),
            typed,
        };
        assert_eq!(value("80"), scalar("80", true));
        assert_eq!(value("'80'"), scalar("80", false));
        assert_eq!(value("!!str 5"), scalar("5", false));
        assert_eq!(value("0x10"), scalar("0x10", true));
        assert_eq!(value("~"), Raw::Null);
        assert_eq!(value(""), Raw::Null);
    }

    fn at(line: usize, column: usize) -> Pos {
        Pos { line, column }
    }

    #[test]
    fn positions_of_values() {
        let src = "a: 1\nb:\n  c: 'x'\n  d:\n    - 5\n    - e: f\n  g:\n";
        let index = index(src).unwrap().unwrap();
        assert_eq!(index.lookup("a"), at(1, 4));
        assert_eq!(index.lookup("b.c"), at(3, 6));
        assert_eq!(index.lookup("b.d[0]"), at(5, 7));
        assert_eq!(index.lookup("b.d[1].e"), at(6, 10));
        // A value written as nothing is at its key, and absent for required fields.
        assert_eq!(index.lookup("b.g"), at(7, 3));
        assert!(!index.has("b.g") && index.has("b.c"));
        // Missing fields fall back to the enclosing mapping.
        assert_eq!(index.lookup("b.d[1].zzz"), index.lookup("b.d[1]"));
        assert_eq!(index.lookup("nothing.at.all"), index.lookup(""));
        assert_eq!(index.reverse().value_at(at(6, 10)), Some("b.d[1].e"));
        assert_eq!(index.reverse().key_at(at(6, 7)), Some("b.d[1].e"));
    }

    #[test]
    fn syntax_errors_have_positions_and_paths() {
        let e = index("a:\n  b: [1, 2\n").unwrap_err();
        assert!(e.path.starts_with("a.b["), "{e:?}");
        assert!(e.pos.line >= 2, "{e:?}");
        let e = index("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(e.message, "only one YAML document per file");
    }

    #[test]
    fn every_duplicate_key_is_found() {
        let index = index("a: 1\nb: {c: 1, c: 2}\na: 3\n").unwrap().unwrap();
        assert_eq!(
            index.duplicates,
            [
                (at(2, 11), "b.c".to_owned(), 2),
                (at(3, 1), "a".to_owned(), 1)
            ]
        );
    }

    #[test]
    fn aliases_expand_within_limits() {
        let index = index("a: &x {k: 1}\nb: *x\n").unwrap().unwrap();
        assert!(index.has("b.k"));
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = i - 1;
            bomb.push_str(&format!(
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"
            ));
        }
        let e = super::index(&bomb).unwrap_err();
        assert!(e.message.contains("more than"), "{e:?}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = "[".repeat(10_000);
        assert!(index(&deep).is_err());
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        let e = index(&deep).unwrap_err();
        // Block nesting is bounded by the budget, flow nesting by the parser.
        assert!(e.message.contains("recursion limit"), "{e:?}");
        let deep = "a:\n".to_owned()
            + &(1..30)
                .map(|i| format!("{}b:\n", "  ".repeat(i)))
                .collect::<String>();
        let e = index(&deep).unwrap_err();
        assert!(e.message.contains("nesting deeper"), "{e:?}");
    }

    #[test]
    fn empty_input_is_no_document() {
        assert_eq!(index(""), Ok(None));
        assert_eq!(index("# only a comment\n"), Ok(None));
        assert_eq!(index("~"), Ok(None));
    }
}
