//! PNG plots, drawn with plotters into an RGB buffer and encoded with `png`.
//! Text uses DejaVu Sans compiled into the binary (no system fonts needed).
//!
//! - line charts in panels (`line_panels`: e.g. probe accuracy by layer, one line per site, one
//!   panel per position, the study's Figure 2), each line with its interval as a band, and a
//!   dashed reference line;
//! - any labelled grid of values as a heatmap (`heatmap`, e.g. patching flip rates), or several
//!   side by side on one colour scale (`heatmaps`).
//!
//! Plots of a given kind of result (probe results: `experiments::probe::plots`) turn their
//! rows into these.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::{Error, Result};

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
        let _ = plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold());
    });
}

/// Series colours: matplotlib's tab10, then six darker ones, so that a chart of the 13 emotions
/// has a distinct colour per line; past 16, hues at the golden angle.
const PALETTE: [RGBColor; 16] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 128),
    RGBColor(128, 0, 0),
    RGBColor(0, 128, 128),
    RGBColor(0, 0, 0),
    RGBColor(240, 50, 230),
    RGBColor(0, 100, 0),
];

/// The colour of series `i` of a chart (its line, band, markers and legend entry).
pub fn series_color(i: usize) -> RGBColor {
    if let Some(&c) = PALETTE.get(i) {
        return c;
    }
    let hue = ((i - PALETTE.len()) as f64 * 137.507_764) % 360.0;
    let rgb = HSLColor(hue / 360.0, 0.7, if i % 2 == 0 { 0.35 } else { 0.5 }).to_backend_color().rgb;
    RGBColor(rgb.0, rgb.1, rgb.2)
}

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

/// The distinct items of `it`, in order of first appearance.
pub fn distinct<T: PartialEq + Clone>(it: impl Iterator<Item = T>) -> Vec<T> {
    let mut v: Vec<T> = Vec::new();
    for x in it {
        if !v.contains(&x) {
            v.push(x);
        }
    }
    v
}

/// One point of a line: x (e.g. a layer, a strength), y, and its interval (lo, hi; a band is
/// drawn through the finite bounds).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub x: f64,
    pub y: f64,
    pub lo: f64,
    pub hi: f64,
}

/// Line charts side by side: one panel per entry of `panels` (its caption and, per line, its
/// points sorted by x; a line with no points is not drawn), y over `y_range`, x over `x_range`
/// (ticks at whole numbers),
/// one shared legend of the lines (a colour each, in order) and of the dashed `reference` line.
#[derive(Clone, Debug, PartialEq)]
pub struct LinePanels {
    pub title: String,
    pub lines: Vec<String>,
    pub panels: Vec<(String, Vec<Vec<Point>>)>,
    pub x_range: (f64, f64),
    pub x_desc: String,
    pub y_desc: String,
    /// The y axis (e.g. (0, 1) for shares).
    pub y_range: (f64, f64),
    /// A horizontal dashed line: its legend entry and its y.
    pub reference: Option<(String, f64)>,
}

/// Draws `chart` to a PNG: up to three panels a row, under the title and the legend.
pub fn line_panels(path: &Path, chart: &LinePanels) -> Result<()> {
    render_png(path, line_panels_size(chart), |root| draw_line_panels(root, chart, path))
}

/// [`line_panels`] as SVG text (tests read the labels a plot draws).
pub fn line_panels_svg(chart: &LinePanels) -> Result<String> {
    render_svg(line_panels_size(chart), |root| draw_line_panels(root, chart, Path::new("plot.svg")))
}

/// Legend entries (name, colour, dashed) of a line chart, and the width of each.
fn legend_entries(chart: &LinePanels) -> Vec<(String, RGBColor, bool)> {
    let mut entries: Vec<(String, RGBColor, bool)> = chart.lines.iter().enumerate().map(|(i, s)| (s.clone(), series_color(i), false)).collect();
    if let Some((name, _)) = &chart.reference {
        entries.push((name.clone(), RGBColor(90, 90, 90), true));
    }
    entries
}

fn legend_entry_width(e: &(String, RGBColor, bool)) -> i32 {
    40 + 8 * e.0.chars().count() as i32
}

/// Panel size, columns, rows and the height of the title and legend band of a line chart.
const LINE_PANEL: (u32, u32) = (520, 380);
const LINE_HEAD: u32 = 80;

fn line_panels_size(chart: &LinePanels) -> (u32, u32) {
    let cols = chart.panels.len().clamp(1, 3);
    let grid_rows = chart.panels.len().div_ceil(cols).max(1);
    let total: i32 = legend_entries(chart).iter().map(legend_entry_width).sum();
    // Wide enough for the title and the legend.
    let w = (LINE_PANEL.0 * cols as u32).max(total as u32 + 40).max(12 * chart.title.chars().count() as u32 + 40);
    (w, LINE_PANEL.1 * grid_rows as u32 + LINE_HEAD)
}

/// Draws a PNG of size `size` through `draw`.
fn render_png(path: &Path, (w, h): (u32, u32), draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<()> {
    register_font();
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_err(path))?;
    }
    encode_png(path, &buf, w, h)
}

/// The SVG text of a plot of size `size` drawn through `draw`.
fn render_svg(size: (u32, u32), draw: impl FnOnce(&DrawingArea<SVGBackend, plotters::coord::Shift>) -> Result<()>) -> Result<String> {
    register_font();
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        draw(&root)?;
        root.present().map_err(plot_err(Path::new("plot.svg")))?;
    }
    Ok(out)
}

fn draw_line_panels<DB: DrawingBackend>(root: &DrawingArea<DB, plotters::coord::Shift>, chart: &LinePanels, path: &Path) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let title = &chart.title;
    let (x_lo, x_hi) = chart.x_range;
    let cols = chart.panels.len().clamp(1, 3);
    let grid_rows = chart.panels.len().div_ceil(cols).max(1);
    // Shared legend: one entry per line, then the reference line.
    let entries = legend_entries(chart);
    let entry_w = legend_entry_width;
    let total: i32 = entries.iter().map(entry_w).sum();
    let w = root.dim_in_pixel().0;
    {
        root.fill(&WHITE).map_err(plot_err(path))?;
        let (top, body) = root.split_vertically(LINE_HEAD);
        top.draw(&Text::new(title.to_string(), (w as i32 / 2, 20), ("sans-serif", 22.0).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center)))).map_err(plot_err(path))?;
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
        let pad = 0.3f64.max(0.02 * (x_hi - x_lo));
        let xr = (x_lo - pad)..(x_hi + pad);
        for (pi, (caption, lines)) in chart.panels.iter().enumerate() {
            let panel = &panels[pi];
            let mut plot = ChartBuilder::on(panel)
                .caption(caption, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(42)
                .y_label_area_size(56)
                .build_cartesian_2d(xr.clone(), chart.y_range.0..chart.y_range.1)
                .map_err(plot_err(path))?;
            plot.configure_mesh()
                .x_desc(&chart.x_desc)
                .y_desc(&chart.y_desc)
                .x_labels(((x_hi - x_lo).round() as usize + 1).clamp(2, 17))
                .x_label_formatter(&|v| if (v - v.round()).abs() < 1e-6 { format!("{}", v.round() as i64) } else { String::new() })
                .y_labels(6)
                .max_light_lines(0)
                .label_style(("sans-serif", 14))
                .axis_desc_style(("sans-serif", 15))
                .bold_line_style(RGBColor(230, 230, 230))
                .draw()
                .map_err(plot_err(path))?;
            if let Some((_, c)) = chart.reference {
                plot.draw_series(DashedLineSeries::new(vec![(xr.start, c), (xr.end, c)], 6, 4, RGBColor(90, 90, 90).stroke_width(2))).map_err(plot_err(path))?;
            }
            for (si, pts) in lines.iter().enumerate() {
                let color = series_color(si);
                if pts.is_empty() {
                    continue;
                }
                let band: Vec<(f64, f64)> = pts
                    .iter()
                    .filter(|r| r.hi.is_finite())
                    .map(|r| (r.x, r.hi))
                    .chain(pts.iter().rev().filter(|r| r.lo.is_finite()).map(|r| (r.x, r.lo)))
                    .collect();
                if band.len() >= 3 {
                    plot.draw_series(std::iter::once(Polygon::new(band, color.mix(0.12)))).map_err(plot_err(path))?;
                }
                let line: Vec<(f64, f64)> = pts.iter().map(|r| (r.x, r.y)).collect();
                plot.draw_series(LineSeries::new(line.clone(), color.stroke_width(2))).map_err(plot_err(path))?;
                plot.draw_series(line.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(plot_err(path))?;
            }
        }
    }
    Ok(())
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

/// A heatmap: `values[row][col]` (None = no value, drawn grey), labelled rows and columns, and
/// a colour scale over `range` (default: from min(0, smallest) to the largest value), white at 0,
/// blue above, red below.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    /// [row][col]
    pub values: Vec<Vec<Option<f64>>>,
    /// Name of the value, beside the colour bar.
    pub value_label: String,
    pub range: Option<(f64, f64)>,
    /// What the columns are (under the column labels) and the rows (beside the row labels).
    pub x_desc: String,
    pub y_desc: String,
}

impl Grid {
    fn check(&self) -> Result<()> {
        if self.row_labels.is_empty() || self.col_labels.is_empty() {
            return Err(Error::input(format!("heatmap `{}`: nothing to plot (no rows or columns)", self.title)));
        }
        if self.values.len() != self.row_labels.len() || self.values.iter().any(|r| r.len() != self.col_labels.len()) {
            return Err(Error::input(format!("heatmap `{}`: values must be {} rows of {} columns", self.title, self.row_labels.len(), self.col_labels.len())));
        }
        Ok(())
    }

    fn finite(&self) -> impl Iterator<Item = f64> + '_ {
        self.values.iter().flatten().filter_map(|v| *v).filter(|v| v.is_finite())
    }
}

/// Draws one heatmap, with the value printed in each cell when there is room.
pub fn heatmap(path: &Path, grid: &Grid) -> Result<()> {
    heatmaps_png(path, &grid.title, std::slice::from_ref(grid), false)
}

/// Draws `panels` side by side under one `title`, each panel's title above it, with one colour
/// scale: the first panel's range, or the span of all their values.
pub fn heatmaps(path: &Path, title: &str, panels: &[Grid]) -> Result<()> {
    heatmaps_png(path, title, panels, true)
}

/// [`heatmaps`] as SVG text (tests read the labels a plot draws).
pub fn heatmaps_svg(title: &str, panels: &[Grid]) -> Result<String> {
    let layout = HeatLayout::new(title, panels, panels.len() > 1)?;
    render_svg(layout.size, |root| layout.draw(root, title, panels, Path::new("plot.svg")))
}

fn heatmaps_png(path: &Path, title: &str, panels: &[Grid], panel_titles: bool) -> Result<()> {
    let layout = HeatLayout::new(title, panels, panel_titles)?;
    render_png(path, layout.size, |root| layout.draw(root, title, panels, path))
}

/// Font size and approximate width per character of column labels.
const COL_LABEL_PX: (f64, i32) = (12.0, 7);

/// Where the parts of a heatmap figure go.
struct HeatLayout {
    size: (u32, u32),
    panel_titles: bool,
    /// Colour scale.
    lo: f64,
    hi: f64,
    cell_w: i32,
    cell_h: i32,
    label_w: i32,
    panel_w: i32,
    top: i32,
    /// x of the first panel, the width of the panels and the colour bar.
    ox: i32,
    content_w: i32,
    bar_h: i32,
    /// Column labels drawn vertically (they do not fit across a cell), and the height they take.
    vertical: bool,
    col_label_h: i32,
}

impl HeatLayout {
    fn new(title: &str, panels: &[Grid], panel_titles: bool) -> Result<HeatLayout> {
        if panels.is_empty() {
            return Err(Error::input(format!("heatmap `{title}`: nothing to plot")));
        }
        panels.iter().try_for_each(Grid::check)?;
        let (lo, hi) = panels[0].range.unwrap_or_else(|| {
            let all = || panels.iter().flat_map(Grid::finite);
            (all().fold(0.0f64, f64::min), all().fold(0.0f64, f64::max))
        });
        let n_cols = panels.iter().map(|g| g.col_labels.len()).max().unwrap_or(1);
        let n_rows = panels.iter().map(|g| g.row_labels.len()).max().unwrap_or(1);
        let cell_w: i32 = if n_cols <= 12 { 44 } else { 30 };
        let cell_h: i32 = 24;
        let longest_col = panels.iter().flat_map(|g| g.col_labels.iter()).map(|l| l.chars().count() as i32).max().unwrap_or(0);
        let vertical = longest_col * COL_LABEL_PX.1 > cell_w - 4;
        let col_label_h = if vertical { longest_col * COL_LABEL_PX.1 + 8 } else { 20 };
        // Row labels, and the rotated row description left of them.
        let label_w: i32 = panels.iter().flat_map(|g| g.row_labels.iter()).map(|l| 8 * l.chars().count() as i32 + 20).max().unwrap_or(0).max(60) + 24;
        let grid_w = cell_w * n_cols as i32;
        let panel_w = label_w + grid_w + 30;
        let top: i32 = if panel_titles { 80 } else { 56 };
        let grid_h = cell_h * n_rows as i32;
        // Panels then the colour bar, centred under a wider title.
        let content_w = panel_w * panels.len() as i32 + 120;
        let w = content_w.max(11 * title.chars().count() as i32 + 40);
        let ox = (w - content_w) / 2;
        let bar_h = grid_h.max(120);
        let h = top + bar_h.max(grid_h + col_label_h + 28) + 16;
        Ok(HeatLayout { size: (w as u32, h as u32), panel_titles, lo, hi, cell_w, cell_h, label_w, panel_w, top, ox, content_w, bar_h, vertical, col_label_h })
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, plotters::coord::Shift>, title: &str, panels: &[Grid], path: &Path) -> Result<()> {
        use plotters::style::text_anchor::{HPos, Pos, VPos};
        let HeatLayout { lo, hi, cell_w, cell_h, label_w, panel_w, top, ox, content_w, bar_h, .. } = *self;
        let w = self.size.0;
        let show_values = cell_w >= 40;
        root.fill(&WHITE).map_err(plot_err(path))?;
        let err = plot_err(path);
        let text = |size: f64, hp: HPos| ("sans-serif", size).into_font().color(&BLACK).pos(Pos::new(hp, VPos::Center));
        root.draw(&Text::new(title.to_string(), (w as i32 / 2, 22), ("sans-serif", 22).into_font().style(FontStyle::Bold).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center)))).map_err(&err)?;
        for (pi, g) in panels.iter().enumerate() {
            let x0 = ox + pi as i32 * panel_w + label_w;
            let gw = cell_w * g.col_labels.len() as i32;
            let gh = cell_h * g.row_labels.len() as i32;
            if self.panel_titles {
                root.draw(&Text::new(g.title.clone(), (x0 + gw / 2, top - 22), text(17.0, HPos::Center))).map_err(&err)?;
            }
            for (ri, (label, row)) in g.row_labels.iter().zip(&g.values).enumerate() {
                let y = top + ri as i32 * cell_h;
                root.draw(&Text::new(label.clone(), (x0 - 8, y + cell_h / 2), text(13.0, HPos::Right))).map_err(&err)?;
                for (ci, v) in row.iter().enumerate() {
                    let x = x0 + ci as i32 * cell_w;
                    let v = v.unwrap_or(f64::NAN);
                    let color = heat_color(v, lo, hi);
                    root.draw(&Rectangle::new([(x, y), (x + cell_w, y + cell_h)], color.filled())).map_err(&err)?;
                    if show_values && v.is_finite() {
                        let dark = (color.0 as u32 + color.1 as u32 + color.2 as u32) < 380;
                        let style = ("sans-serif", 11.0).into_font().color(if dark { &WHITE } else { &BLACK }).pos(Pos::new(HPos::Center, VPos::Center));
                        root.draw(&Text::new(format!("{v:.2}"), (x + cell_w / 2, y + cell_h / 2), style)).map_err(&err)?;
                    }
                }
            }
            root.draw(&Rectangle::new([(x0, top), (x0 + gw, top + gh)], BLACK.mix(0.5))).map_err(&err)?;
            let every = g.col_labels.len().div_ceil(16).max(1);
            for (ci, c) in g.col_labels.iter().enumerate().filter(|(i, _)| i % every == 0) {
                let x = x0 + ci as i32 * cell_w + cell_w / 2;
                if self.vertical {
                    let style = ("sans-serif", COL_LABEL_PX.0).into_font().transform(FontTransform::Rotate90).color(&BLACK).pos(Pos::new(HPos::Left, VPos::Center));
                    root.draw(&Text::new(c.clone(), (x, top + gh + 6), style)).map_err(&err)?;
                } else {
                    root.draw(&Text::new(c.clone(), (x, top + gh + 12), text(COL_LABEL_PX.0, HPos::Center))).map_err(&err)?;
                }
            }
            // Axis descriptions: under the column labels, and rotated left of the row labels.
            root.draw(&Text::new(g.x_desc.clone(), (x0 + gw / 2, top + gh + self.col_label_h + 12), text(14.0, HPos::Center))).map_err(&err)?;
            let y_style = ("sans-serif", 14.0).into_font().transform(FontTransform::Rotate270).color(&BLACK).pos(Pos::new(HPos::Center, VPos::Center));
            root.draw(&Text::new(g.y_desc.clone(), (x0 - label_w + 10, top + gh / 2), y_style)).map_err(&err)?;
        }
        // Colour bar from lo to hi.
        let bx = ox + content_w - 90;
        let steps = 60;
        for s in 0..steps {
            let v = hi - (hi - lo) * s as f64 / steps as f64;
            let y0 = top + (s as f64 / steps as f64 * bar_h as f64) as i32;
            let y1 = top + ((s + 1) as f64 / steps as f64 * bar_h as f64) as i32 + 1;
            root.draw(&Rectangle::new([(bx, y0), (bx + 16, y1)], heat_color(v, lo, hi).filled())).map_err(&err)?;
        }
        root.draw(&Rectangle::new([(bx, top), (bx + 16, top + bar_h)], BLACK.mix(0.5))).map_err(&err)?;
        root.draw(&Text::new(format!("{hi:.2}"), (bx + 20, top + 6), text(12.0, HPos::Left))).map_err(&err)?;
        root.draw(&Text::new(format!("{lo:.2}"), (bx + 20, top + bar_h - 6), text(12.0, HPos::Left))).map_err(&err)?;
        root.draw(&Text::new(panels[0].value_label.clone(), (bx + 8, top - 14), text(14.0, HPos::Center))).map_err(&err)?;
        Ok(())
    }
}
