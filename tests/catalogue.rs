//! Pins the site catalogue: the ordered `Site::all` of the llama fixture with per-token shapes is
//! compared with the committed tests/catalogue.golden.txt. A change to names, order or shapes
//! breaks every downstream reader of capture files, so it must be deliberate:
//!
//!     PATCHBAY_BLESS=1 cargo test --test catalogue   # rewrites the golden (and fails once)
//!
//! Also: every name round-trips through `Site::parse`, short names cover every layer.

mod common;

use std::path::PathBuf;

use common::*;
use patchbay::model::config::ModelConfig;
use patchbay::sites::{Site, SiteKind};

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join("catalogue.golden.txt")
}

fn config(family: &str) -> ModelConfig {
    ModelConfig::load(&fixture(family)).unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// Per-token shape as text; a dimension that follows the key count is written `n_keys`.
fn shape_text(site: Site, cfg: &ModelConfig) -> String {
    let (a, b) = (site.kind.token_shape(cfg, 7), site.kind.token_shape(cfg, 11));
    assert_eq!(a.len(), b.len(), "{site}: rank depends on n_keys");
    let dims: Vec<String> = a.iter().zip(&b).map(|(x, y)| if x == y { x.to_string() } else { "n_keys".to_string() }).collect();
    format!("[{}]", dims.join(", "))
}

/// The catalogue as committed: comment header, then `name shape` per line.
fn render(cfg: &ModelConfig) -> String {
    let mut s = String::from(
        "# Site::all for tests/fixtures/llama (2 layers, d_model 64, 4 heads, 2 kv heads, d_head 16, d_mlp 96):\n\
         # TransformerLens name and per-token shape, in forward order.\n\
         # Regenerate: PATCHBAY_BLESS=1 cargo test --test catalogue\n",
    );
    for site in Site::all(cfg) {
        s.push_str(&format!("{site} {}\n", shape_text(site, cfg)));
    }
    s
}

#[test]
fn catalogue_matches_golden() {
    let cfg = config("llama");
    let got = render(&cfg);
    let path = golden_path();
    if std::env::var("PATCHBAY_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &got).unwrap();
        panic!("PATCHBAY_BLESS=1: regenerated {}; review the diff and rerun without PATCHBAY_BLESS", path.display());
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; create it with PATCHBAY_BLESS=1 cargo test --test catalogue", path.display()));
    if got != want {
        let diff: Vec<String> = got
            .lines()
            .map(Some)
            .chain(std::iter::repeat(None))
            .zip(want.lines().map(Some).chain(std::iter::repeat(None)))
            .take_while(|(g, w)| g.is_some() || w.is_some())
            .enumerate()
            .filter(|(_, (g, w))| g != w)
            .take(10)
            .map(|(i, (g, w))| format!("line {}: got {:?}, golden {:?}", i + 1, g.unwrap_or("<none>"), w.unwrap_or("<none>")))
            .collect();
        panic!(
            "the site catalogue changed ({}):\n{}\nIf intended: PATCHBAY_BLESS=1 cargo test --test catalogue",
            path.display(),
            diff.join("\n")
        );
    }
}

#[test]
fn catalogue_structure() {
    for family in FAMILIES {
        let cfg = config(family);
        let all = Site::all(&cfg);
        let per_layer = SiteKind::ALL.len() - 1;
        assert_eq!(all.len(), cfg.n_layers * per_layer + 1, "{family}: catalogue size");
        // Layer-major, kinds in forward order within a layer, ln_final last.
        for (i, site) in all[..all.len() - 1].iter().enumerate() {
            assert_eq!(*site, Site::new(i / per_layer, SiteKind::ALL[i % per_layer]), "{family}: catalogue entry {i}");
        }
        assert_eq!(all.last().map(ToString::to_string).as_deref(), Some("ln_final.hook_normalized"));
        assert_eq!(all.last().unwrap().layer, cfg.n_layers, "{family}: ln_final sits at layer n_layers");
        // Sorted = forward order (parse_spec relies on it), and names unique.
        assert!(all.windows(2).all(|w| w[0] < w[1]), "{family}: Site ordering is not forward order");
        let mut names: Vec<String> = all.iter().map(ToString::to_string).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all.len(), "{family}: duplicate site names");
    }
}

#[test]
fn every_name_round_trips_through_parse() {
    for family in FAMILIES {
        let cfg = config(family);
        for site in Site::all(&cfg) {
            let name = site.to_string();
            let back = Site::parse(&name, &cfg).unwrap_or_else(|e| panic!("{family}: {name} does not parse: {e}"));
            assert_eq!(back, site, "{family}: {name}");
            assert!(site.check(&cfg).is_ok(), "{family}: {name} fails its own check");
            // As a one-item spec too.
            assert_eq!(Site::parse_spec(&name, &cfg).unwrap(), vec![site], "{family}: spec {name}");
        }
        // Names of layers the model lacks do not parse.
        let n = cfg.n_layers;
        assert!(Site::parse(&format!("blocks.{n}.hook_resid_pre"), &cfg).is_err(), "{family}: layer {n} parsed");
        assert!(Site::parse("blocks.0.hook_resid_pre ", &cfg).is_err(), "{family}: trailing space accepted by parse");
        assert!(Site::parse("hook_resid_pre", &cfg).is_err());
    }
}

#[test]
fn short_names_map_to_every_layer() {
    for family in FAMILIES {
        let cfg = config(family);
        let all = Site::all(&cfg);
        let mut shorts: Vec<&str> = SiteKind::ALL.iter().map(|k| k.short_name()).collect();
        shorts.sort();
        shorts.dedup();
        assert_eq!(shorts.len(), SiteKind::ALL.len(), "short names are unique");
        for kind in SiteKind::ALL {
            let short = kind.short_name();
            assert_eq!(SiteKind::from_short_name(short), Some(kind), "{short}");
            let got = Site::parse_spec(short, &cfg).unwrap_or_else(|e| panic!("{family}: {short}: {e}"));
            let want: Vec<Site> = if kind == SiteKind::FinalNorm {
                vec![Site::final_norm(&cfg)]
            } else {
                (0..cfg.n_layers).map(|l| Site::new(l, kind)).collect()
            };
            assert_eq!(got, want, "{family}: short name {short}");
            assert_eq!(got, all.iter().copied().filter(|s| s.kind == kind).collect::<Vec<_>>(), "{family}: {short}");
        }
        // All short names together, in any order, are the whole catalogue; so is `all`.
        let every: Vec<&str> = SiteKind::ALL.iter().rev().map(|k| k.short_name()).collect();
        assert_eq!(Site::parse_spec(&every.join(","), &cfg).unwrap(), all, "{family}");
        assert_eq!(Site::parse_spec("all", &cfg).unwrap(), all, "{family}");
    }
}
