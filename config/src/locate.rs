//! Map a TOML path (`masters[1].api`) back to a line and column of the source.

use toml::de::{DeTable, DeValue};

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// `masters[1].api`
pub fn display_path(path: &[PathSeg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|nl| before[nl + 1..].chars().count())
        .unwrap_or_else(|| before.chars().count())
        + 1;
    (line, col)
}

/// Line and column of the deepest part of `path` found in `text` (the key when the
/// path ends at a key, so the user sees the name they wrote). Falls back to 1:1.
pub fn locate(text: &str, path: &[PathSeg]) -> (usize, usize) {
    let Ok(doc) = DeTable::parse(text) else {
        return (1, 1);
    };
    let mut best = 0usize;
    let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
    let mut value: Option<&DeValue<'_>> = None;
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                let t = match (table, value) {
                    (Some(t), _) => t,
                    (None, Some(DeValue::Table(t))) => t,
                    _ => break,
                };
                let Some((key, val)) = t
                    .iter()
                    .find(|(key, _)| key.get_ref().as_ref() == k.as_str())
                else {
                    break;
                };
                best = key.span().start;
                table = None;
                value = Some(val.get_ref());
            }
            PathSeg::Index(i) => {
                let Some(DeValue::Array(a)) = value else {
                    break;
                };
                let Some(item) = a.get(*i) else {
                    break;
                };
                best = item.span().start;
                table = None;
                value = Some(item.get_ref());
            }
        }
    }
    line_col(text, best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_keys_in_arrays_of_tables() {
        let text = "[[masters]]\nid = \"m1\"\n\n[[masters]]\nid = \"m2\"\n  api = \"x\"\n";
        let p = vec![
            PathSeg::Key("masters".into()),
            PathSeg::Index(1),
            PathSeg::Key("api".into()),
        ];
        assert_eq!(locate(text, &p), (6, 3));
        assert_eq!(display_path(&p), "masters[1].api");
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("a\nbc", 3), (2, 2));
        assert_eq!(line_col("", 0), (1, 1));
    }
}
