//! Every plot says what its axes are: each kind of plot is rendered (as SVG, through the same
//! drawing code as the PNGs) and the labels a reader needs are found in its text.

use patchbay::experiments::probe::ResultRow;
use patchbay::experiments::probe::plots::{accuracy_chart, r2_panels};
use patchbay::experiments::score::confusion_grid;
use patchbay::io::plot::{heatmaps_svg, line_panels_svg, series_color};

fn row(site: &str, layer: usize, metric: &str, value: f64) -> ResultRow {
    ResultRow { site: site.into(), layer, position: -1, metric: metric.into(), value, ci_low: value - 0.1, ci_high: value + 0.1, n: 40 }
}

/// The texts an SVG draws, one per `<text>` element.
fn texts(svg: &str) -> Vec<String> {
    svg.split("<text").skip(1).filter_map(|t| Some(t.split_once('>')?.1.split_once("</text>")?.0.trim().to_string())).collect()
}

/// Each of `wants` is one whole text of the plot (a label, an axis description, a title).
#[track_caller]
fn assert_has(svg: &str, what: &str, wants: &[&str]) {
    let texts = texts(svg);
    for w in wants {
        assert!(texts.iter().any(|t| t == w), "{what} lacks the text `{w}`: {texts:?}");
    }
}

#[test]
fn confusion_matrix_has_full_names_and_both_axes() {
    let names: Vec<String> = ["sadness", "surprise", "shame", "joy"].map(String::from).to_vec();
    let confusion = vec![vec![3, 1, 0, 0], vec![0, 2, 2, 0], vec![1, 1, 1, 1], vec![0, 0, 0, 4]];
    let g = confusion_grid(&names, &confusion);
    assert_eq!(g.values[1][2], Some(0.5));
    let svg = heatmaps_svg(&g.title, std::slice::from_ref(&g)).unwrap();
    // Full names across (three letters would make sadness, surprise and shame one `sad`/`sur`/`sha`
    // guess) and down, and what each axis is.
    assert_has(&svg, "the confusion matrix", &["sadness", "surprise", "shame", "predicted label", "gold label", "fraction"]);
    assert_eq!(texts(&svg).iter().filter(|t| *t == "surprise").count(), 2, "surprise once as a row and once as a column");
}

#[test]
fn probe_plots_label_their_axes() {
    let rows = vec![
        row("resid_post", 0, "accuracy", 0.3),
        row("resid_post", 1, "accuracy", 0.6),
        row("attn_out", 0, "accuracy", 0.2),
        row("attn_out", 1, "accuracy", 0.4),
        row("resid_post", 0, "r2:pleasantness", 0.1),
        row("resid_post", 1, "r2:pleasantness", 0.4),
        row("resid_post", 0, "r2:suddenness", -0.2),
        row("resid_post", 1, "r2:suddenness", 0.05),
    ];
    let chart = accuracy_chart(&rows, Some(0.25), "Emotion probe accuracy by layer").unwrap();
    let svg = line_panels_svg(&chart).unwrap();
    assert_has(&svg, "the accuracy plot", &["Emotion probe accuracy by layer", "probe accuracy", "layer", "resid_post", "attn_out", "majority class (0.25)", "position -1"]);
    let panels = r2_panels(&rows, -1).unwrap();
    let svg = heatmaps_svg("Ridge probe R² by layer", &panels).unwrap();
    assert_has(&svg, "the R² heatmap", &["Ridge probe R² by layer", "layer", "appraisal (ridge probe target)", "pleasantness", "suddenness", "R²"]);
}

/// A chart of the 13 emotions (steer's shares.png) gives each line its own colour, clearly apart
/// (a palette that wrapped at 8 drew anger and relief in one blue); later series stay distinct.
#[test]
fn series_colours_are_distinct() {
    let colours: Vec<(u8, u8, u8)> = (0..40).map(|i| { let c = series_color(i); (c.0, c.1, c.2) }).collect();
    let dist = |a: (u8, u8, u8), b: (u8, u8, u8)| {
        let d = |x: u8, y: u8| (x as f64 - y as f64).powi(2);
        (d(a.0, b.0) + d(a.1, b.1) + d(a.2, b.2)).sqrt()
    };
    for i in 0..colours.len() {
        for j in 0..i {
            let min = if i < 16 { 60.0 } else { 1.0 };
            assert!(dist(colours[i], colours[j]) >= min, "series {j} and {i}: {:?} and {:?}", colours[j], colours[i]);
        }
    }
}
