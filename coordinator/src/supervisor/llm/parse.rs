//! Strict parsing of a model's answer into exactly one [`SupervisorDecision`].
//!
//! The only leniency is surrounding whitespace and one Markdown fence labelled `json`. Prose
//! around the object, a second object, an unknown or missing `action`, a missing or empty
//! `reason`, or any extra field is refused with a named cause: a model that does not follow
//! the contract is treated as a failed call, never guessed at.

use serde_json::{Map, Value};
use warpline_shared::contracts::{Action, SupervisorDecision};

/// Why a model's text is not one decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Nothing but whitespace.
    #[error("the answer is empty")]
    Empty,
    /// Text that is not a JSON object (prose, or prose around one).
    #[error("the answer is prose, not one JSON object: `{excerpt}`")]
    Prose {
        /// The start of the text.
        excerpt: String,
    },
    /// Broken JSON.
    #[error("the answer is not valid JSON: {message}")]
    InvalidJson {
        /// serde_json's message.
        message: String,
    },
    /// More than one JSON value.
    #[error("the answer holds {count} JSON values; expected exactly one decision")]
    SeveralObjects {
        /// How many values were found.
        count: usize,
    },
    /// A JSON value that is not an object.
    #[error("the answer is a JSON {kind}, not an object")]
    NotAnObject {
        /// `array`, `string`, ...
        kind: &'static str,
    },
    /// No `action` field.
    #[error("the decision has no `action`")]
    MissingAction,
    /// An `action` outside the four.
    #[error("unknown action `{action}`: expected proceed, retry, halt or escalate")]
    UnknownAction {
        /// What the model wrote.
        action: String,
    },
    /// No `reason` string.
    #[error("the decision has no `reason`")]
    MissingReason,
    /// A blank `reason`.
    #[error("the decision's `reason` is empty")]
    EmptyReason,
    /// A field the contract does not have.
    #[error("unexpected field `{field}` in the decision")]
    UnexpectedField {
        /// The field's name.
        field: String,
    },
}

fn excerpt(text: &str) -> String {
    let mut s: String = text.chars().take(80).collect();
    if s.len() < text.len() {
        s.push('…');
    }
    s
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Removes surrounding whitespace and one ```` ```json ```` fence, if the text is fenced.
fn unfence(text: &str) -> &str {
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("```json")
        && let Some(inner) = rest.strip_suffix("```")
        && (rest.starts_with('\n') || rest.starts_with("\r\n") || rest.starts_with(' '))
    {
        return inner.trim();
    }
    t
}

/// Parses a model's text into exactly one decision.
pub fn parse_decision(text: &str) -> Result<SupervisorDecision, ParseError> {
    let body = unfence(text);
    if body.is_empty() {
        return Err(ParseError::Empty);
    }
    if !body.starts_with('{') && !body.starts_with('[') {
        return Err(ParseError::Prose {
            excerpt: excerpt(body),
        });
    }
    let mut values = Vec::new();
    for v in serde_json::Deserializer::from_str(body).into_iter::<Value>() {
        match v {
            Ok(v) => values.push(v),
            // Valid JSON followed by prose.
            Err(_) if !values.is_empty() => {
                return Err(ParseError::Prose {
                    excerpt: excerpt(body),
                });
            }
            Err(e) => {
                return Err(ParseError::InvalidJson {
                    message: e.to_string(),
                });
            }
        }
    }
    if values.len() != 1 {
        return Err(ParseError::SeveralObjects {
            count: values.len(),
        });
    }
    match values.remove(0) {
        Value::Object(obj) => decision_of(obj),
        other => Err(ParseError::NotAnObject { kind: kind(&other) }),
    }
}

fn decision_of(obj: Map<String, Value>) -> Result<SupervisorDecision, ParseError> {
    if let Some(field) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "action" | "reason" | "schema_version"))
    {
        return Err(ParseError::UnexpectedField {
            field: field.clone(),
        });
    }
    let action = match obj.get("action") {
        None | Some(Value::Null) => return Err(ParseError::MissingAction),
        Some(Value::String(a)) => a
            .parse::<Action>()
            .map_err(|_| ParseError::UnknownAction { action: a.clone() })?,
        Some(other) => {
            return Err(ParseError::UnknownAction {
                action: other.to_string(),
            });
        }
    };
    let reason = match obj.get("reason") {
        Some(Value::String(r)) => r.trim().to_string(),
        _ => return Err(ParseError::MissingReason),
    };
    if reason.is_empty() {
        return Err(ParseError::EmptyReason);
    }
    Ok(SupervisorDecision::new(action, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_fenced_objects_parse() {
        let d = parse_decision(r#"  {"action": "retry", "reason": "exit 75"}  "#).unwrap();
        assert_eq!(d.action, Action::Retry);
        assert_eq!(d.reason, "exit 75");
        let fenced = "```json\n{\"action\": \"halt\", \"reason\": \"CRITICAL\"}\n```\n";
        assert_eq!(parse_decision(fenced).unwrap().action, Action::Halt);
    }

    #[test]
    fn everything_else_is_refused_with_a_cause() {
        type Expect = fn(&ParseError) -> bool;
        let cases: [(&str, Expect); 12] = [
            ("", |e| *e == ParseError::Empty),
            ("   \n", |e| *e == ParseError::Empty),
            ("I think we should retry.", |e| {
                matches!(e, ParseError::Prose { .. })
            }),
            (r#"Sure! {"action": "retry", "reason": "x"}"#, |e| {
                matches!(e, ParseError::Prose { .. })
            }),
            (
                r#"{"action": "retry", "reason": "x"} Hope this helps."#,
                |e| matches!(e, ParseError::Prose { .. }),
            ),
            (
                r#"{"action": "retry", "reason": "x"}{"action": "halt", "reason": "y"}"#,
                |e| *e == ParseError::SeveralObjects { count: 2 },
            ),
            (r#"[{"action": "retry", "reason": "x"}]"#, |e| {
                *e == ParseError::NotAnObject { kind: "array" }
            }),
            (r#"{"action": "skip", "reason": "x"}"#, |e| {
                *e == ParseError::UnknownAction {
                    action: "skip".into(),
                }
            }),
            (r#"{"reason": "x"}"#, |e| *e == ParseError::MissingAction),
            (r#"{"action": "halt"}"#, |e| *e == ParseError::MissingReason),
            (r#"{"action": "halt", "reason": " "}"#, |e| {
                *e == ParseError::EmptyReason
            }),
            (
                r#"{"action": "halt", "reason": "x", "next": "rm -rf"}"#,
                |e| matches!(e, ParseError::UnexpectedField { .. }),
            ),
        ];
        for (text, ok) in cases {
            let err = parse_decision(text).unwrap_err();
            assert!(ok(&err), "{text:?} gave {err:?}");
        }
        assert!(matches!(
            parse_decision(r#"{"action": "halt", "reason": "x""#).unwrap_err(),
            ParseError::InvalidJson { .. }
        ));
        // Only a `json` fence is tolerated.
        assert!(matches!(
            parse_decision("```python\n{\"action\": \"halt\", \"reason\": \"x\"}\n```")
                .unwrap_err(),
            ParseError::Prose { .. }
        ));
    }
}
