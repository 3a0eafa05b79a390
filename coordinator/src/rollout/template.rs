//! Webhook body templates: `{{name}}` placeholders replaced by values that
//! are JSON-escaped, nothing else (no logic, no loops, no lookups), so a
//! template cannot run anything and a node's reason text cannot break out
//! of the JSON string it is placed in.

use std::collections::BTreeMap;

/// The placeholders a template may use.
pub const FIELDS: [&str; 7] = [
    "event",
    "node",
    "reason",
    "token",
    "actor",
    "time",
    "coordinator",
];

/// The longest template accepted, in bytes.
pub const MAX_TEMPLATE: usize = 8 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(&'static str),
}

/// A parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// The body sent when a webhook has no template: every field.
pub const DEFAULT_TEMPLATE: &str = r#"{"event":"{{event}}","node":"{{node}}","reason":"{{reason}}","token":{{token}},"actor":"{{actor}}","time":"{{time}}","coordinator":"{{coordinator}}"}"#;

impl Template {
    /// Parses `text`; refuses unknown placeholders, an unclosed `{{`, and a
    /// template whose output is not JSON.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_TEMPLATE {
            return Err(format!(
                "the template is {} bytes long, the limit is {MAX_TEMPLATE}",
                text.len()
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| "a \"{{\" is not closed by \"}}\"".to_string())?;
            let name = after[..close].trim();
            let field = FIELDS.iter().find(|f| **f == name).ok_or_else(|| {
                format!(
                    "unknown placeholder {{{{{name}}}}}; known: {}",
                    FIELDS.map(|f| format!("{{{{{f}}}}}")).join(", ")
                )
            })?;
            parts.push(Part::Field(field));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_string()));
        }
        let template = Template { parts };
        // Values are escaped for a JSON string, so a template whose sample
        // output is JSON gives JSON for any values.
        let sample: BTreeMap<&str, String> = FIELDS
            .iter()
            .map(|f| {
                (
                    *f,
                    if *f == "token" {
                        "7".into()
                    } else {
                        format!("a \"{f}\"\n")
                    },
                )
            })
            .collect();
        let rendered = template.render(&sample);
        serde_json::from_str::<serde_json::Value>(&rendered).map_err(|e| {
            format!(
                "the body is not JSON once placeholders are filled in ({e}); put text placeholders inside quotes, e.g. \"{{{{node}}}}\""
            )
        })?;
        Ok(template)
    }

    /// The default template (every field as a JSON object).
    pub fn default_body() -> Self {
        Self::parse(DEFAULT_TEMPLATE).expect("the default template is valid")
    }

    /// Fills in `values` (missing ones are empty), each JSON-escaped.
    pub fn render(&self, values: &BTreeMap<&str, String>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Field(f) => {
                    let value = values.get(f).map(String::as_str).unwrap_or("");
                    let quoted = serde_json::to_string(value).unwrap_or_default();
                    // Strip the quotes serde_json adds: the template's own
                    // quotes surround the value.
                    out.push_str(&quoted[1..quoted.len() - 1]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_cannot_break_out_of_their_string() {
        let t = Template::parse(r#"{"text": "{{event}} on {{node}}: {{reason}}"}"#).unwrap();
        let values: BTreeMap<&str, String> = [
            ("event", "failed".to_string()),
            ("node", "n1".to_string()),
            ("reason", "x\", \"evil\": \"y\\\n".to_string()),
        ]
        .into();
        let body: serde_json::Value = serde_json::from_str(&t.render(&values)).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"text": "failed on n1: x\", \"evil\": \"y\\\n"})
        );
    }

    #[test]
    fn refuses_unknown_placeholders_unclosed_braces_and_non_json() {
        assert!(
            Template::parse("{\"a\": \"{{nodes}}\"}")
                .unwrap_err()
                .contains("unknown placeholder")
        );
        assert!(
            Template::parse("{\"a\": \"{{node\"}")
                .unwrap_err()
                .contains("not closed")
        );
        assert!(
            Template::parse("{\"a\": {{node}}}")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(Template::parse(DEFAULT_TEMPLATE).is_ok());
    }
}
