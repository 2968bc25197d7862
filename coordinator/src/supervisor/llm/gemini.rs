//! Gemini's `generateContent` wire format: the request body and how a reply is read.
//!
//! Request: `systemInstruction` holds the brief, one user `contents` part holds the artefacts,
//! and `generationConfig` asks for `application/json` matching a `responseSchema` whose
//! `action` is one of the four actions and whose `reason` is required, at temperature 0.
//! Reply: the text of `candidates[0].content.parts[]` (thought parts skipped), with
//! `promptFeedback.blockReason`, `finishReason` and `usageMetadata` checked and recorded.

use serde::Deserialize;
use serde_json::{Value, json};
use warpline_shared::audit::TokenUsage;

use super::{CallError, LlmSettings, Reply, answer_properties};

/// The request body.
pub(super) fn body(settings: &LlmSettings, brief: &str, user: &str) -> Value {
    let mut generation = json!({
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "OBJECT",
            "properties": answer_properties(true),
            "required": ["action", "reason"],
            "propertyOrdering": ["action", "reason"],
        },
        "candidateCount": 1,
    });
    if let Some(t) = settings.temperature {
        generation["temperature"] = json!(t);
    }
    json!({
        "systemInstruction": {"parts": [{"text": brief}]},
        "contents": [{"role": "user", "parts": [{"text": user}]}],
        "generationConfig": generation,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<Usage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    thought: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
}

/// Finish reasons that mean a filter stopped the reply.
const BLOCKED: [&str; 6] = [
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_SAFETY",
];

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
    let tokens = resp.usage_metadata.map(|u| TokenUsage {
        input: u.prompt_token_count,
        output: u.candidates_token_count,
    });
    let text = answer(resp.prompt_feedback, resp.candidates);
    Reply { text, tokens }
}

fn answer(
    feedback: Option<PromptFeedback>,
    candidates: Vec<Candidate>,
) -> Result<String, CallError> {
    if let Some(reason) = feedback.and_then(|f| f.block_reason) {
        return Err(CallError::PromptBlocked { reason });
    }
    let Some(first) = candidates.into_iter().next() else {
        return Err(CallError::NoAnswer);
    };
    match first.finish_reason.as_deref() {
        None | Some("STOP") | Some("FINISH_REASON_UNSPECIFIED") => {}
        Some("MAX_TOKENS") => return Err(CallError::Truncated),
        Some(r) if BLOCKED.contains(&r) => {
            return Err(CallError::ReplyBlocked { reason: r.into() });
        }
        Some(r) => return Err(CallError::Stopped { reason: r.into() }),
    }
    let text: String = first
        .content
        .map(|c| c.parts)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| !p.thought)
        .filter_map(|p| p.text)
        .collect();
    if text.trim().is_empty() {
        return Err(CallError::NoAnswer);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::llm::Provider;

    #[test]
    fn body_has_the_schema_and_temperature() {
        let s = LlmSettings::new(Provider::Gemini);
        let b = body(&s, "BRIEF", "USER");
        assert_eq!(b["systemInstruction"]["parts"][0]["text"], "BRIEF");
        assert_eq!(b["contents"][0]["parts"][0]["text"], "USER");
        let g = &b["generationConfig"];
        assert_eq!(g["responseMimeType"], "application/json");
        assert_eq!(g["temperature"], 0.0);
        assert_eq!(
            g["responseSchema"]["properties"]["action"]["enum"],
            json!(["proceed", "retry", "halt", "escalate"])
        );
        assert_eq!(g["responseSchema"]["required"], json!(["action", "reason"]));
    }

    #[test]
    fn replies_are_read_with_named_causes() {
        let ok = r#"{"candidates": [{"content": {"parts": [{"text": "{\"action\":", "thought": false}, {"text": "\"halt\",\"reason\":\"x\"}"}], "role": "model"}, "finishReason": "STOP"}],
                    "usageMetadata": {"promptTokenCount": 900, "candidatesTokenCount": 20, "totalTokenCount": 920}}"#;
        let r = read(ok);
        assert_eq!(r.text.unwrap(), r#"{"action":"halt","reason":"x"}"#);
        assert_eq!(r.tokens.unwrap().input, 900);
        let blocked = read(
            r#"{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 5}}"#,
        );
        assert_eq!(
            blocked.text.unwrap_err(),
            CallError::PromptBlocked {
                reason: "SAFETY".into()
            }
        );
        let safety = read(r#"{"candidates": [{"finishReason": "SAFETY"}]}"#);
        assert!(matches!(safety.text, Err(CallError::ReplyBlocked { .. })));
        assert_eq!(read(r#"{"candidates": []}"#).text, Err(CallError::NoAnswer));
        assert!(matches!(
            read("<html>").text,
            Err(CallError::Envelope { .. })
        ));
        assert_eq!(
            read(r#"{"candidates": [{"content": {"parts": [{"text": "{"}]}, "finishReason": "MAX_TOKENS"}]}"#).text,
            Err(CallError::Truncated)
        );
    }
}
