//! A dataset's provenance in manifests, and a selection of its examples written back as a
//! dataset file (`--keep-correct` of `score` and `probe`).

use serde_json::json;

use crate::Result;
use crate::data::dataset::Dataset;

/// Provenance of a dataset for manifests.
pub fn dataset_json(ds: &Dataset) -> serde_json::Value {
    json!({
        "path": ds.spec.path.display().to_string(),
        "sha256": ds.file_sha256,
        "encoding": ds.spec.encoding.name(),
        "text_column": ds.spec.text_column,
        "label_column": ds.spec.label_column,
        "numeric_columns": ds.spec.numeric_columns,
        "renames": ds.spec.renames,
        "filters": ds.spec.filters,
        "limit": ds.spec.limit,
        "rows_read": ds.rows_read,
        "examples": ds.examples.len(),
    })
}

/// Writes the examples a mask selects as JSONL with the dataset's own column names (plus
/// `index` and `row`), so the file loads back as a dataset.
pub fn write_examples(path: &std::path::Path, ds: &Dataset, keep: &[bool]) -> Result<usize> {
    let mut out = String::new();
    let mut n = 0;
    for (i, (e, &k)) in ds.examples.iter().zip(keep).enumerate() {
        if !k {
            continue;
        }
        let mut o = serde_json::Map::new();
        o.insert("index".into(), json!(i));
        o.insert("row".into(), json!(e.row));
        o.insert(ds.spec.text_column.clone(), json!(e.text));
        if let (Some(c), Some(l)) = (&ds.spec.label_column, &e.label) {
            o.insert(c.clone(), json!(l));
        }
        for (c, v) in ds.spec.numeric_columns.iter().zip(&e.numeric) {
            o.insert(c.clone(), json!(v));
        }
        out.push_str(&serde_json::Value::Object(o).to_string());
        out.push('\n');
        n += 1;
    }
    crate::io::write_atomic(path, out.as_bytes())?;
    Ok(n)
}
