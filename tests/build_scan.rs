//! Unit tests of the build script's hand-written C++ scanner (build/scan.rs): comment
//! stripping, the tokenizer, entry-point scanning and the emulator's `extern __shared__` rewrite;
//! of the C struct layout it derives for the shared-struct checks (build/layout.rs); and of what
//! it watches for the CUDA root (build/watch.rs).

#[allow(dead_code)]
#[path = "../build/scan.rs"]
mod scan;

#[allow(dead_code)]
#[path = "../build/layout.rs"]
mod layout;

#[path = "../build/watch.rs"]
mod watch;

use layout::{Layout, site_codes, struct_layout};
use scan::{Tok, rewrite_dynamic_shared, scan_entries, strip_comments, tokenize};

#[test]
fn strip_comments_blanks_comments_and_keeps_offsets() {
    let src = "int a; // one\n/* two\nthree */ int b;\n";
    let out = strip_comments(src);
    assert_eq!(out.len(), src.len());
    assert_eq!(out, "int a;       \n      \n         int b;\n");
}

#[test]
fn strip_comments_leaves_literals_alone() {
    let src = "const char* s = \"http://x\"; char c = '/'; // gone\n";
    assert_eq!(strip_comments(src), "const char* s = \"http://x\"; char c = '/';        \n");
}

#[test]
fn tokenize_reads_identifiers_strings_and_punctuation_with_lines() {
    let t = tokenize("extern \"C\"\n__global__ void k(int n2) { x = 1.5f; }");
    let toks: Vec<&Tok> = t.iter().map(|(t, _)| t).collect();
    assert_eq!(toks[..4], [&Tok::Ident("extern"), &Tok::Str("C"), &Tok::Ident("__global__"), &Tok::Ident("void")]);
    assert_eq!(t[2].1, 2, "line of __global__");
    // Numbers are skipped, identifiers with digits kept whole.
    assert!(toks.contains(&&Tok::Ident("n2")));
    assert!(!toks.contains(&&Tok::Ident("f")), "1.5f is one number, skipped");
    assert!(toks.contains(&&Tok::Punct('{')) && toks.contains(&&Tok::Punct(';')));
}

#[test]
fn scan_entries_finds_kernels_in_order() {
    let code = strip_comments(
        "extern \"C\" __global__ void first(float* x) {}\n\
         extern \"C\" __global__ __launch_bounds__(256, 2) void second(int n) {}\n\
         extern \"C\" __device__ int helper(int n);\n\
         __global__ void not_exported() {}\n\
         // extern \"C\" __global__ void commented(int n) {}\n\
         extern \"C\" int value = 3;\n",
    );
    assert_eq!(scan_entries(&code).unwrap(), ["first", "second"]);
}

#[test]
fn scan_entries_rejects_a_kernel_in_an_extern_c_block() {
    let code = "extern \"C\" {\n  int f(int);\n  __global__ void k(int n) {}\n}\n";
    let err = scan_entries(code).unwrap_err();
    assert!(err.starts_with("line 3: a kernel inside an `extern \"C\" { }` block"), "{err}");
    // A block without kernels is fine.
    assert_eq!(scan_entries("extern \"C\" { int f(int); }").unwrap(), Vec::<String>::new());
}

#[test]
fn rewrite_dynamic_shared_makes_a_pointer_and_keeps_lines() {
    let src = "__global__ void k() {\n  extern __shared__ __align__(16) float\n    smem[];\n  smem[0] = 1; // extern __shared__ int no[];\n}\n";
    let out = rewrite_dynamic_shared(src, "kernels/k.cu").unwrap();
    assert_eq!(
        out,
        "#line 1 \"kernels/k.cu\"\n__global__ void k() {\n  float* smem = ::emu::dynamic_shared<float>(__func__);\n\n  smem[0] = 1; // extern __shared__ int no[];\n}\n"
    );
    assert_eq!(out.lines().count(), src.lines().count() + 1);
}

#[test]
fn rewrite_dynamic_shared_keeps_qualified_types() {
    let out = rewrite_dynamic_shared("extern __shared__ unsigned char buf[];", "a.cu").unwrap();
    assert_eq!(out, "#line 1 \"a.cu\"\nunsigned char* buf = ::emu::dynamic_shared<unsigned char>(__func__);");
}

#[test]
fn rewrite_dynamic_shared_rejects_what_it_cannot_rewrite() {
    let two = rewrite_dynamic_shared("\nextern __shared__ float a[], b[];", "a.cu").unwrap_err();
    assert!(two.starts_with("a.cu:2: "), "{two}");
    assert!(rewrite_dynamic_shared("extern __shared__ float a;", "a.cu").unwrap_err().contains("unexpected extern __shared__ declaration"));
    assert!(rewrite_dynamic_shared("extern __shared__ float a[]", "a.cu").unwrap_err().contains("unterminated"));
}

fn offsets(l: &Layout) -> Vec<(&str, usize)> {
    l.fields.iter().map(|(f, o)| (f.as_str(), *o)).collect()
}

#[test]
fn struct_layout_places_fields_by_the_c_rules() {
    let src = "// a comment { ; }\nstruct Inner { int a; long long b; };\n\
               struct Outer {\n  float x;          // padded to 8 before the pointer\n  const __nv_bfloat16* p;\n  \
               unsigned int n;\n  Inner in;\n  unsigned char_count; int last;\n};\n";
    let inner = struct_layout(src, "Inner", &[]).unwrap();
    assert_eq!((offsets(&inner), inner.size, inner.align), (vec![("a", 0), ("b", 8)], 16, 8));
    let outer = struct_layout(src, "Outer", &[inner]).unwrap();
    assert_eq!(offsets(&outer), [("x", 0), ("p", 8), ("n", 16), ("in", 24), ("char_count", 40), ("last", 44)]);
    assert_eq!((outer.size, outer.align), (48, 8));
}

#[test]
fn struct_layout_rejects_what_it_cannot_place() {
    let err = |src: &str| struct_layout(src, "S", &[]).unwrap_err();
    assert!(err("struct S { int a[4]; };").contains("`[`"), "arrays");
    assert!(err("struct S { int a, b; };").contains("`,`"), "several names");
    assert!(err("struct S { Unknown u; };").contains("unknown field type `Unknown`"));
    assert!(err("struct T { int a; };").contains("no `struct S {`"));
    assert!(err("struct S { int a;").contains("not closed"));
}

#[test]
fn site_codes_reads_the_defines_in_order() {
    let src = "#define SITE_PATCH 0\n#define OTHER 3\n// #define SITE_OLD 9\n#define SITE_ADD 1\n#define SITE_BAD x\n";
    assert_eq!(site_codes(src), [("SITE_PATCH".to_string(), 0), ("SITE_ADD".to_string(), 1)]);
}

#[test]
fn cuda_watch_path_is_the_root_or_its_nearest_ancestor_inside_the_package() {
    let pkg = tempfile::tempdir().unwrap();
    let pkg = pkg.path();
    let root = pkg.join(".cache/cuda");
    // A fresh clone without .cache: nothing inside the package to watch (never a missing path).
    assert_eq!(watch::cuda_watch_path(&root, pkg), None);
    // .cache committed (its README), cuda not fetched yet: .cache, whose contents change when it is.
    std::fs::create_dir_all(pkg.join(".cache")).unwrap();
    assert_eq!(watch::cuda_watch_path(&root, pkg), Some(pkg.join(".cache")));
    // Fetched: the root itself (a new fetch changes it).
    std::fs::create_dir_all(&root).unwrap();
    assert_eq!(watch::cuda_watch_path(&root, pkg), Some(root.clone()));
    // PATCHBAY_CUDA_ROOT elsewhere: watched when it exists, else nothing (the variable is watched).
    let other = tempfile::tempdir().unwrap();
    assert_eq!(watch::cuda_watch_path(other.path(), pkg), Some(other.path().to_path_buf()));
    assert_eq!(watch::cuda_watch_path(&other.path().join("missing/cuda"), pkg), None);
}
