//! A minimal YAML emitter for the documents vm-rs writes (cloud-init `user-data`,
//! `meta-data`, `network-config`).
//!
//! Safety by construction: every string — keys included — is written as a double-quoted
//! scalar in which everything outside printable ASCII, plus `"` and `\`, is escaped. Input can
//! therefore never end a scalar, start a new key, open a tag/anchor/alias or change
//! indentation, whatever bytes it holds. Output is pure ASCII and readable by YAML 1.1 parsers
//! (PyYAML, which cloud-init uses) and YAML 1.2 parsers alike.

use std::fmt::Write;

/// A YAML value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Yaml {
    /// A string (always double-quoted).
    Str(String),
    /// `true` / `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A sequence (flow style when it holds only scalars, else block style).
    Seq(Vec<Yaml>),
    /// A mapping, in insertion order.
    Map(Vec<(String, Yaml)>),
}

impl From<&str> for Yaml {
    fn from(s: &str) -> Self {
        Yaml::Str(s.to_string())
    }
}

impl From<String> for Yaml {
    fn from(s: String) -> Self {
        Yaml::Str(s)
    }
}

impl Yaml {
    fn is_scalar(&self) -> bool {
        matches!(self, Yaml::Str(_) | Yaml::Bool(_) | Yaml::Int(_))
    }

    fn is_empty_collection(&self) -> bool {
        match self {
            Yaml::Seq(v) => v.is_empty(),
            Yaml::Map(m) => m.is_empty(),
            _ => false,
        }
    }

    /// A mapping built from `(key, value)` pairs.
    pub(crate) fn map<K: Into<String>>(entries: impl IntoIterator<Item = (K, Yaml)>) -> Yaml {
        Yaml::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A sequence of strings.
    pub(crate) fn strs<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Yaml {
        Yaml::Seq(
            items
                .into_iter()
                .map(|s| Yaml::Str(s.as_ref().to_string()))
                .collect(),
        )
    }
}

/// Write `s` as a double-quoted YAML scalar.
pub(crate) fn quote(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            ' '..='~' => out.push(c),
            c if (c as u32) <= 0xFFFF => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => {
                let _ = write!(out, "\\U{:08X}", c as u32);
            }
        }
    }
    out.push('"');
}

fn scalar(v: &Yaml, out: &mut String) {
    match v {
        Yaml::Str(s) => quote(s, out),
        Yaml::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Yaml::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Yaml::Seq(items) => {
            // Flow style, only reached for sequences of scalars or empty collections.
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                scalar(item, out);
            }
            out.push(']');
        }
        // Only empty maps are emitted inline (see `inline`); non-empty ones are block style.
        Yaml::Map(_) => out.push_str("{}"),
    }
}

fn inline(v: &Yaml) -> bool {
    v.is_scalar()
        || v.is_empty_collection()
        || matches!(v, Yaml::Seq(items) if items.iter().all(Yaml::is_scalar))
}

fn emit_map(entries: &[(String, Yaml)], indent: usize, out: &mut String) {
    for (k, v) in entries {
        out.push_str(&" ".repeat(indent));
        quote(k, out);
        out.push(':');
        if inline(v) {
            out.push(' ');
            scalar(v, out);
            out.push('\n');
        } else {
            out.push('\n');
            emit_block(v, indent + 2, out);
        }
    }
}

fn emit_seq(items: &[Yaml], indent: usize, out: &mut String) {
    for item in items {
        if inline(item) {
            out.push_str(&" ".repeat(indent));
            out.push_str("- ");
            scalar(item, out);
            out.push('\n');
        } else {
            // Emit the nested block two columns deeper, then put the dash in front of its
            // first line: "- key: v\n  key2: v2".
            let mut nested = String::new();
            emit_block(item, indent + 2, &mut nested);
            out.push_str(&" ".repeat(indent));
            out.push_str("- ");
            out.push_str(&nested[indent + 2..]);
        }
    }
}

fn emit_block(v: &Yaml, indent: usize, out: &mut String) {
    match v {
        Yaml::Map(m) => emit_map(m, indent, out),
        Yaml::Seq(s) => emit_seq(s, indent, out),
        other => {
            out.push_str(&" ".repeat(indent));
            scalar(other, out);
            out.push('\n');
        }
    }
}

/// Serialize a document. A top-level mapping or sequence is emitted in block style.
pub(crate) fn to_string(doc: &Yaml) -> String {
    let mut out = String::new();
    if inline(doc) {
        scalar(doc, &mut out);
        out.push('\n');
    } else {
        emit_block(doc, 0, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn emits_nested_block_style() {
        let doc = Yaml::map([
            ("hostname", Yaml::from("web-1")),
            ("flag", Yaml::Bool(false)),
            (
                "users",
                Yaml::Seq(vec![Yaml::map([
                    ("name", Yaml::from("ops")),
                    ("keys", Yaml::strs(["a", "b"])),
                ])]),
            ),
            ("runcmd", Yaml::Seq(vec![Yaml::strs(["echo", "hi"])])),
            ("empty", Yaml::Seq(vec![])),
        ]);
        assert_eq!(
            to_string(&doc),
            "\"hostname\": \"web-1\"\n\"flag\": false\n\"users\":\n  - \"name\": \"ops\"\n    \
             \"keys\": [\"a\", \"b\"]\n\"runcmd\":\n  - [\"echo\", \"hi\"]\n\"empty\": []\n"
        );
    }

    #[test]
    fn quoting_escapes_everything_structural() {
        let mut s = String::new();
        quote("a\"b\\c\nd: e #f\u{7f}é😀", &mut s);
        assert_eq!(s, "\"a\\\"b\\\\c\\u000Ad: e #f\\u007F\\u00E9\\U0001F600\"");
    }

    proptest! {
        // Whatever a string holds, it stays inside one quoted scalar on one line.
        #[test]
        fn quoted_output_is_one_ascii_line(input in ".*") {
            let mut s = String::new();
            quote(&input, &mut s);
            prop_assert!(s.is_ascii());
            prop_assert!(!s.contains('\n'));
            prop_assert!(s.starts_with('"') && s.ends_with('"'));
            // No unescaped quote inside.
            let inner = &s[1..s.len() - 1];
            let mut escaped = false;
            for c in inner.chars() {
                if escaped { escaped = false; continue; }
                if c == '\\' { escaped = true; continue; }
                prop_assert!(c != '"');
            }
        }
    }
}
