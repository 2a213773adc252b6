//! The layering of the library: every `crate::` path in src/ (use statements, grouped
//! `use crate::{a, b::c}`, inline paths) names a module at the same layer or below, in the order
//! written in the crate doc of src/lib.rs (read from there, so the doc and this test cannot
//! drift). src/main.rs and src/cli/ are the binary: the top layer, reaching the library through
//! `patchbay::`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The layers, top first: the first word of each line of the ```text block under "# Layers" in
/// the crate doc.
fn layer_order(lib_rs: &str) -> Vec<String> {
    let doc: Vec<&str> = lib_rs.lines().filter_map(|l| l.strip_prefix("//!")).map(str::trim).collect();
    let heading = doc.iter().position(|l| *l == "# Layers").expect("src/lib.rs: no `# Layers` section in the crate doc");
    let open = heading + doc[heading..].iter().position(|l| *l == "```text").expect("src/lib.rs: no ```text block under # Layers");
    let close = open + 1 + doc[open + 1..].iter().position(|l| *l == "```").expect("src/lib.rs: the ```text block is not closed");
    doc[open + 1..close].iter().filter_map(|l| l.split_whitespace().next()).map(String::from).collect()
}

/// Root re-exports (`pub use error::{Error, Result};`): name -> the module it comes from.
fn root_reexports(lib_rs: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for line in lib_rs.lines().filter_map(|l| l.trim().strip_prefix("pub use ")) {
        let line = line.trim_end_matches(';');
        if let Some((module, names)) = line.split_once("::") {
            for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
                out.insert(name.trim().to_string(), module.trim().to_string());
            }
        }
    }
    out
}

/// `src` with comments, string literals and char literals blanked (newlines kept, so line
/// numbers stay right).
fn code_only(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r' && (next == Some('"') || next == Some('#')) && (i == 0 || !is_ident(c[i - 1]) || c[i - 1] == 'b' && (i == 1 || !is_ident(c[i - 2]))) {
            // Raw string r"..." or r#"..."# (or br"...").
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            let hashes = j - i - 1;
            j += 1;
            while j < c.len() && !(c[j] == '"' && (0..hashes).all(|h| c.get(j + 1 + h) == Some(&'#'))) {
                j += 1;
            }
            let end = (j + 1 + hashes).min(c.len());
            c[i..end].iter().for_each(|&ch| blank(&mut out, ch));
            i = end;
        } else if c[i] == '"' || c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A string or a char literal ('x', '\n', '\''; not a lifetime).
            let quote = c[i];
            let mut j = i + 1;
            while j < c.len() && c[j] != quote {
                j += if c[j] == '\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(c.len());
            c[i..end].iter().for_each(|&ch| blank(&mut out, ch));
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// Every `crate::` path in `code` (comments and literals already blanked): (line, the first
/// segment after `crate::`, the path as written up to its end). A group `crate::{a, b::c}`
/// gives one entry per member.
fn crate_paths(code: &str) -> Vec<(usize, String, String)> {
    let c: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(off) = c[i..].windows(5).position(|w| w.iter().collect::<String>() == "crate") {
        let at = i + off;
        i = at + 5;
        if at > 0 && (is_ident(c[at - 1]) || c[at - 1] == '$') || c.get(i).is_some_and(|&ch| is_ident(ch)) {
            continue;
        }
        let mut j = i;
        while c.get(j).is_some_and(|ch| ch.is_whitespace()) {
            j += 1;
        }
        if c.get(j) != Some(&':') || c.get(j + 1) != Some(&':') {
            continue;
        }
        j += 2;
        while c.get(j).is_some_and(|ch| ch.is_whitespace()) {
            j += 1;
        }
        let line = c[..at].iter().filter(|&&ch| ch == '\n').count() + 1;
        let ident = |from: usize| -> String { c[from..].iter().take_while(|&&ch| is_ident(ch)).collect() };
        if c.get(j) == Some(&'{') {
            // A group: split its members at depth 1.
            let (mut depth, mut k, mut start) = (0, j, j + 1);
            while k < c.len() {
                match c[k] {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        let member: String = c[start..k].iter().collect();
                        let member = member.trim();
                        if !member.is_empty() {
                            out.push((line, ident(start + c[start..k].iter().take_while(|ch| ch.is_whitespace()).count()), format!("crate::{member}")));
                        }
                        start = k + 1;
                        if c[k] == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
                k += 1;
            }
        } else {
            let path: String = c[j..].iter().take_while(|&&ch| is_ident(ch) || ch == ':').collect();
            out.push((line, ident(j), format!("crate::{path}")));
        }
    }
    out
}

/// The layer of a library file (`src/<layer>.rs` or `src/<layer>/...`), None for the crate
/// root (src/lib.rs).
fn layer_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib") => None,
        Some(stem) => Some(stem.to_string()),
        None => Some(first),
    }
}

/// Every upward or unplaced import in `files` ((path relative to src/, text)) under the crate
/// doc `lib_rs`, one line each: `src/PATH:LINE: FROM -> TO (PATH)`.
fn violations(lib_rs: &str, files: &[(PathBuf, String)]) -> Vec<String> {
    let order = layer_order(lib_rs);
    let rank = |m: &str| order.iter().position(|l| l == m);
    let reexports = root_reexports(lib_rs);
    let mut out = Vec::new();
    let declared: Vec<&str> = lib_rs.lines().filter_map(|l| l.trim().strip_prefix("pub mod ")).map(|m| m.trim_end_matches(';')).collect();
    for m in &declared {
        if rank(m).is_none() {
            out.push(format!("src/lib.rs: module `{m}` is not in the layer order"));
        }
    }
    for (rel, text) in files {
        let Some(from) = layer_of(rel) else { continue };
        let Some(from_rank) = rank(&from) else {
            out.push(format!("src/{}: layer `{from}` is not in the layer order", rel.display()));
            continue;
        };
        for (line, first, path) in crate_paths(&code_only(text)) {
            let to = reexports.get(&first).cloned().unwrap_or(first);
            match rank(&to) {
                None => out.push(format!("src/{}:{line}: {from} -> unknown module `{to}` ({path})", rel.display())),
                Some(r) if r < from_rank => out.push(format!("src/{}:{line}: {from} -> {to} ({path})", rel.display())),
                Some(_) => {}
            }
        }
    }
    out
}

/// The library's source files (relative to src/), without the binary (main.rs, cli/).
fn library_files(src: &Path) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut paths = Vec::new();
    walk(src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| (p.strip_prefix(src).unwrap().to_path_buf(), std::fs::read_to_string(&p).unwrap()))
        .filter(|(rel, _)| rel != Path::new("main.rs") && !rel.starts_with("cli"))
        .collect()
}

#[test]
fn no_module_imports_one_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let order = layer_order(&lib_rs);
    assert_eq!(order.first().map(String::as_str), Some("cli"), "the binary is the top layer");
    let files = library_files(&src);
    assert!(files.len() > 20, "found only {} library files", files.len());
    let bad = violations(&lib_rs, &files);
    assert!(bad.is_empty(), "imports against the layer order of src/lib.rs ({}):\n{}", order.join(" > "), bad.join("\n"));
}

/// The checker itself, on a small crate with planted violations.
#[test]
fn the_checker_finds_planted_upward_imports() {
    let lib_rs = "//! # Layers\n//!\n//! ```text\n//! cli    the binary\n//! top    a pipeline\n//! mid    numerics\n//! error  errors\n//! ```\n\npub mod error;\npub mod mid;\npub mod top;\n\npub use error::{Error, Result};\n";
    let file = |p: &str, t: &str| (PathBuf::from(p), t.to_string());
    let files = [
        file("top.rs", "use crate::mid::f;\nuse crate::{Error, Result};\n"),
        // Upward: a use statement, a group member over two lines, an inline path.
        file("mid/a.rs", "use crate::top::Pipeline;\nuse crate::{\n    error::Error,\n    top::{run, Row},\n};\nfn g() { crate::top::run(); }\n"),
        // Not imports: comments, doc links, strings, raw strings, char literals, macros' $crate.
        file("mid/b.rs", "// crate::top\n/// [`crate::top::run`]\n/* crate::top /* nested */ */\nfn h() -> &'static str { let _c = '\"'; let _ = r#\"crate::top\"#; \"crate::top::x\" }\nmacro_rules! m { () => { $crate::top::run() } }\nuse crate::Result;\n"),
        file("error.rs", "use crate::mid::x;\n"),
        file("lib.rs", "use crate::top::y;\n"),
    ];
    let bad = violations(lib_rs, &files);
    assert_eq!(
        bad,
        [
            "src/mid/a.rs:1: mid -> top (crate::top::Pipeline)",
            "src/mid/a.rs:2: mid -> top (crate::top::{run, Row})",
            "src/mid/a.rs:6: mid -> top (crate::top::run)",
            "src/error.rs:1: error -> mid (crate::mid::x)",
        ]
    );
    // A module missing from the order and an unknown path are reported too.
    let unplaced = violations(&lib_rs.replace("pub mod top;", "pub mod top;\npub mod extra;"), &[file("extra.rs", "use crate::nowhere::z;\n")]);
    assert_eq!(unplaced, ["src/lib.rs: module `extra` is not in the layer order", "src/extra.rs: layer `extra` is not in the layer order"]);
    let unknown = violations(lib_rs, &[file("mid.rs", "use crate::nowhere::z;\n")]);
    assert_eq!(unknown, ["src/mid.rs:1: mid -> unknown module `nowhere` (crate::nowhere::z)"]);
}
