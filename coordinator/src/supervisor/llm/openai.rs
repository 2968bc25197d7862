//! The OpenAI chat completions wire format (also spoken by many compatible servers).
//!
//! Request: a system message (the brief) and a user message (the artefacts), with
//! `response_format: {type: json_schema, json_schema: {name, strict: true, schema}}` and
//! temperature 0. Reply: `choices[0].message.content`, with `refusal`, `finish_reason` and
//! `usage` checked and recorded.

use serde::Deserialize;
use serde_json::{Value, json};
use warpline_shared::audit::TokenUsage;

use super::{CallError, LlmSettings, Reply, answer_properties};

/// The request body.
pub(super) fn body(settings: &LlmSettings, brief: &str, user: &str) -> Value {
    let mut b = json!({
        "model": settings.model,
        "messages": [
            {"role": "system", "content": brief},
            {"role": "user", "content": user},
        ],
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "supervisor_decision",
                "strict": true,
                "schema": {
                    "type": "object",
                    "properties": answer_properties(false),
                    "required": ["action", "reason"],
                    "additionalProperties": false,
                },
            },
        },
        "n": 1,
    });
    if let Some(t) = settings.temperature {
        b["temperature"] = json!(t);
    }
    b
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Message>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// Reads a 2xx reply body.
pub(super) fn read(text: &str) -> Reply {
    let resp: Response = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            return Reply {
                text: Err(CallError::Envelope {
                    message: e.to_string(),
                }),
                tokens: None,
            };
        }
    };
    let tokens = resp.usage.map(|u| TokenUsage {
        input: u.prompt_tokens,
        output: u.completion_tokens,
    });
    Reply {
        text: answer(resp.choices),
        tokens,
    }
}

fn answer(choices: Vec<Choice>) -> Result<String, CallError> {
    let Some(first) = choices.into_iter().next() else {
        return Err(CallError::NoAnswer);
    };
    let message = first.message.ok_or(CallError::NoAnswer)?;
    if let Some(refusal) = message.refusal.filter(|r| !r.trim().is_empty()) {
        return Err(CallError::Refused { refusal });
    }
    match first.finish_reason.as_deref() {
        None | Some("stop") => {}
        Some("length") => return Err(CallError::Truncated),
        Some("content_filter") => {
            return Err(CallError::ReplyBlocked {
                reason: "content_filter".into(),
            });
        }
        Some(r) => return Err(CallError::Stopped { reason: r.into() }),
    }
    match message.content {
        Some(c) if !c.trim().is_empty() => Ok(c),
        _ => Err(CallError::NoAnswer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::llm::Provider;

    #[test]
    fn body_asks_for_a_strict_schema() {
        let s = LlmSettings::new(Provider::OpenAi);
        let b = body(&s, "BRIEF", "USER");
        assert_eq!(b["model"], "gpt-4.1-mini");
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "USER");
        let f = &b["response_format"];
        assert_eq!(f["type"], "json_schema");
        assert_eq!(f["json_schema"]["strict"], true);
        assert_eq!(f["json_schema"]["schema"]["additionalProperties"], false);
        assert_eq!(b["temperature"], 0.0);
        let mut no_temp = s.clone();
        no_temp.temperature = None;
        assert!(body(&no_temp, "B", "U").get("temperature").is_none());
    }

    #[test]
    fn replies_are_read_with_named_causes() {
        let ok = r#"{"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "{\"action\":\"retry\",\"reason\":\"x\"}", "refusal": null}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 700, "completion_tokens": 15, "total_tokens": 715}}"#;
        let r = read(ok);
        assert!(r.text.unwrap().contains("retry"));
        assert_eq!(r.tokens.unwrap().output, 15);
        let refused = read(
            r#"{"choices": [{"message": {"content": null, "refusal": "I can't help with that."}, "finish_reason": "stop"}]}"#,
        );
        assert!(matches!(refused.text, Err(CallError::Refused { .. })));
        let filtered = read(
            r#"{"choices": [{"message": {"content": ""}, "finish_reason": "content_filter"}]}"#,
        );
        assert!(matches!(filtered.text, Err(CallError::ReplyBlocked { .. })));
        assert_eq!(read(r#"{"choices": []}"#).text, Err(CallError::NoAnswer));
    }
}
