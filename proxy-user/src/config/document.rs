//! The file as a TOML document whose every key and value keeps its place, and the problems found
//! in it, each with that place.
//!
//! toml_edit (the parser under the `toml` crate) keeps a span on every key, value and table at
//! any depth, so one wrong type does not stop the check and nested tables report their own
//! line and column.
use std::{ops::Range, path::Path};

use toml_edit::{Item, TableLike, Value};

use super::ConfigError;

/// A byte range in the file.
pub(super) type Span = Range<usize>;

/// One key of a table, with its place, and its item.
pub(super) struct Entry<'a> {
    pub(super) key: &'a str,
    pub(super) key_span: Span,
    pub(super) item: &'a Item,
}

impl Entry<'_> {
    /// Where the value starts (the key's place if the parser kept none).
    pub(super) fn value_span(&self) -> Span {
        self.item.span().unwrap_or_else(|| self.key_span.clone())
    }
}

/// Every key of `table`, in file order.
pub(super) fn entries(table: &dyn TableLike) -> Vec<Entry<'_>> {
    table
        .iter()
        .map(|(key, item)| Entry {
            key,
            key_span: table
                .get_key_value(key)
                .and_then(|(k, _)| k.span())
                .unwrap_or(0..0),
            item,
        })
        .collect()
}

/// An item's TOML type with an article: `an integer`.
pub(super) fn kind(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Table(_) | Item::Value(Value::InlineTable(_)) => "a table",
        Item::ArrayOfTables(_) | Item::Value(Value::Array(_)) => "an array",
        Item::Value(Value::String(_)) => "a string",
        Item::Value(Value::Integer(_)) => "an integer",
        Item::Value(Value::Float(_)) => "a float",
        Item::Value(Value::Boolean(_)) => "a boolean",
        Item::Value(Value::Datetime(_)) => "a datetime",
    }
}

/// [`kind`] and, for short scalars, the value: `an integer (5)`.
pub(super) fn describe(item: &Item) -> String {
    match item {
        Item::Value(v @ (Value::Integer(_) | Value::Float(_) | Value::Boolean(_))) => {
            format!("{} ({})", kind(item), show(v))
        }
        _ => kind(item).to_owned(),
    }
}

/// A value as written in the file, without the spaces and comments around it.
pub(super) fn show(value: &Value) -> String {
    value.to_string().trim().to_owned()
}

/// A problem at a place.
struct Located {
    /// Byte offset in the file; `None` for problems of the whole file.
    at: Option<usize>,
    key: String,
    message: String,
}

/// Every problem found, in the order found.
#[derive(Default)]
pub(super) struct Errors {
    list: Vec<Located>,
}

impl Errors {
    /// Whether nothing was found.
    pub(super) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// A problem at byte offset `at` (`None`: of the whole file).
    pub(super) fn add(
        &mut self,
        at: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.list.push(Located {
            at,
            key: key.into(),
            message: message.into(),
        });
    }

    /// A problem at the start of `span`.
    pub(super) fn at(&mut self, span: &Span, key: &str, message: impl Into<String>) {
        self.add(Some(span.start), key, message);
    }

    /// A TOML syntax error (it stops the parse).
    pub(super) fn syntax(&mut self, e: &toml_edit::TomlError) {
        let message = e.message().trim_end().replace('\n', "; ");
        self.add(
            e.span().map(|s| s.start),
            "",
            format!("invalid TOML: {message}"),
        );
    }

    /// Sorts by position (stable, so problems found at one place keep their order) and turns
    /// offsets into lines and columns.
    pub(super) fn render(mut self, path: &Path, text: &str) -> Vec<ConfigError> {
        self.list.sort_by_key(|e| e.at.unwrap_or(usize::MAX));
        self.list
            .into_iter()
            .map(|e| {
                let (line, column) = match e.at.map(|at| line_column(text, at)) {
                    Some((l, c)) => (Some(l), Some(c)),
                    None => (None, None),
                };
                ConfigError {
                    file: Some(path.to_owned()),
                    line,
                    column,
                    key: e.key,
                    message: e.message,
                }
            })
            .collect()
    }
}

/// The 1-based line and column (in characters) of byte offset `at`.
pub(super) fn line_column(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}
