//! INGEST: `load-batch` loads one month's complete rows into `<schema>.<dataset>`.
//!
//! Two transactions. The first makes the database shape right under a single advisory lock
//! ([`DDL_LOCK_KEY`]), so that the many `load-batch` processes of a backfill never race on
//! `CREATE SCHEMA`, `CREATE TABLE` or `ALTER TABLE`: it creates the schema and the table (typed
//! from the manifest, plus `period_month text not null`), adds missing columns and widens a
//! column whose stored type cannot hold the new values (bigint to double precision, anything to
//! text); it never narrows one. The second deletes the month's rows and copies the CSV's complete
//! rows in, then commits, so that re-running a month replaces it instead of duplicating it. A
//! data file without complete rows is refused before anything is deleted.

use std::collections::HashMap;
use std::path::PathBuf;

use postgres::Client;
use sha2::{Digest, Sha256};

use crate::csvscan;
use crate::db::{self, DbConfig, quote_ident};
use crate::error::{Result, ResultExt, ToolError, warn};
use crate::manifest::{self, Column, ColumnType, Manifest};

/// The advisory lock every DataWarp DDL transaction takes (`pg_advisory_xact_lock`).
pub const DDL_LOCK_KEY: i64 = 0x4441_5441_5741_5250; // "DATAWARP" in ASCII.
/// The column recording which month a row belongs to.
pub const PERIOD_COLUMN: &str = "period_month";

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadArgs {
    /// The (draft or enriched) manifest.
    pub manifest: PathBuf,
    /// The raw CSV the manifest describes.
    pub data: PathBuf,
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOutcome {
    /// Rows copied in.
    pub rows: u64,
    /// Rows of the same month deleted first (a re-run).
    pub replaced: u64,
    /// `schema.table`, unquoted, for messages.
    pub table: String,
}

/// Runs the load, printing migrations as they happen, and returns the summary line.
pub fn run(args: &LoadArgs, db: &DbConfig) -> Result<String> {
    let manifest = Manifest::read(&args.manifest)?;
    manifest::validate_dataset(&manifest.dataset)?;
    manifest::validate_month(&manifest.month)?;
    let bytes = std::fs::read(&args.data)
        .permanent(|| format!("cannot read data file `{}`", args.data.display()))?;
    let digest = hex::encode(Sha256::digest(&bytes));
    if digest != manifest.source.sha256 {
        warn(format!(
            "data file `{}` has sha256 {digest} but the manifest records {}; it may not be the file the manifest describes",
            args.data.display(),
            manifest.source.sha256
        ));
    }
    let (payload, scan) = copy_payload(&bytes, &manifest.month);
    for message in &scan.warnings {
        warn(message);
    }
    let columns = column_types(&manifest, &scan.header)?;
    if scan.rows == 0 {
        // Loading nothing would delete a month that may have loaded fine before.
        return Err(ToolError::permanent(format!(
            "data file `{}` has no complete rows; refusing to replace {} with nothing",
            args.data.display(),
            manifest.month
        )));
    }
    let (mut client, created_db) = db::connect_or_create(db)?;
    if created_db {
        println!(
            "MIGRATION SUCCESS: created the database for schema `{}`",
            db.schema
        );
    }
    let migrations = ensure_table(
        &mut client,
        db,
        &manifest.dataset,
        &columns,
        manifest.row_count,
    )?;
    for line in &migrations {
        println!("MIGRATION SUCCESS: {line}");
    }
    let outcome = load_month(&mut client, db, &manifest, &scan.header, &payload)?;
    let mut summary = format!(
        "Loaded {} rows into {} for {}",
        outcome.rows, outcome.table, manifest.month
    );
    if outcome.replaced > 0 {
        summary.push_str(&format!(
            " (replaced {} earlier rows of that month)",
            outcome.replaced
        ));
    }
    Ok(summary)
}

/// Pairs each data column with its manifest column; a data column the manifest lacks, or one
/// named like the period column, is a permanent error.
fn column_types<'m>(manifest: &'m Manifest, header: &[String]) -> Result<Vec<&'m Column>> {
    if header.is_empty() {
        return Err(ToolError::permanent(
            "data file has no header; nothing to load",
        ));
    }
    let by_name: HashMap<&str, &Column> = manifest
        .columns
        .iter()
        .map(|c| (c.name.as_str(), c))
        .collect();
    header
        .iter()
        .map(|name| {
            if name == PERIOD_COLUMN {
                return Err(ToolError::permanent(format!(
                    "data column `{PERIOD_COLUMN}` clashes with the column load-batch adds; rename it in the source"
                )));
            }
            by_name.get(name.as_str()).copied().ok_or_else(|| {
                ToolError::permanent(format!(
                    "data column `{name}` is not in manifest `{}`; the manifest belongs to another file",
                    manifest.dataset
                ))
            })
        })
        .collect()
}

/// Encodes the complete rows of `bytes` as PostgreSQL `COPY … (FORMAT csv)` input, each row
/// followed by `month` for the period column.
///
/// Empty cells become unquoted empty fields (NULL); every other cell is quoted, so an empty
/// string can never turn into NULL or the reverse.
pub fn copy_payload(bytes: &[u8], month: &str) -> (Vec<u8>, csvscan::Scan) {
    let mut payload = Vec::with_capacity(bytes.len() + bytes.len() / 4);
    let scan = csvscan::scan(bytes, |row| {
        for cell in row.iter().chain([month]) {
            if !csvscan::is_null(cell) {
                payload.push(b'"');
                payload.extend_from_slice(cell.replace('"', "\"\"").as_bytes());
                payload.push(b'"');
            }
            payload.push(b',');
        }
        // The loop leaves a comma after the last field; the row ends there instead.
        *payload.last_mut().expect("a row has at least the month") = b'\n';
    });
    (payload, scan)
}

/// Creates or updates the schema and table under the DDL lock; returns what it changed.
fn ensure_table(
    client: &mut Client,
    db: &DbConfig,
    table: &str,
    columns: &[&Column],
    row_count: u64,
) -> Result<Vec<String>> {
    let qualified = db.qualified(table);
    let label = format!("{}.{table}", db.schema);
    let fail = |e| db::classify(e, &format!("cannot prepare table `{label}`"));
    let mut tx = client.transaction().map_err(fail)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&DDL_LOCK_KEY])
        .map_err(fail)?;
    let mut changes = Vec::new();
    let schema_exists = tx
        .query_opt(
            "SELECT 1 FROM pg_namespace WHERE nspname = $1",
            &[&db.schema],
        )
        .map_err(fail)?
        .is_some();
    if !schema_exists {
        tx.batch_execute(&format!("CREATE SCHEMA {}", quote_ident(&db.schema)))
            .map_err(fail)?;
        changes.push(format!("created schema `{}`", db.schema));
    }
    let existing: HashMap<String, String> = tx
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2",
            &[&db.schema, &table],
        )
        .map_err(fail)?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    if existing.is_empty() {
        let mut definitions: Vec<String> = columns
            .iter()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.kind.pg_type()))
            .collect();
        definitions.push(format!("{} text NOT NULL", quote_ident(PERIOD_COLUMN)));
        tx.batch_execute(&format!(
            "CREATE TABLE {qualified} ({})",
            definitions.join(", ")
        ))
        .map_err(fail)?;
        let index = quote_ident(&format!("{table}_{PERIOD_COLUMN}_idx"));
        tx.batch_execute(&format!(
            "CREATE INDEX {index} ON {qualified} ({})",
            quote_ident(PERIOD_COLUMN)
        ))
        .map_err(fail)?;
        changes.push(format!(
            "created table `{label}` with {} columns",
            columns.len() + 1
        ));
    } else {
        for column in columns {
            let name = quote_ident(&column.name);
            let wanted = column.kind.pg_type();
            match existing.get(&column.name) {
                None => {
                    tx.batch_execute(&format!(
                        "ALTER TABLE {qualified} ADD COLUMN {name} {wanted}"
                    ))
                    .map_err(fail)?;
                    changes.push(format!(
                        "added column `{}` ({wanted}) to `{label}`",
                        column.name
                    ));
                }
                Some(stored) if column.has_values(row_count) => {
                    if let Some(target) = widening(stored, column.kind) {
                        tx.batch_execute(&format!(
                            "ALTER TABLE {qualified} ALTER COLUMN {name} TYPE {target} USING {name}::{target}"
                        ))
                        .map_err(fail)?;
                        changes.push(format!(
                            "widened column `{}` of `{label}` from {stored} to {target}",
                            column.name
                        ));
                    }
                }
                // A column without values this month says nothing about its type.
                Some(_) => {}
            }
        }
    }
    tx.commit().map_err(fail)?;
    Ok(changes)
}

/// The type to widen a stored column to so that it holds values of `wanted`, if it cannot now.
pub fn widening(stored: &str, wanted: ColumnType) -> Option<&'static str> {
    let fits = stored == wanted.pg_type()
        || stored == "text"
        || (stored == "double precision" && wanted == ColumnType::Integer);
    if fits {
        None
    } else if stored == "bigint" && wanted == ColumnType::Float {
        Some("double precision")
    } else {
        Some("text")
    }
}

/// Replaces the month's rows with `payload` in one transaction.
fn load_month(
    client: &mut Client,
    db: &DbConfig,
    manifest: &Manifest,
    header: &[String],
    payload: &[u8],
) -> Result<LoadOutcome> {
    let label = format!("{}.{}", db.schema, manifest.dataset);
    let qualified = db.qualified(&manifest.dataset);
    let fail = |e| db::classify(e, &format!("cannot load {} into `{label}`", manifest.month));
    let mut tx = client.transaction().map_err(fail)?;
    let replaced = tx
        .execute(
            &format!(
                "DELETE FROM {qualified} WHERE {} = $1",
                quote_ident(PERIOD_COLUMN)
            ),
            &[&manifest.month],
        )
        .map_err(fail)?;
    let list: Vec<String> = header
        .iter()
        .chain([&PERIOD_COLUMN.to_string()])
        .map(|h| quote_ident(h))
        .collect();
    let mut writer = tx
        .copy_in(&format!(
            "COPY {qualified} ({}) FROM STDIN (FORMAT csv)",
            list.join(", ")
        ))
        .map_err(fail)?;
    std::io::Write::write_all(&mut writer, payload)
        .transient(|| format!("cannot stream rows to `{label}`"))?;
    let rows = writer.finish().map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(LoadOutcome {
        rows,
        replaced,
        table: label,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_payload_quotes_values_and_leaves_nulls_bare() {
        let (payload, scan) = copy_payload(b"a,b,c\nx,,\"say \"\"hi\"\"\"\n1,2\n", "2024-01");
        assert_eq!(scan.rows, 1);
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            "\"x\",,\"say \"\"hi\"\"\",\"2024-01\"\n"
        );
    }

    #[test]
    fn widening_only_goes_wider() {
        assert_eq!(widening("bigint", ColumnType::Integer), None);
        assert_eq!(
            widening("bigint", ColumnType::Float),
            Some("double precision")
        );
        assert_eq!(widening("double precision", ColumnType::Integer), None);
        assert_eq!(widening("text", ColumnType::Date), None);
        assert_eq!(widening("date", ColumnType::String), Some("text"));
        assert_eq!(widening("bigint", ColumnType::Date), Some("text"));
    }
}
