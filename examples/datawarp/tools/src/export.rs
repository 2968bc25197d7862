//! PUBLISH: `export_to_parquet` writes one month of `<schema>.<dataset>` as a Parquet file plus a
//! JSON file describing it.
//!
//! The Parquet schema follows the table's stored column types (what `load-batch` created, after
//! any widening): bigint → INT64, double precision → DOUBLE, text → BYTE_ARRAY (String), date →
//! INT32 (Date), boolean → BOOLEAN; other types are read as text. A column is OPTIONAL when the
//! month has an empty cell in it and REQUIRED otherwise. Rows are ordered by every column in
//! turn, so the same table contents always give the same bytes. The low-level column writer is
//! used on purpose: it needs no Arrow dependency.

use std::path::PathBuf;
use std::sync::Arc;

use parquet::basic::{Compression, LogicalType, Repetition, Type as PhysicalType};
use parquet::data_type::{
    BoolType, ByteArray, ByteArrayType, DataType, DoubleType, Int32Type, Int64Type,
};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::writer::{SerializedColumnWriter, SerializedFileWriter};
use parquet::schema::types::Type;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::{self, DbConfig, quote_ident};
use crate::error::{Result, ResultExt, ToolError};
use crate::load::PERIOD_COLUMN;
use crate::manifest::{self, Manifest};

/// Rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 100_000;

/// What to export and where to put it.
#[derive(Debug, Clone)]
pub struct ExportArgs {
    /// The manifest naming the dataset and month.
    pub manifest: PathBuf,
    /// Where to write the Parquet file.
    pub out: PathBuf,
    /// Where to write the metadata JSON.
    pub metadata_out: PathBuf,
}

/// The metadata JSON written beside the Parquet file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportMetadata {
    /// Dataset name.
    pub dataset: String,
    /// Month, `YYYY-MM`.
    pub month: String,
    /// `schema.table` the rows came from.
    pub table: String,
    /// Rows exported.
    pub row_count: u64,
    /// Columns in file order.
    pub columns: Vec<ExportColumn>,
    /// The Parquet file.
    pub parquet: ParquetFile,
    /// The manifest the export was made for.
    pub source_manifest: String,
    /// When the export was written (RFC 3339, UTC).
    pub exported_at: String,
}

/// One exported column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExportColumn {
    /// Column name.
    pub name: String,
    /// Stored PostgreSQL type.
    pub pg_type: String,
    /// Parquet physical type.
    pub physical_type: String,
    /// Parquet logical type, if any.
    pub logical_type: Option<String>,
    /// Whether the column is OPTIONAL (has empty cells this month).
    pub nullable: bool,
    /// Empty cells this month.
    pub null_count: u64,
}

/// The written Parquet file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParquetFile {
    /// Where it was written.
    pub path: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Compression codec of its pages.
    pub compression: String,
}

/// The values of one column, one entry per row.
#[derive(Debug, Clone, PartialEq)]
enum Cells {
    Int64(Vec<Option<i64>>),
    Double(Vec<Option<f64>>),
    Date(Vec<Option<i32>>),
    Boolean(Vec<Option<bool>>),
    Text(Vec<Option<ByteArray>>),
}

/// How a stored column is read and written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int64,
    Double,
    Date,
    Boolean,
    Text,
}

/// Runs the export and returns the summary line.
pub fn run(args: &ExportArgs, db: &DbConfig) -> Result<String> {
    let manifest = Manifest::read(&args.manifest)?;
    manifest::validate_dataset(&manifest.dataset)?;
    manifest::validate_month(&manifest.month)?;
    let table = format!("{}.{}", db.schema, manifest.dataset);
    let mut client = db::connect(db)?;
    let fail = |e| db::classify(e, &format!("cannot read `{table}`"));
    let stored: Vec<(String, String)> = client
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
            &[&db.schema, &manifest.dataset],
        )
        .map_err(fail)?
        .into_iter()
        .map(|row| (row.get(0), row.get(1)))
        .filter(|(name, _): &(String, String)| name != PERIOD_COLUMN)
        .collect();
    if stored.is_empty() {
        return Err(ToolError::permanent(format!(
            "table `{table}` does not exist; run load-batch for this dataset first"
        )));
    }
    let kinds: Vec<Kind> = stored.iter().map(|(_, pg_type)| kind_of(pg_type)).collect();
    let select: Vec<String> = stored
        .iter()
        .zip(&kinds)
        .map(|((name, _), kind)| select_expr(name, *kind))
        .collect();
    let order: Vec<String> = (1..=stored.len()).map(|i| i.to_string()).collect();
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM {} WHERE {} = $1 ORDER BY {}",
                select.join(", "),
                db.qualified(&manifest.dataset),
                quote_ident(PERIOD_COLUMN),
                order.join(", ")
            ),
            &[&manifest.month],
        )
        .map_err(fail)?;
    if rows.is_empty() {
        return Err(ToolError::permanent(format!(
            "no rows for {} in `{table}`; load the month with load-batch before exporting it",
            manifest.month
        )));
    }
    let mut columns: Vec<Cells> = kinds
        .iter()
        .map(|kind| Cells::with_capacity(*kind, rows.len()))
        .collect();
    for row in &rows {
        for (index, cells) in columns.iter_mut().enumerate() {
            cells.push(row, index).map_err(fail)?;
        }
    }
    let names: Vec<&str> = stored.iter().map(|(name, _)| name.as_str()).collect();
    let bytes = write_parquet(&names, &columns, &manifest)
        .permanent(|| format!("cannot encode {} of `{table}` as parquet", manifest.month))?;
    crate::atomic::write(&args.out, &bytes)?;
    let metadata = ExportMetadata {
        dataset: manifest.dataset.clone(),
        month: manifest.month.clone(),
        table: table.clone(),
        row_count: rows.len() as u64,
        columns: stored
            .iter()
            .zip(&columns)
            .map(|((name, pg_type), cells)| {
                let (physical, logical) = cells.kind().parquet_types();
                ExportColumn {
                    name: name.clone(),
                    pg_type: pg_type.clone(),
                    physical_type: physical.to_string(),
                    logical_type: logical.map(|l| format!("{l:?}")),
                    nullable: cells.null_count() > 0,
                    null_count: cells.null_count(),
                }
            })
            .collect(),
        parquet: ParquetFile {
            path: args.out.display().to_string(),
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            compression: "snappy".into(),
        },
        source_manifest: args.manifest.display().to_string(),
        exported_at: manifest::now_rfc3339(),
    };
    let json = serde_json::to_vec_pretty(&metadata)
        .permanent(|| "cannot serialise the export metadata")?;
    crate::atomic::write(&args.metadata_out, &json)?;
    Ok(format!(
        "Exported {} rows to {}",
        rows.len(),
        args.out.display()
    ))
}

fn kind_of(pg_type: &str) -> Kind {
    match pg_type {
        "bigint" | "integer" | "smallint" => Kind::Int64,
        "double precision" | "real" | "numeric" => Kind::Double,
        "date" => Kind::Date,
        "boolean" => Kind::Boolean,
        _ => Kind::Text,
    }
}

/// The SELECT expression reading a column as the Rust type its [`Kind`] stores.
fn select_expr(name: &str, kind: Kind) -> String {
    let column = quote_ident(name);
    match kind {
        Kind::Int64 => format!("{column}::bigint"),
        Kind::Double => format!("{column}::double precision"),
        // Parquet's DATE is days since the Unix epoch, which date subtraction gives directly.
        Kind::Date => format!("({column} - DATE '1970-01-01')::integer"),
        Kind::Boolean => column,
        Kind::Text => format!("{column}::text"),
    }
}

impl Kind {
    fn parquet_types(self) -> (PhysicalType, Option<LogicalType>) {
        match self {
            Self::Int64 => (PhysicalType::INT64, None),
            Self::Double => (PhysicalType::DOUBLE, None),
            Self::Date => (PhysicalType::INT32, Some(LogicalType::Date)),
            Self::Boolean => (PhysicalType::BOOLEAN, None),
            Self::Text => (PhysicalType::BYTE_ARRAY, Some(LogicalType::String)),
        }
    }
}

impl Cells {
    fn with_capacity(kind: Kind, rows: usize) -> Self {
        match kind {
            Kind::Int64 => Self::Int64(Vec::with_capacity(rows)),
            Kind::Double => Self::Double(Vec::with_capacity(rows)),
            Kind::Date => Self::Date(Vec::with_capacity(rows)),
            Kind::Boolean => Self::Boolean(Vec::with_capacity(rows)),
            Kind::Text => Self::Text(Vec::with_capacity(rows)),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Self::Int64(_) => Kind::Int64,
            Self::Double(_) => Kind::Double,
            Self::Date(_) => Kind::Date,
            Self::Boolean(_) => Kind::Boolean,
            Self::Text(_) => Kind::Text,
        }
    }

    fn push(
        &mut self,
        row: &postgres::Row,
        index: usize,
    ) -> std::result::Result<(), postgres::Error> {
        match self {
            Self::Int64(v) => v.push(row.try_get(index)?),
            Self::Double(v) => v.push(row.try_get(index)?),
            Self::Date(v) => v.push(row.try_get(index)?),
            Self::Boolean(v) => v.push(row.try_get(index)?),
            Self::Text(v) => v.push(
                row.try_get::<_, Option<String>>(index)?
                    .map(|s| ByteArray::from(s.into_bytes())),
            ),
        }
        Ok(())
    }

    fn null_count(&self) -> u64 {
        fn nulls<T>(cells: &[Option<T>]) -> u64 {
            cells.iter().filter(|c| c.is_none()).count() as u64
        }
        match self {
            Self::Int64(v) => nulls(v),
            Self::Double(v) => nulls(v),
            Self::Date(v) => nulls(v),
            Self::Boolean(v) => nulls(v),
            Self::Text(v) => nulls(v),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Int64(v) => v.len(),
            Self::Double(v) => v.len(),
            Self::Date(v) => v.len(),
            Self::Boolean(v) => v.len(),
            Self::Text(v) => v.len(),
        }
    }
}

/// Encodes the columns as a Parquet file in memory.
fn write_parquet(
    names: &[&str],
    columns: &[Cells],
    manifest: &Manifest,
) -> parquet::errors::Result<Vec<u8>> {
    let fields = names
        .iter()
        .zip(columns)
        .map(|(name, cells)| {
            let (physical, logical) = cells.kind().parquet_types();
            let repetition = if cells.null_count() > 0 {
                Repetition::OPTIONAL
            } else {
                Repetition::REQUIRED
            };
            Type::primitive_type_builder(name, physical)
                .with_repetition(repetition)
                .with_logical_type(logical)
                .build()
                .map(Arc::new)
        })
        .collect::<parquet::errors::Result<Vec<_>>>()?;
    let schema = Arc::new(
        Type::group_type_builder("schema")
            .with_fields(fields)
            .build()?,
    );
    let properties = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(concat!("warpline-datawarp ", env!("CARGO_PKG_VERSION")).to_string())
        .set_key_value_metadata(Some(vec![
            KeyValue::new("datawarp.dataset".to_string(), manifest.dataset.clone()),
            KeyValue::new("datawarp.month".to_string(), manifest.month.clone()),
        ]))
        .build();
    let mut writer = SerializedFileWriter::new(Vec::new(), schema, Arc::new(properties))?;
    let rows = columns.first().map_or(0, Cells::len);
    let mut start = 0;
    while start < rows {
        let end = (start + ROW_GROUP_ROWS).min(rows);
        let mut group = writer.next_row_group()?;
        for cells in columns {
            let mut column = group
                .next_column()?
                .expect("the schema has one column per cells");
            let optional = cells.null_count() > 0;
            match cells {
                Cells::Int64(v) => write_cells::<Int64Type>(&mut column, &v[start..end], optional)?,
                Cells::Double(v) => {
                    write_cells::<DoubleType>(&mut column, &v[start..end], optional)?
                }
                Cells::Date(v) => write_cells::<Int32Type>(&mut column, &v[start..end], optional)?,
                Cells::Boolean(v) => {
                    write_cells::<BoolType>(&mut column, &v[start..end], optional)?
                }
                Cells::Text(v) => {
                    write_cells::<ByteArrayType>(&mut column, &v[start..end], optional)?
                }
            }
            column.close()?;
        }
        group.close()?;
        start = end;
    }
    writer.into_inner()
}

/// Writes one row group's slice of a column: the present values, plus definition levels (1 for
/// a value, 0 for a null) when the column is OPTIONAL.
fn write_cells<T: DataType>(
    column: &mut SerializedColumnWriter<'_>,
    cells: &[Option<T::T>],
    optional: bool,
) -> parquet::errors::Result<()> {
    let values: Vec<T::T> = cells.iter().flatten().cloned().collect();
    let levels: Vec<i16> = cells.iter().map(|c| i16::from(c.is_some())).collect();
    column
        .typed::<T>()
        .write_batch(&values, optional.then_some(levels.as_slice()), None)?;
    Ok(())
}
