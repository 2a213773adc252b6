//! PNG plots of probe results, drawn with plotters into an RGB buffer and encoded with `png`.
//! Text uses DejaVu Sans compiled into the binary (no system fonts needed).
//!
//! - accuracy by layer, one line per site, one panel per position (the study's Figure 2),
//!   with the 95% interval as a band and the majority-class rate as a dashed line;
//! - R^2 of each numeric column by layer, one heatmap panel per site (at one position).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::experiments::probe::ResultRow;
use crate::{Error, Result};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

fn encode_png(path: &Path, buf: &[u8], w: u32, h: u32) -> Result<()> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut wr = enc.write_header().map_err(|e| Error::file(path, format!("cannot encode PNG: {e}")))?;
        wr.write_image_data(buf).map_err(|e| Error::file(path, format!("cannot encode PNG: {e}")))?;
    }
    crate::io::write_atomic(path, &out)
}

fn plot_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::file(path, format!("cannot draw the plot: {e:?}"))
}

fn distinct<T: PartialEq + Clone>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// Accuracy by layer: one panel per position, one line per site, with a shared legend.
/// `chance` draws a dashed line.
pub fn accuracy_by_layer(path: &Path, rows: &[ResultRow], chance: Option<f64>, title: &str) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    register_font();
    let acc: Vec<&ResultRow> = rows.iter().filter(|r| r.metric == "accuracy").collect();
    if acc.is_empty() {
        return Err(Error::input("no accuracy results to plot"));
    }
    let positions = distinct(acc.iter().map(|r| r.position));
    let sites = distinct(acc.iter().map(|r| r.site.clone()));
    let max_layer = acc.iter().map(|r| r.layer).max().unwrap_or(0);
    let cols = positions.len().min(3);
    let grid_rows = positions.len().div_ceil(cols);
    let (pw, ph) = (520u32, 380u32);
    let head = 80u32;
    let (w, h) = (pw * cols as u32, ph * grid_rows as u32 + head);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err(path))?;
        let (top, body) = root.split_vertically(head);
        top.draw(&Text::new(title.to_string(), (w as i32 / 2, 20), ("sans-serif", 22.0).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center)))).map_err(plot_err(path))?;
        // Shared legend: one entry per site, then the majority-class line.
        let mut entries: Vec<(String, RGBColor, bool)> = sites.iter().enumerate().map(|(i, s)| (s.clone(), PALETTE[i % PALETTE.len()], false)).collect();
        if let Some(c) = chance {
            entries.push((format!("majority class ({c:.2})"), RGBColor(90, 90, 90), true));
        }
        let entry_w = |e: &(String, RGBColor, bool)| 40 + 8 * e.0.chars().count() as i32;
        let total: i32 = entries.iter().map(entry_w).sum();
        let mut x = (w as i32 - total) / 2;
        for e in &entries {
            let y = 56;
            if e.2 {
                for k in 0..3 {
                    top.draw(&PathElement::new(vec![(x + k * 10, y), (x + k * 10 + 6, y)], e.1.stroke_width(2))).map_err(plot_err(path))?;
                }
            } else {
                top.draw(&PathElement::new(vec![(x, y), (x + 26, y)], e.1.stroke_width(3))).map_err(plot_err(path))?;
            }
            top.draw(&Text::new(e.0.clone(), (x + 32, y), ("sans-serif", 15.0).into_font().color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center)))).map_err(plot_err(path))?;
            x += entry_w(e);
        }
        let panels = body.split_evenly((grid_rows, cols));
        let xr = -0.3f64..(max_layer as f64 + 0.3);
        for (pi, &pos) in positions.iter().enumerate() {
            let panel = &panels[pi];
            let mut chart = ChartBuilder::on(panel)
                .caption(format!("position {pos}"), ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(42)
                .y_label_area_size(56)
                .build_cartesian_2d(xr.clone(), 0f64..1.0f64)
                .map_err(plot_err(path))?;
            chart
                .configure_mesh()
                .x_desc("layer")
                .y_desc("probe accuracy")
                .x_labels((max_layer + 1).min(17))
                .x_label_formatter(&|v| if (v - v.round()).abs() < 1e-6 { format!("{}", v.round() as i64) } else { String::new() })
                .y_labels(6)
                .max_light_lines(0)
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .bold_line_style(RGBColor(230, 230, 230))
                .draw()
                .map_err(plot_err(path))?;
            if let Some(c) = chance {
                chart.draw_series(DashedLineSeries::new(vec![(xr.start, c), (xr.end, c)], 6, 4, RGBColor(90, 90, 90).stroke_width(2))).map_err(plot_err(path))?;
            }
            for (si, site) in sites.iter().enumerate() {
                let color = PALETTE[si % PALETTE.len()];
                let mut pts: Vec<&&ResultRow> = acc.iter().filter(|r| r.position == pos && &r.site == site).collect();
                pts.sort_by_key(|r| r.layer);
                if pts.is_empty() {
                    continue;
                }
                let band: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|r| r.ci_high.is_finite())
                    .map(|r| (r.layer as f64, r.ci_high))
                    .chain(pts.iter().rev().filter(|r| r.ci_low.is_finite()).map(|r| (r.layer as f64, r.ci_low)))
                    .collect();
                if band.len() >= 3 {
                    chart.draw_series(std::iter::once(Polygon::new(band, color.mix(0.12)))).map_err(plot_err(path))?;
                }
                let line: Vec<(f64, f64)> = pts.iter().map(|r| (r.layer as f64, r.value)).collect();
                chart.draw_series(LineSeries::new(line.clone(), color.stroke_width(2))).map_err(plot_err(path))?;
                chart.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_err(path))?;
            }
        }
        root.present().map_err(plot_err(path))?;
    }
    encode_png(path, &buf, w, h)
}

/// Colour of a value on a diverging ramp: white at 0, blue up to `hi`, red down to `lo` (< 0).
fn heat_color(v: f64, lo: f64, hi: f64) -> RGBColor {
    if !v.is_finite() {
        return RGBColor(220, 220, 220);
    }
    let lerp = |a: f64, b: f64, t: f64| (a + (b - a) * t.clamp(0.0, 1.0)) as u8;
    if v < 0.0 {
        let t = if lo < 0.0 { v / lo } else { 1.0 };
        // white -> (178, 24, 43)
        return RGBColor(lerp(255.0, 178.0, t), lerp(255.0, 24.0, t), lerp(255.0, 43.0, t));
    }
    let t = v / hi.max(1e-9);
    // white -> (8, 48, 107)
    RGBColor(lerp(255.0, 8.0, t), lerp(255.0, 48.0, t), lerp(255.0, 107.0, t))
}

/// Heatmaps of R^2 (numeric column x layer), one panel per site, at `position`; the value is
/// printed in each cell when there is room.
pub fn r2_heatmap(path: &Path, rows: &[ResultRow], position: i64, title: &str) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    register_font();
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
    let cell_w: i32 = if layers.len() <= 12 { 44 } else { 30 };
    let cell_h: i32 = 24;
    let label_w: i32 = 150;
    let grid_w = cell_w * layers.len() as i32;
    let panel_w = label_w + grid_w + 30;
    let top: i32 = 80;
    let grid_h = cell_h * cols.len() as i32;
    let (w, h) = ((panel_w * sites.len() as i32 + 120) as u32, (top + grid_h + 60) as u32);
    let show_values = cell_w >= 40;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err(path))?;
        let err = plot_err(path);
        let text = |size: f64, hp: HPos| ("sans-serif", size).into_font().color(&BLACK).pos(Pos::new(hp, VPos::Center));
        root.draw(&Text::new(title.to_string(), (w as i32 / 2, 22), ("sans-serif", 22).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center)))).map_err(&err)?;
        for (si, site) in sites.iter().enumerate() {
            let x0 = si as i32 * panel_w + label_w;
            root.draw(&Text::new(format!("{site} (position {position})"), (x0 + grid_w / 2, top - 22), text(17.0, HPos::Center))).map_err(&err)?;
            for (ci, c) in cols.iter().enumerate() {
                let y = top + ci as i32 * cell_h;
                root.draw(&Text::new(c.clone(), (x0 - 8, y + cell_h / 2), text(13.0, HPos::Right))).map_err(&err)?;
                for (li, &l) in layers.iter().enumerate() {
                    let x = x0 + li as i32 * cell_w;
                    let v = r2.iter().find(|r| &r.site == site && r.layer == l && r.metric.trim_start_matches("r2:") == c).map_or(f64::NAN, |r| r.value);
                    let color = heat_color(v, lo, hi);
                    root.draw(&Rectangle::new([(x, y), (x + cell_w, y + cell_h)], color.filled())).map_err(&err)?;
                    if show_values && v.is_finite() {
                        let dark = (color.0 as u32 + color.1 as u32 + color.2 as u32) < 380;
                        let style = ("sans-serif", 11.0).into_font().color(if dark { &WHITE } else { &BLACK }).pos(Pos::new(HPos::Center, VPos::Center));
                        root.draw(&Text::new(format!("{v:.2}"), (x + cell_w / 2, y + cell_h / 2), style)).map_err(&err)?;
                    }
                }
            }
            root.draw(&Rectangle::new([(x0, top), (x0 + grid_w, top + grid_h)], BLACK.mix(0.5))).map_err(&err)?;
            let every = layers.len().div_ceil(16).max(1);
            for (li, &l) in layers.iter().enumerate().filter(|(i, _)| i % every == 0) {
                root.draw(&Text::new(l.to_string(), (x0 + li as i32 * cell_w + cell_w / 2, top + grid_h + 12), text(12.0, HPos::Center))).map_err(&err)?;
            }
            root.draw(&Text::new("layer".to_string(), (x0 + grid_w / 2, top + grid_h + 34), text(14.0, HPos::Center))).map_err(&err)?;
        }
        // Colour bar from lo to hi.
        let bx = w as i32 - 90;
        let steps = 60;
        for s in 0..steps {
            let v = hi - (hi - lo) * s as f64 / steps as f64;
            let y0 = top + (s as f64 / steps as f64 * grid_h as f64) as i32;
            let y1 = top + ((s + 1) as f64 / steps as f64 * grid_h as f64) as i32 + 1;
            root.draw(&Rectangle::new([(bx, y0), (bx + 16, y1)], heat_color(v, lo, hi).filled())).map_err(&err)?;
        }
        root.draw(&Rectangle::new([(bx, top), (bx + 16, top + grid_h)], BLACK.mix(0.5))).map_err(&err)?;
        root.draw(&Text::new(format!("{hi:.2}"), (bx + 20, top + 6), text(12.0, HPos::Left))).map_err(&err)?;
        root.draw(&Text::new(format!("{lo:.2}"), (bx + 20, top + grid_h - 6), text(12.0, HPos::Left))).map_err(&err)?;
        root.draw(&Text::new("R²".to_string(), (bx + 8, top - 14), text(14.0, HPos::Center))).map_err(&err)?;
        root.present().map_err(&err)?;
    }
    encode_png(path, &buf, w, h)
}
