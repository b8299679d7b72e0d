//! The CLI's one table layout (comfy-table): a header row and aligned
//! columns without borders, wrapped to the terminal's width when stdout is
//! one, never wider than the data when it is piped.

use comfy_table::{ContentArrangement, Table as Inner, presets};

/// A table to print with `print!("{table}")`.
pub struct Table(Inner);

impl Table {
    /// A table with these column headers.
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        let mut inner = Inner::new();
        inner
            .load_preset(presets::NOTHING)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_header(header);
        // Columns two spaces apart, none at the edges.
        for column in inner.column_iter_mut() {
            column.set_padding((0, 2));
        }
        Self(inner)
    }

    /// Adds a row.
    pub fn row<const N: usize>(&mut self, cells: [String; N]) -> &mut Self {
        self.0.add_row(cells);
        self
    }

    /// Right-aligns column `i` (numbers).
    pub fn right(&mut self, i: usize) -> &mut Self {
        if let Some(c) = self.0.column_mut(i) {
            c.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
        self
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in self.0.lines() {
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_under_their_headers() {
        let mut t = Table::new(["NAME", "SIZE"]);
        t.row(["api".into(), "1".into()])
            .row(["a-longer-name".into(), "12345".into()]);
        t.right(1);
        let text = t.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("NAME"), "{text}");
        let col = lines[0].find("SIZE").unwrap();
        assert!(lines[2].len() >= col, "{text}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{text}");
    }
}
