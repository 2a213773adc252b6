//! The two forwards read the same `ModelConfig` fields (DESIGN.md section 4; the why is in the
//! top comment of src/engine/mod.rs). A family quirk is a `ModelConfig` field; one forward that
//! reads it while the other ignores it computes another model. This test reads the sources:
//!
//! * the fields are parsed from `pub struct ModelConfig` in src/model/config.rs, and the fields
//!   each `impl ModelConfig` method reads (so `cfg.rope_freqs(..)` counts as reading
//!   rotary_dim, rope_theta and rope_scaling);
//! * the CPU side is src/engine/forward.rs, src/backend/cpu.rs (while it exists) and every
//!   `fn *_ref` in src/backend/ops/*.rs (the CPU references); the device side is
//!   src/engine/device_forward.rs and the rest of src/backend/ops/*.rs (launchers). Today every
//!   read is in the two engine files (the backend takes plain numbers); the sets follow the code
//!   if a launcher or a reference ever takes the config;
//! * a read is `cfg.<field>` / `config().<field>` (any receiver ending in `cfg`, e.g.
//!   `self.cfg.`, `model.cfg.`), or a call of a method that reads the field; comments are
//!   stripped first.
//!
//! Every field must be read by both sides, or be in one of the lists below with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Fields that change no math of a forward: reporting, loading, decoding.
const NOT_FORWARD: [(&str, &str); 7] = [
    ("family", "reporting only; the forwards read the quirk fields, never the family"),
    ("model_type", "reporting only (as written in config.json)"),
    ("max_position", "the longrope switch reads the sequence length, not this; checked by callers"),
    ("declared_dtype", "the tensors' own dtypes rule"),
    ("bos_token_id", "prompt building and decoding"),
    ("eos_token_ids", "decoding (stop tokens)"),
    ("generation", "decoding defaults (generation_config.json)"),
];

/// Fields the checkpoint loader turns into optional weights (src/model/checkpoint.rs): the
/// forwards see the quirk as the presence of these `LayerWeights`/`Linear`/`ModelWeights`
/// members, which both sides must then read.
const BY_WEIGHTS: [(&str, &[&str]); 7] = [
    ("pre_norms", &["attn_norm", "mlp_norm"]),
    ("post_norms", &["attn_post_norm", "mlp_post_norm"]),
    ("qk_norm", &["q_norm", "k_norm"]),
    // Linear::b, applied by every linear of both forwards (q/k/v, o, gate/up/down).
    ("qkv_bias", &["b"]),
    ("o_bias", &["b"]),
    ("mlp_bias", &["b"]),
    ("tie_embeddings", &["lm_head"]),
];

/// Fields one side may read beyond the weights above, with the reason it changes no math.
const ONE_SIDED: [(&str, Side, &str); 1] = [(
    "tie_embeddings",
    Side::Device,
    "device_forward shares the embedding buffer instead of uploading lm_head twice; both sides multiply by weights.lm_head",
)];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Cpu,
    Device,
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The source without `//` comments (doc comments mention fields without reading them).
fn strip_comments(src: &str) -> String {
    src.lines().map(|l| l.find("//").map_or(l, |i| &l[..i])).collect::<Vec<_>>().join("\n")
}

/// The byte range inside the `{` at or after `from` and its matching `}`.
fn braced(src: &str, from: usize) -> std::ops::Range<usize> {
    let open = from + src[from..].find('{').expect("a block");
    let mut depth = 0usize;
    for (i, c) in src[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + 1..open + i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced braces after byte {from}")
}

/// Identifiers that follow `word` as `word.<ident>` (word boundary before `word`).
fn members_after<'a>(src: &'a str, word: &str) -> BTreeSet<&'a str> {
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(i) = src[at..].find(word) {
        let start = at + i;
        at = start + word.len();
        let before_ok = src[..start].chars().next_back().is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let rest = src[at..].trim_start();
        let Some(rest) = rest.strip_prefix('.') else { continue };
        let rest = rest.trim_start();
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
        if before_ok && end > 0 {
            out.insert(&rest[..end]);
        }
    }
    out
}

/// Every identifier that follows a `.` (field and method names).
fn members(src: &str) -> BTreeSet<&str> {
    src.match_indices('.')
        .filter_map(|(i, _)| {
            let rest = &src[i + 1..];
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
            (end > 0).then(|| &rest[..end])
        })
        .collect()
}

/// The fields of `pub struct ModelConfig` (one `pub name: Type,` per line).
fn config_fields(config_rs: &str) -> Vec<String> {
    let src = strip_comments(config_rs);
    let body = &src[braced(&src, src.find("pub struct ModelConfig").expect("pub struct ModelConfig"))];
    body.lines()
        .filter_map(|line| line.trim().strip_prefix("pub ")?.split_once(':').map(|(name, _)| name.trim().to_string()))
        .collect()
}

/// For each method of `impl ModelConfig`, the fields its body reads (`self.x`, or `cfg.x`
/// after `let cfg = self`).
fn config_methods(config_rs: &str, fields: &[String]) -> BTreeMap<String, BTreeSet<String>> {
    let src = strip_comments(config_rs);
    let body = &src[braced(&src, src.find("impl ModelConfig").expect("impl ModelConfig"))];
    let mut out = BTreeMap::new();
    let mut at = 0;
    while let Some(i) = body[at..].find("fn ") {
        let start = at + i + 3;
        let name: String = body[start..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let range = braced(body, start);
        let fn_body = &body[range.clone()];
        let used = members_after(fn_body, "self").into_iter().chain(members_after(fn_body, "cfg"));
        let reads: BTreeSet<String> = used.filter(|m| fields.iter().any(|f| f == m)).map(str::to_string).collect();
        at = range.end + 1;
        out.insert(name, reads);
    }
    out
}

/// The `ModelConfig` fields `src` reads (see the module comment).
fn reads(src: &str, fields: &[String], methods: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
    let src = strip_comments(src);
    // `cfg.x`, `self.cfg.x`, `model.cfg.x`, `c.config().x`
    let mut used: BTreeSet<&str> = members_after(&src, "cfg");
    used.extend(members_after(&src, "config()"));
    let mut out = BTreeSet::new();
    for m in used {
        if fields.iter().any(|f| f == m) {
            out.insert(m.to_string());
        }
        if let Some(via) = methods.get(m) {
            out.extend(via.iter().cloned());
        }
    }
    out
}

/// (CPU side, device side) sources, split as the module comment says.
fn forward_sources(root: &Path) -> (String, String) {
    let mut cpu = read(&root.join("src/engine/forward.rs"));
    let mut device = read(&root.join("src/engine/device_forward.rs"));
    let cpu_rs = root.join("src/backend/cpu.rs");
    if cpu_rs.exists() {
        cpu.push_str(&read(&cpu_rs));
    }
    let mut ops: Vec<_> = std::fs::read_dir(root.join("src/backend/ops"))
        .expect("src/backend/ops")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    ops.sort();
    for path in ops {
        let (refs, rest) = split_refs(&strip_comments(&read(&path)));
        cpu.push_str(&refs);
        device.push_str(&rest);
    }
    (cpu, device)
}

/// (`fn *_ref` bodies, everything else) of a source file.
fn split_refs(src: &str) -> (String, String) {
    let (mut refs, mut rest) = (String::new(), String::new());
    let mut at = 0;
    while let Some(i) = src[at..].find("fn ") {
        let start = at + i;
        let name: String = src[start + 3..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        if !name.ends_with("_ref") {
            rest.push_str(&src[at..start + 3]);
            at = start + 3;
            continue;
        }
        rest.push_str(&src[at..start]);
        let end = braced(src, start).end + 1;
        refs.push_str(&src[start..end]);
        refs.push('\n');
        at = end;
    }
    rest.push_str(&src[at..]);
    (refs, rest)
}

/// Everything wrong with the reads of the two sides, one line each.
fn mismatches(config_rs: &str, cpu: &str, device: &str) -> Vec<String> {
    let fields = config_fields(config_rs);
    let methods = config_methods(config_rs, &fields);
    let (cpu_reads, dev_reads) = (reads(cpu, &fields, &methods), reads(device, &fields, &methods));
    let (cpu_src, dev_src) = (strip_comments(cpu), strip_comments(device));
    let (cpu_members, dev_members) = (members(&cpu_src), members(&dev_src));
    let mut out = Vec::new();
    for f in &fields {
        let (c, d) = (cpu_reads.contains(f), dev_reads.contains(f));
        let not_forward = NOT_FORWARD.iter().any(|(n, _)| n == f);
        let by_weights = BY_WEIGHTS.iter().find(|(n, _)| n == f);
        let one_sided = ONE_SIDED.iter().find(|(n, _, _)| n == f).map(|(_, side, _)| *side);
        if not_forward || by_weights.is_some() {
            // Listed as not read by the forwards: a read on one side only is the bug this test
            // is for; a read on both means the entry is stale.
            let allowed = |side: Side| one_sided == Some(side);
            if (c && !allowed(Side::Cpu)) || (d && !allowed(Side::Device)) {
                out.push(format!("`{f}` is listed as not read by the forwards, but the {} reads it", side_names(c, d)));
            }
        } else if c != d {
            out.push(format!("`{f}` is read by the {} only", side_names(c, d)));
        }
        if let Some((_, members)) = by_weights {
            for m in *members {
                for (side, members) in [("CPU forward", &cpu_members), ("device forward", &dev_members)] {
                    if !members.contains(m) {
                        out.push(format!("`{f}` becomes the weight `{m}`, which the {side} never reads"));
                    }
                }
            }
        }
    }
    out
}

/// Entries of the lists above that name no field of ModelConfig (a renamed or removed field).
fn stale_entries(fields: &[String]) -> Vec<&'static str> {
    let listed = NOT_FORWARD.iter().map(|(n, _)| *n).chain(BY_WEIGHTS.iter().map(|(n, _)| *n));
    listed.chain(ONE_SIDED.iter().map(|(n, _, _)| *n)).filter(|n| !fields.iter().any(|f| f == n)).collect()
}

fn side_names(cpu: bool, device: bool) -> &'static str {
    match (cpu, device) {
        (true, true) => "CPU forward and the device forward",
        (true, false) => "CPU forward",
        _ => "device forward",
    }
}

#[test]
fn both_forwards_read_the_same_config_fields() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config_rs = read(&root.join("src/model/config.rs"));
    let fields = config_fields(&config_rs);
    assert!(fields.len() > 20 && fields.iter().any(|f| f == "attn_softcap"), "parsed fields: {fields:?}");
    assert_eq!(stale_entries(&fields), Vec::<&str>::new(), "listed in tests/forward_parity.rs but no field of ModelConfig");
    let (cpu, device) = forward_sources(root);
    let bad = mismatches(&config_rs, &cpu, &device);
    assert!(bad.is_empty(), "ModelConfig fields read by one forward only:\n{}", bad.join("\n"));
}

/// The check fails on a planted example: a quirk read by one side only, directly or through a
/// method; a listed field read on one side; a listed weight one side ignores.
#[test]
fn a_field_read_by_one_forward_only_is_caught() {
    let config_rs = "
        pub struct ModelConfig {
            /// d
            pub d_model: usize,
            pub attn_softcap: Option<f32>,
            pub rope_theta: f32,
            pub qk_norm: bool,
            pub family: Family,
        }
        impl ModelConfig {
            pub fn rope_freqs(&self, len: usize) -> Vec<f32> { let cfg = self; vec![cfg.rope_theta; len] }
        }";
    let both = "cfg.d_model; self.cfg.attn_softcap; cfg.rope_freqs(n); lw.q_norm; lw.k_norm";
    assert_eq!(mismatches(config_rs, both, both), Vec::<String>::new());
    // attn_softcap on the CPU only.
    let bad = mismatches(config_rs, both, "cfg.d_model; cfg.rope_freqs(n); lw.q_norm; lw.k_norm");
    assert_eq!(bad, vec!["`attn_softcap` is read by the CPU forward only"]);
    // rope_theta through rope_freqs on the device only; a comment is no read.
    let bad = mismatches(config_rs, "cfg.d_model; cfg.attn_softcap; lw.q_norm; lw.k_norm // cfg.rope_freqs(n)", both);
    assert_eq!(bad, vec!["`rope_theta` is read by the device forward only"]);
    // A field listed as not read, read on one side.
    let bad = mismatches(config_rs, &format!("{both}; if cfg.family == Family::Gemma2 {{}}"), both);
    assert_eq!(bad, vec!["`family` is listed as not read by the forwards, but the CPU forward reads it"]);
    // A weight-borne quirk one side ignores.
    let bad = mismatches(config_rs, both, "cfg.d_model; cfg.attn_softcap; cfg.rope_freqs(n); lw.q_norm");
    assert_eq!(bad, vec!["`qk_norm` becomes the weight `k_norm`, which the device forward never reads"]);
}

#[test]
fn reference_functions_count_for_the_cpu_side() {
    let (refs, rest) = split_refs("pub fn rmsnorm(x: &[f32]) { launch(cfg.norm_eps) }\npub fn rmsnorm_ref(x: &[f32]) { if a { cfg.d_model } }\nfn tail() {}");
    assert!(refs.contains("cfg.d_model") && !refs.contains("norm_eps"), "{refs}");
    assert!(rest.contains("cfg.norm_eps") && rest.contains("fn tail") && !rest.contains("d_model"), "{rest}");
}
