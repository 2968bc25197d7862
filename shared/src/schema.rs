//! JSON Schemas of the contracts, generated from the Rust types.
//!
//! The generated files are committed under `shared/schema/` so that other languages and tools
//! can read the contracts without building Rust. The test in this module fails when a type
//! changes and its committed schema does not; run
//! `WARPLINE_UPDATE_SCHEMAS=1 cargo test -p warpline-shared schema` to regenerate them.

use schemars::{Schema, schema_for};

use crate::audit::AuditRecord;
use crate::config::PipelineConfig;
use crate::contracts::{
    PipelineState, StepOutcome, StepResult, StepSpec, SupervisorDecision, ValidationReport,
};
use crate::fleet::Heartbeat;

/// Every committed schema: (file stem, schema).
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("step_spec", schema_for!(StepSpec)),
        ("step_result", schema_for!(StepResult)),
        ("validation_report", schema_for!(ValidationReport)),
        ("step_outcome", schema_for!(StepOutcome)),
        ("supervisor_decision", schema_for!(SupervisorDecision)),
        ("pipeline_state", schema_for!(PipelineState)),
        ("audit_record", schema_for!(AuditRecord)),
        ("pipeline_config", schema_for!(PipelineConfig)),
        ("heartbeat", schema_for!(Heartbeat)),
    ]
}

/// A schema as committed: pretty JSON with a trailing newline.
pub fn render(schema: &Schema) -> String {
    let mut s = serde_json::to_string_pretty(schema).expect("schemas serialise");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn committed_schemas_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schema");
        let update = std::env::var_os("WARPLINE_UPDATE_SCHEMAS").is_some();
        let mut drifted = Vec::new();
        for (name, schema) in all() {
            let path = dir.join(format!("{name}.json"));
            let want = render(&schema);
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path).unwrap_or_default();
            if have != want {
                drifted.push(path.display().to_string());
            }
        }
        assert!(
            drifted.is_empty(),
            "these schemas drifted from the Rust types: {drifted:?}; review the change and run \
             `WARPLINE_UPDATE_SCHEMAS=1 cargo test -p warpline-shared schema` to regenerate them"
        );
    }

    #[test]
    fn decision_schema_limits_actions() {
        let s = render(&schema_for!(SupervisorDecision));
        for a in ["proceed", "retry", "halt", "escalate"] {
            assert!(s.contains(&format!("\"{a}\"")), "{s}");
        }
    }
}
