//! `distill/failures.parquet`: the failures as one flat table for pandas, pyarrow,
//! DuckDB or Spark. One row per failure, in the order of `identify/failures.safetensors`:
//!
//! | column | type | what |
//! | --- | --- | --- |
//! | `source_index` | int64 | the image's index in the searched split |
//! | `true_label`, `predicted` | int64 | class ids |
//! | `true_class`, `predicted_class` | string | class names |
//! | `confidence` | float | the classifier's probability of `predicted` |
//! | `eps_norm` | float | the perturbation's norm, `||eps||` |
//! | `component` | int64 | the DP-GMM component the failure's code falls in |
//! | `scenario` | int64, null | its scenario id, null when the component is not one |
use std::path::Path;
use std::sync::Arc;

use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;

use crate::error::{Error, Result};
use crate::identify::Failures;
use crate::scenarios::Scenario;

const SCHEMA: &str = "message failures {
    required int64 source_index;
    required int64 true_label;
    required binary true_class (UTF8);
    required int64 predicted;
    required binary predicted_class (UTF8);
    required float confidence;
    required float eps_norm;
    required int64 component;
    optional int64 scenario;
}";

/// Writes the failures table to `path` (through a temporary file).
pub fn write_failures(
    path: &Path,
    f: &Failures,
    assign: &[i64],
    scenarios: &[Scenario],
    class_name: &dyn Fn(i64) -> String,
) -> Result<()> {
    if assign.len() != f.len() {
        return Err(Error::invalid(
            "failures",
            format!("{} assignments for {} failures", assign.len(), f.len()),
        ));
    }
    let tmp = path.with_extension("parquet.tmp");
    let err =
        |e: parquet::errors::ParquetError| Error::format(&tmp, format!("writing Parquet: {e}"));
    let schema = Arc::new(parse_message_type(SCHEMA).expect("a valid schema"));
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = SerializedFileWriter::new(file, schema, props).map_err(err)?;
    let scenario_of: std::collections::HashMap<i64, i64> = scenarios
        .iter()
        .map(|s| (s.component as i64, s.id as i64))
        .collect();
    let names = |ids: &[i64]| -> Vec<ByteArray> {
        ids.iter()
            .map(|&c| ByteArray::from(class_name(c).as_str()))
            .collect()
    };
    let (scen, def): (Vec<i64>, Vec<i16>) = {
        let mut v = Vec::new();
        let mut d = Vec::with_capacity(assign.len());
        for k in assign {
            match scenario_of.get(k) {
                Some(&s) => {
                    v.push(s);
                    d.push(1)
                }
                None => d.push(0),
            }
        }
        (v, d)
    };
    let mut g = w.next_row_group().map_err(err)?;
    let mut column = 0;
    while let Some(mut c) = g.next_column().map_err(err)? {
        match column {
            0 => c
                .typed::<Int64Type>()
                .write_batch(&f.source_index, None, None),
            1 => c
                .typed::<Int64Type>()
                .write_batch(&f.true_label, None, None),
            2 => c
                .typed::<ByteArrayType>()
                .write_batch(&names(&f.true_label), None, None),
            3 => c.typed::<Int64Type>().write_batch(&f.predicted, None, None),
            4 => c
                .typed::<ByteArrayType>()
                .write_batch(&names(&f.predicted), None, None),
            5 => c
                .typed::<FloatType>()
                .write_batch(&f.confidence, None, None),
            6 => c.typed::<FloatType>().write_batch(&f.eps_norm, None, None),
            7 => c.typed::<Int64Type>().write_batch(assign, None, None),
            _ => c.typed::<Int64Type>().write_batch(&scen, Some(&def), None),
        }
        .map_err(err)?;
        c.close().map_err(err)?;
        column += 1;
    }
    g.close().map_err(err)?;
    w.close().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
