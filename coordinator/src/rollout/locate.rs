//! Finds the line of a field in a YAML text, for errors that are found
//! after parsing (checks across fields): serde_norway reports positions
//! only for errors raised while it parses.
//!
//! It understands block style (indented mappings and `- ` sequences), which
//! is how policy files are written; for flow style (`{a: 1}`) it answers
//! the line of the nearest enclosing field it could find.

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index (0-based).
    Index(usize),
}

/// A path like `pools[1].maxUnavailable`, for messages.
pub fn path_text(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

struct Line {
    /// 1-based line number.
    no: usize,
    indent: usize,
    text: String,
}

/// Splits the text into logical lines: a `- ` item marker becomes its own
/// line, and what follows it a line indented past the marker.
fn lines(src: &str) -> Vec<Line> {
    let mut out = Vec::new();
    for (i, raw) in src.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
            continue;
        }
        let mut indent = raw.len() - trimmed.len();
        let mut rest = trimmed;
        loop {
            if rest == "-" || rest.starts_with("- ") {
                out.push(Line {
                    no: i + 1,
                    indent,
                    text: "-".to_string(),
                });
                let after = &rest[1..];
                let content = after.trim_start();
                if content.is_empty() {
                    break;
                }
                indent += 1 + (after.len() - content.len());
                rest = content;
                continue;
            }
            out.push(Line {
                no: i + 1,
                indent,
                text: rest.to_string(),
            });
            break;
        }
    }
    out
}

fn is_key(text: &str, key: &str) -> bool {
    [key.to_string(), format!("\"{key}\""), format!("'{key}'")]
        .iter()
        .any(|k| {
            text.strip_prefix(k.as_str())
                .is_some_and(|r| r.trim_start().starts_with(':'))
        })
}

/// The 1-based line of `path` in `src`, or of its deepest ancestor found.
pub fn line_of(src: &str, path: &[Seg]) -> Option<usize> {
    let lines = lines(src);
    let (mut start, mut end) = (0, lines.len());
    let mut found = None;
    for seg in path {
        let Some(block_indent) = lines.get(start).filter(|_| start < end).map(|l| l.indent) else {
            break;
        };
        let members = (start..end).filter(|&i| lines[i].indent == block_indent);
        let hit = match seg {
            Seg::Key(k) => members.into_iter().find(|&i| is_key(&lines[i].text, k)),
            Seg::Index(n) => members.filter(|&i| lines[i].text == "-").nth(*n),
        };
        let Some(i) = hit else { break };
        found = Some(lines[i].no);
        start = i + 1;
        // A sequence may sit at its key's own indent ("key:\n- item").
        let same_indent_seq = matches!(seg, Seg::Key(_))
            && lines
                .get(start)
                .is_some_and(|l| start < end && l.indent == block_indent && l.text == "-");
        end = (start..end)
            .find(|&j| {
                lines[j].indent < block_indent
                    || (lines[j].indent == block_indent
                        && !(same_indent_seq && lines[j].text == "-"))
            })
            .unwrap_or(end);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(s: &str) -> Seg {
        Seg::Key(s.to_string())
    }

    const DOC: &str = "\
# a comment
maxConcurrent: 3
pools:
  - name: a
    selector:
      matchLabels: {pool: a}
  -   name: b
      maxUnavailable: 0
      windows:
        - \"Mon 01:00-02:00 UTC\"
        - bad
webhooks:
- url: http://x
  events: [granted]
";

    #[test]
    fn finds_keys_items_and_nested_fields() {
        assert_eq!(line_of(DOC, &[k("maxConcurrent")]), Some(2));
        assert_eq!(
            line_of(DOC, &[k("pools"), Seg::Index(0), k("name")]),
            Some(4)
        );
        assert_eq!(
            line_of(DOC, &[k("pools"), Seg::Index(1), k("maxUnavailable")]),
            Some(8)
        );
        assert_eq!(
            line_of(
                DOC,
                &[k("pools"), Seg::Index(1), k("windows"), Seg::Index(1)]
            ),
            Some(11)
        );
        assert_eq!(
            line_of(DOC, &[k("webhooks"), Seg::Index(0), k("events")]),
            Some(14)
        );
        // Flow style and missing fields: the nearest ancestor.
        assert_eq!(
            line_of(
                DOC,
                &[
                    k("pools"),
                    Seg::Index(0),
                    k("selector"),
                    k("matchLabels"),
                    k("pool")
                ]
            ),
            Some(6)
        );
        assert_eq!(line_of(DOC, &[k("pools"), Seg::Index(5)]), Some(3));
        assert_eq!(line_of(DOC, &[k("nothing")]), None);
        assert_eq!(
            path_text(&[k("pools"), Seg::Index(1), k("maxUnavailable")]),
            "pools[1].maxUnavailable"
        );
    }
}
