//! Plots of probe results ([`ResultRow`]s) through the generic plots of `io::plot`: accuracy by
//! layer (the study's Figure 2) and the R² heatmaps of the numeric columns.

use std::path::Path;

use super::ResultRow;
use crate::io::plot::{Grid, LinePanels, Point, distinct, heatmaps, line_panels};
use crate::{Error, Result};

/// Accuracy by layer: one panel per position, one line per site with its 95% interval as a
/// band, and `chance` (the majority-class rate) as a dashed line.
pub fn accuracy_by_layer(path: &Path, rows: &[ResultRow], chance: Option<f64>, title: &str) -> Result<()> {
    line_panels(path, &accuracy_chart(rows, chance, title)?)
}

/// The chart [`accuracy_by_layer`] draws.
pub fn accuracy_chart(rows: &[ResultRow], chance: Option<f64>, title: &str) -> Result<LinePanels> {
    let acc: Vec<&ResultRow> = rows.iter().filter(|r| r.metric == "accuracy").collect();
    if acc.is_empty() {
        return Err(Error::input("no accuracy results to plot"));
    }
    let positions = distinct(acc.iter().map(|r| r.position));
    let sites = distinct(acc.iter().map(|r| r.site.clone()));
    let panels = positions
        .iter()
        .map(|&pos| {
            let lines = sites
                .iter()
                .map(|site| {
                    let mut pts: Vec<&&ResultRow> = acc.iter().filter(|r| r.position == pos && &r.site == site).collect();
                    pts.sort_by_key(|r| r.layer);
                    pts.iter().map(|r| Point { x: r.layer as f64, y: r.value, lo: r.ci_low, hi: r.ci_high }).collect()
                })
                .collect();
            (format!("position {pos}"), lines)
        })
        .collect();
    let chart = LinePanels {
        title: title.to_string(),
        lines: sites,
        panels,
        x_range: (0.0, acc.iter().map(|r| r.layer).max().unwrap_or(0) as f64),
        x_desc: "layer".into(),
        y_desc: "probe accuracy".into(),
        y_range: (0.0, 1.0),
        reference: chance.map(|c| (format!("majority class ({c:.2})"), c)),
    };
    Ok(chart)
}

/// Heatmaps of R^2 (numeric column x layer), one panel per site, at `position`.
pub fn r2_heatmap(path: &Path, rows: &[ResultRow], position: i64, title: &str) -> Result<()> {
    heatmaps(path, title, &r2_panels(rows, position)?)
}

/// The panels [`r2_heatmap`] draws.
pub fn r2_panels(rows: &[ResultRow], position: i64) -> Result<Vec<Grid>> {
    let r2: Vec<&ResultRow> = rows.iter().filter(|r| r.metric.starts_with("r2:") && r.position == position).collect();
    if r2.is_empty() {
        return Err(Error::input("no R^2 results to plot"));
    }
    let sites = distinct(r2.iter().map(|r| r.site.clone()));
    let cols = distinct(r2.iter().map(|r| r.metric.trim_start_matches("r2:").to_string()));
    let layers = {
        let mut l = distinct(r2.iter().map(|r| r.layer));
        l.sort_unstable();
        l
    };
    let hi = r2.iter().map(|r| r.value).filter(|v| v.is_finite()).fold(0.05f64, f64::max);
    let lo = r2.iter().map(|r| r.value).filter(|v| v.is_finite()).fold(0.0f64, f64::min).max(-1.0);
    let panels: Vec<Grid> = sites
        .iter()
        .map(|site| Grid {
            title: format!("{site} (position {position})"),
            row_labels: cols.clone(),
            col_labels: layers.iter().map(|l| l.to_string()).collect(),
            values: cols
                .iter()
                .map(|c| layers.iter().map(|&l| r2.iter().find(|r| &r.site == site && r.layer == l && r.metric.trim_start_matches("r2:") == c).map(|r| r.value)).collect())
                .collect(),
            value_label: "R²".into(),
            range: Some((lo, hi)),
            x_desc: "layer".into(),
            y_desc: "appraisal (ridge probe target)".into(),
        })
        .collect();
    Ok(panels)
}
