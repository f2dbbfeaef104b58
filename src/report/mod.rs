//! Tables that every command reports through, rendered as markdown, CSV or JSON lines.
//! JSON keeps full precision and stable snake_case keys; markdown rounds for reading.

pub mod plot;
pub mod provenance;

pub use provenance::Provenance;

use serde_json::{Map, Value};
use std::fmt::Write as _;

/// Output format chosen with `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// Markdown tables for people.
    #[default]
    Table,
    /// Comma-separated values, one header line per table.
    Csv,
    /// JSON lines: one object per row, with "table" naming its table.
    Json,
}

/// One table cell: text, an integer, or a float shown with a number of decimals.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Int(i64),
    Float(f64, usize),
    Missing,
}

impl Cell {
    pub fn f(v: f64, decimals: usize) -> Cell {
        Cell::Float(v, decimals)
    }

    fn display(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Float(v, _) if v.is_infinite() => {
                if *v > 0.0 { "inf" } else { "-inf" }.to_string()
            }
            Cell::Float(v, d) => format!("{v:.d$}", d = *d),
            Cell::Missing => "-".to_string(),
        }
    }

    fn raw(&self) -> String {
        match self {
            Cell::Float(v, _) => v.to_string(),
            Cell::Missing => String::new(),
            other => other.display(),
        }
    }

    fn json(&self) -> Value {
        match self {
            Cell::Text(s) => Value::String(s.clone()),
            Cell::Int(i) => Value::from(*i),
            Cell::Float(v, _) if v.is_finite() => Value::from(*v),
            Cell::Float(v, _) => Value::String(v.to_string()),
            Cell::Missing => Value::Null,
        }
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Self {
        Cell::Text(s.to_string())
    }
}

impl From<String> for Cell {
    fn from(s: String) -> Self {
        Cell::Text(s)
    }
}

impl From<i64> for Cell {
    fn from(v: i64) -> Self {
        Cell::Int(v)
    }
}

impl From<usize> for Cell {
    fn from(v: usize) -> Self {
        Cell::Int(v as i64)
    }
}

impl From<i32> for Cell {
    fn from(v: i32) -> Self {
        Cell::Int(v as i64)
    }
}

/// A titled table; `key` is the machine name used in JSON output.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    pub key: String,
    pub title: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
    pub notes: Vec<String>,
    /// Where every row's numbers came from: a footer line in markdown, a `provenance`
    /// object on each JSON row. Commands that know their inputs set it; the command line
    /// fills the rest with [`Provenance::here`].
    pub provenance: Option<Provenance>,
}

/// "Size (MB)" -> "size_mb": stable JSON keys from human headers.
pub fn snake_key(header: &str) -> String {
    let mut out = String::new();
    for ch in header.chars() {
        if ch.is_ascii_alphanumeric() {
            out.push(ch.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

impl Table {
    pub fn new(key: &str, title: &str, columns: &[&str]) -> Self {
        Table {
            key: key.to_string(),
            title: title.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
            rows: Vec::new(),
            notes: Vec::new(),
            provenance: None,
        }
    }

    pub fn push(&mut self, row: Vec<Cell>) {
        debug_assert_eq!(
            row.len(),
            self.columns.len(),
            "row width in table {}",
            self.key
        );
        self.rows.push(row);
    }

    pub fn note(&mut self, n: impl Into<String>) {
        self.notes.push(n.into());
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {}\n", self.title);
        let _ = writeln!(s, "| {} |", self.columns.join(" | "));
        let _ = writeln!(s, "|{}", "---|".repeat(self.columns.len()));
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(Cell::display).collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        for n in &self.notes {
            let _ = writeln!(s, "\n> {n}");
        }
        if let Some(p) = &self.provenance {
            let _ = writeln!(s, "\n> {}", p.footer());
        }
        s
    }

    pub fn csv(&self) -> String {
        let esc = |v: String| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v
            }
        };
        let mut s = String::new();
        let header: Vec<String> = self.columns.iter().map(|c| esc(c.clone())).collect();
        let _ = writeln!(s, "{}", header.join(","));
        for r in &self.rows {
            let cells: Vec<String> = r.iter().map(|c| esc(c.raw())).collect();
            let _ = writeln!(s, "{}", cells.join(","));
        }
        s
    }

    /// One JSON object per row.
    pub fn json_rows(&self) -> Vec<Value> {
        self.rows
            .iter()
            .map(|r| {
                let mut m = Map::new();
                m.insert("table".into(), Value::String(self.key.clone()));
                for (c, v) in self.columns.iter().zip(r) {
                    m.insert(snake_key(c), v.json());
                }
                if let Some(p) = &self.provenance {
                    if let Ok(v) = serde_json::to_value(p) {
                        m.insert("provenance".into(), v);
                    }
                }
                Value::Object(m)
            })
            .collect()
    }
}

/// What a command reports: tables plus free-form notes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub tables: Vec<Table>,
    pub notes: Vec<String>,
}

impl Report {
    /// Gives every table without provenance `p` (what the command line knows: code,
    /// machine, threads).
    pub fn fill_provenance(&mut self, p: &Provenance) {
        for t in &mut self.tables {
            t.provenance.get_or_insert_with(|| p.clone());
        }
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table => {
                let mut s: Vec<String> = self.tables.iter().map(Table::markdown).collect();
                for n in &self.notes {
                    s.push(format!("> {n}\n"));
                }
                s.join("\n")
            }
            Format::Csv => self
                .tables
                .iter()
                .map(Table::csv)
                .collect::<Vec<_>>()
                .join("\n"),
            Format::Json => {
                let mut s = String::new();
                for t in &self.tables {
                    for row in t.json_rows() {
                        let _ = writeln!(s, "{row}");
                    }
                }
                s
            }
        }
    }
}

/// A matrix as a table with one row per matrix row.
pub fn matrix_table(key: &str, title: &str, rows: &[Vec<f64>], decimals: usize) -> Table {
    let ncol = rows.first().map_or(0, Vec::len);
    let headers: Vec<String> = std::iter::once("row".to_string())
        .chain((0..ncol).map(|j| format!("c{j}")))
        .collect();
    let refs: Vec<&str> = headers.iter().map(String::as_str).collect();
    let mut t = Table::new(key, title, &refs);
    for (i, r) in rows.iter().enumerate() {
        let mut cells = vec![Cell::Int(i as i64)];
        cells.extend(r.iter().map(|&v| Cell::f(v, decimals)));
        t.push(cells);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_three_formats() {
        let mut t = Table::new("demo", "Demo", &["Name", "Size (MB)", "N"]);
        t.push(vec!["a,b".into(), Cell::f(1.23456, 2), 3i64.into()]);
        let r = Report {
            tables: vec![t],
            notes: vec![],
        };
        let md = r.render(Format::Table);
        assert!(md.contains("| a,b | 1.23 | 3 |"), "{md}");
        let csv = r.render(Format::Csv);
        assert_eq!(csv, "Name,Size (MB),N\n\"a,b\",1.23456,3\n");
        let js = r.render(Format::Json);
        assert_eq!(
            js.trim(),
            r#"{"n":3,"name":"a,b","size_mb":1.23456,"table":"demo"}"#
        );
    }

    #[test]
    fn snake_keys() {
        assert_eq!(snake_key("Latency B1 (ms)"), "latency_b1_ms");
        assert_eq!(snake_key("Accuracy (%)"), "accuracy");
    }
}
