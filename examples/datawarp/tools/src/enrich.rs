//! ENRICH: `enrich_manifest` merges a draft manifest with the dataset's reference file.
//!
//! The reference (one YAML file per dataset, under `examples/datawarp/reference/`) gives the
//! publication's title, publisher, description and licence, and for each column a description,
//! a unit and a semantic role. A draft column the reference does not describe gets role
//! `unknown` and a warning; a reference column the draft lacks is only warned about. A missing
//! or unreadable reference, or one for another dataset, is a permanent failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, ResultExt, ToolError, warn};
use crate::manifest::{self, Manifest, Role, Semantic};

/// What to enrich and where to put it.
#[derive(Debug, Clone)]
pub struct EnrichArgs {
    /// The draft manifest.
    pub draft: PathBuf,
    /// The dataset's reference YAML.
    pub reference: PathBuf,
    /// Where to write the enriched manifest.
    pub out: PathBuf,
}

/// A dataset's reference metadata, as written by hand.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Dataset the reference describes; must match the draft's.
    pub dataset: String,
    /// Human title of the publication.
    pub title: String,
    /// Who publishes it.
    pub publisher: String,
    /// What it contains.
    pub description: String,
    /// Its licence.
    pub licence: String,
    /// Column name → metadata.
    pub columns: BTreeMap<String, ReferenceColumn>,
}

/// Reference metadata of one column.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceColumn {
    /// What the column means.
    pub description: String,
    /// Unit of measure, if the column is a quantity.
    #[serde(default)]
    pub unit: Option<String>,
    /// Semantic role: identifier, dimension, measure or date.
    pub role: Role,
}

/// Runs the enrichment and returns the summary line.
pub fn run(args: &EnrichArgs) -> Result<String> {
    let draft = Manifest::read(&args.draft)?;
    let reference = Reference::read(&args.reference)?;
    let (enriched, warnings) = enrich(draft, &reference, &args.reference)?;
    for message in &warnings {
        warn(message);
    }
    crate::atomic::write(&args.out, enriched.to_yaml()?.as_bytes())?;
    let unknown = enriched
        .columns
        .iter()
        .filter(|c| c.role == Some(Role::Unknown))
        .count();
    Ok(format!(
        "Enriched {} columns of {} for {} ({unknown} not in the reference)",
        enriched.columns.len(),
        enriched.dataset,
        enriched.month
    ))
}

impl Reference {
    /// Reads and parses the reference at `path`; any failure is permanent.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .permanent(|| format!("cannot read reference `{}`", path.display()))?;
        serde_norway::from_str(&text).permanent(|| {
            format!(
                "reference `{}` is not a valid reference file",
                path.display()
            )
        })
    }
}

/// Adds the reference's metadata to `draft`; returns the enriched manifest and the warnings.
pub fn enrich(
    mut draft: Manifest,
    reference: &Reference,
    reference_path: &Path,
) -> Result<(Manifest, Vec<String>)> {
    if draft.dataset != reference.dataset {
        return Err(ToolError::permanent(format!(
            "draft is for dataset `{}` but reference `{}` describes `{}`; pass the matching reference",
            draft.dataset,
            reference_path.display(),
            reference.dataset
        )));
    }
    let mut warnings = Vec::new();
    for column in &mut draft.columns {
        match reference.columns.get(&column.name) {
            Some(meta) => {
                column.description = Some(meta.description.clone());
                column.unit.clone_from(&meta.unit);
                column.role = Some(meta.role);
            }
            None => {
                column.role = Some(Role::Unknown);
                warnings.push(format!(
                    "column `{}` is not in the reference for `{}`; its role is unknown",
                    column.name, reference.dataset
                ));
            }
        }
    }
    for name in reference.columns.keys() {
        if !draft.columns.iter().any(|c| &c.name == name) {
            warnings.push(format!(
                "reference column `{name}` is absent from the draft"
            ));
        }
    }
    draft.semantic = Some(Semantic {
        title: reference.title.clone(),
        publisher: reference.publisher.clone(),
        description: reference.description.clone(),
        licence: reference.licence.clone(),
        reference: reference_path.display().to_string(),
    });
    draft.enriched_at = Some(manifest::now_rfc3339());
    Ok((draft, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Column, ColumnType, Source};

    fn draft() -> Manifest {
        Manifest {
            dataset: "ae_attendances".into(),
            month: "2024-01".into(),
            source: Source {
                url: "file:///x".into(),
                raw_path: "/x".into(),
                sha256: String::new(),
                bytes: 0,
            },
            row_count: 0,
            column_count: 2,
            columns: vec![
                Column::bare("org_code", ColumnType::String),
                Column::bare("extra", ColumnType::Integer),
            ],
            warnings: Vec::new(),
            generated_at: "2024-02-01T00:00:00Z".into(),
            semantic: None,
            enriched_at: None,
        }
    }

    const REFERENCE: &str = "dataset: ae_attendances
title: A&E Attendances and Emergency Admissions
publisher: NHS England
description: Monthly attendances.
licence: Open Government Licence v3.0
columns:
  org_code:
    description: ODS code of the provider.
    role: identifier
  attendances:
    description: Attendances in the month.
    unit: attendances
    role: measure
";

    #[test]
    fn known_columns_are_described_and_unknown_ones_warned() {
        let reference: Reference = serde_norway::from_str(REFERENCE).unwrap();
        let (enriched, warnings) = enrich(draft(), &reference, Path::new("ref.yaml")).unwrap();
        assert_eq!(enriched.columns[0].role, Some(Role::Identifier));
        assert_eq!(
            enriched.columns[0].description.as_deref(),
            Some("ODS code of the provider.")
        );
        assert_eq!(enriched.columns[1].role, Some(Role::Unknown));
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("`extra`"));
        assert!(warnings[1].contains("`attendances`"));
        assert_eq!(enriched.semantic.unwrap().publisher, "NHS England");
        assert!(enriched.enriched_at.is_some());
    }

    #[test]
    fn a_reference_for_another_dataset_is_refused() {
        let mut reference: Reference = serde_norway::from_str(REFERENCE).unwrap();
        reference.dataset = "rtt_waiting_times".into();
        let error = enrich(draft(), &reference, Path::new("ref.yaml")).unwrap_err();
        assert_eq!(error.exit_code(), 1);
        assert!(error.to_string().contains("`rtt_waiting_times`"));
    }
}
