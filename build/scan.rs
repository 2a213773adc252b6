//! The hand-written C++ scanner: comments, tokens, `extern "C" __global__` entry points and the
//! emulator's `extern __shared__` rewrite. Only std: tests/build_scan.rs includes this file.

use std::fmt::Write as _;

/// The source with every byte of a comment replaced by a space (newlines kept): byte offsets
/// and line numbers stay those of the source.
pub fn strip_comments(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out[i] = b' ';
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            let end = src[i + 2..].find("*/").map(|k| i + 2 + k + 2).unwrap_or(b.len());
            for (k, o) in out.iter_mut().enumerate().take(end).skip(i) {
                if b[k] != b'\n' {
                    *o = b' ';
                }
            }
            i = end;
        } else if b[i] == b'"' || b[i] == b'\'' {
            // Skip a literal whole: a "//" inside it is no comment.
            let q = b[i];
            i += 1;
            while i < b.len() && b[i] != q && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("only whole comments were blanked")
}

#[derive(Debug, PartialEq)]
pub enum Tok<'a> {
    Ident(&'a str),
    Str(&'a str),
    Punct(char),
}

/// A tiny C++ tokenizer: identifiers, string literals, single-character punctuation; each with
/// its line number (and byte offset: see `tokenize_at`).
pub fn tokenize(code: &str) -> Vec<(Tok<'_>, usize)> {
    tokenize_at(code).into_iter().map(|(t, line, _)| (t, line)).collect()
}

pub fn tokenize_at(code: &str) -> Vec<(Tok<'_>, usize, usize)> {
    let b = code.as_bytes();
    let mut v = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            v.push((Tok::Ident(&code[s..i]), line, s));
        } else if c.is_ascii_digit() {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                i += 1;
            }
        } else if c == b'"' || c == b'\'' {
            let s = i;
            i += 1;
            while i < b.len() && b[i] != c && b[i] != b'\n' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            v.push((Tok::Str(&code[s + 1..i.saturating_sub(1).max(s + 1)]), line, s));
        } else {
            let ch = code[i..].chars().next().unwrap();
            v.push((Tok::Punct(ch), line, i));
            i += ch.len_utf8();
        }
    }
    v
}

/// For the emulator: every `extern __shared__ [attributes] T name[];` of `src` becomes
/// `T* name = ::emu::dynamic_shared<T>(__func__);`, a pointer to the block's dynamic shared
/// memory, so that all such names alias the same bytes as on a GPU. Line numbers are kept; the
/// rewritten text starts with `#line 1 "<rel>"` so that __FILE__ and diagnostics name the
/// original file. (`__func__` makes a declaration outside a function a compile error: a
/// namespace-scope pointer could not follow the running block.)
pub fn rewrite_dynamic_shared(src: &str, rel: &str) -> Result<String, String> {
    let code = strip_comments(src);
    let t = tokenize_at(&code);
    let mut out = format!("#line 1 {rel:?}\n");
    let mut copied = 0;
    let mut i = 0;
    while i + 1 < t.len() {
        if !(t[i].0 == Tok::Ident("extern") && t[i + 1].0 == Tok::Ident("__shared__")) {
            i += 1;
            continue;
        }
        let (line, start) = (t[i].1, t[i].2);
        let bad = |what: &str| format!("{rel}:{line}: {what}: write `extern __shared__ T name[];`, one name per declaration");
        // Declaration tokens up to ';', without attribute groups.
        let mut j = i + 2;
        let mut decl: Vec<usize> = Vec::new();
        while j < t.len() && t[j].0 != Tok::Punct(';') {
            if matches!(t[j].0, Tok::Ident("__align__" | "alignas" | "__attribute__")) {
                j = skip_parens(&t, j + 1);
                continue;
            }
            decl.push(j);
            j += 1;
        }
        if j >= t.len() {
            return Err(bad("unterminated extern __shared__ declaration"));
        }
        // ... type name [ ]
        let n = decl.len();
        if n < 4 || t[decl[n - 2]].0 != Tok::Punct('[') || t[decl[n - 1]].0 != Tok::Punct(']') {
            return Err(bad("unexpected extern __shared__ declaration"));
        }
        let Tok::Ident(name) = t[decl[n - 3]].0 else { return Err(bad("no name in extern __shared__ declaration")) };
        if decl[..n - 3].iter().any(|&k| t[k].0 == Tok::Punct(',')) {
            return Err(bad("several names in one extern __shared__ declaration"));
        }
        let ty = code[t[decl[0]].2..t[decl[n - 3]].2].trim().to_string();
        let end = t[j].2 + 1;
        let newlines = code[start..end].matches('\n').count();
        out.push_str(&src[copied..start]);
        write!(out, "{ty}* {name} = ::emu::dynamic_shared<{ty}>(__func__);{}", "\n".repeat(newlines)).unwrap();
        copied = end;
        i = j + 1;
    }
    out.push_str(&src[copied..]);
    Ok(out)
}

/// A token list entry: the token plus whatever position data its scanner keeps.
pub trait TokAt<'a> {
    fn tok(&self) -> &Tok<'a>;
}
impl<'a> TokAt<'a> for (Tok<'a>, usize) {
    fn tok(&self) -> &Tok<'a> {
        &self.0
    }
}
impl<'a, T> TokAt<'a> for (Tok<'a>, usize, T) {
    fn tok(&self) -> &Tok<'a> {
        &self.0
    }
}

/// Index just past the balanced parenthesis group starting at `j` (or `j` if none starts there).
pub fn skip_parens<'a, E: TokAt<'a>>(t: &[E], mut j: usize) -> usize {
    if !t.get(j).is_some_and(|x| *x.tok() == Tok::Punct('(')) {
        return j;
    }
    let mut depth = 0;
    while j < t.len() {
        match t[j].tok() {
            Tok::Punct('(') => depth += 1,
            Tok::Punct(')') => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// Names of the `extern "C" __global__ void NAME(...)` entry points, in source order.
/// `__launch_bounds__(...)` may stand anywhere before the name.
pub fn scan_entries(code: &str) -> Result<Vec<String>, String> {
    let t = tokenize(code);
    let mut names = Vec::new();
    let mut i = 0;
    while i + 1 < t.len() {
        if !(t[i].0 == Tok::Ident("extern") && t[i + 1].0 == Tok::Str("C")) {
            i += 1;
            continue;
        }
        let line = t[i].1;
        let mut j = i + 2;
        if t.get(j).is_some_and(|x| x.0 == Tok::Punct('{')) {
            // extern "C" { ... }: only an error if it holds a kernel.
            let mut depth = 0;
            let mut k = j;
            while k < t.len() {
                match t[k].0 {
                    Tok::Punct('{') => depth += 1,
                    Tok::Punct('}') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Tok::Ident("__global__") => {
                        return Err(format!(
                            "line {}: a kernel inside an `extern \"C\" {{ }}` block: write each entry point as \
                             `extern \"C\" __global__ void NAME(...)`",
                            t[k].1
                        ));
                    }
                    _ => {}
                }
                k += 1;
            }
            i = k;
            continue;
        }
        // Tokens up to the parameter list's '(' (skipping the parentheses of attributes).
        let mut is_global = false;
        let mut name = None;
        while j < t.len() {
            match &t[j].0 {
                Tok::Ident("__launch_bounds__" | "__maxnreg__" | "__align__" | "alignas" | "__attribute__" | "__cluster_dims__") => {
                    j = skip_parens(&t, j + 1);
                    continue;
                }
                Tok::Ident("__global__") => is_global = true,
                Tok::Ident(id) => name = Some(*id),
                Tok::Punct('(') => break,
                Tok::Punct(';') | Tok::Punct('{') | Tok::Punct('=') => {
                    name = None;
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        if is_global {
            match name {
                Some(n) => names.push(n.to_string()),
                None => return Err(format!("line {line}: cannot read the name of this `extern \"C\" __global__` entry point")),
            }
        }
        i = j;
    }
    Ok(names)
}
