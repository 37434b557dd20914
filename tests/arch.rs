//! The dependency table in `src/lib.rs` is true: every module of `src/` is in
//! it, and every `crate::…` path a module's files name (code and unit tests;
//! comments are not dependencies) is one the table allows. The pure modules
//! (`policy`, `predict`, `session`, `copy::select`) do no I/O, start no
//! threads and read no clock; `copy::select` names no CUDA.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// module → allowed paths (`tier`, or `copy::select` for one submodule).
fn table() -> BTreeMap<String, Vec<String>> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut t = BTreeMap::new();
    for line in lib.lines() {
        let Some(row) = line.strip_prefix("//! |") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        if cells.len() < 2 {
            continue;
        }
        let name: String = cells[0]
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name == "module" {
            continue;
        }
        let allowed = cells[1]
            .split(',')
            .map(|s| s.trim().trim_matches('`').to_string())
            .filter(|s| !s.is_empty() && s != "—")
            .collect();
        assert!(
            t.insert(name.clone(), allowed).is_none(),
            "module {name} has two rows in the src/lib.rs table"
        );
    }
    assert!(t.len() > 5, "no dependency table found in src/lib.rs");
    t
}

/// Every top-level module (a file or a folder of `src/`) and its `.rs` files.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(src()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "bin" {
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            walk(&p, &mut files);
        } else if p.extension().is_some_and(|x| x == "rs") {
            files.push(p.clone());
        } else {
            continue;
        }
        files.sort();
        m.insert(name, files);
    }
    m
}

/// Code lines of a file, comments removed (doc links are not dependencies).
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// The `crate::a::b` paths of a line (identifier segments only), and whether
/// it has a grouped `crate::{…}` import, which the test cannot read.
fn crate_paths(line: &str) -> (Vec<Vec<String>>, bool) {
    let mut out = Vec::new();
    let mut grouped = false;
    let b = line.as_bytes();
    let mut i = 0;
    while let Some(k) = line[i..].find("crate::") {
        let at = i + k;
        let before_ok = at == 0 || !(b[at - 1].is_ascii_alphanumeric() || b[at - 1] == b'_');
        i = at + "crate::".len();
        if !before_ok {
            continue;
        }
        let mut segs = Vec::new();
        let mut j = i;
        loop {
            let start = j;
            while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
                j += 1;
            }
            if j == start {
                if j < b.len() && b[j] == b'{' {
                    grouped = segs.is_empty();
                }
                break;
            }
            segs.push(line[start..j].to_string());
            if line[j..].starts_with("::") {
                j += 2;
            } else {
                break;
            }
        }
        if !segs.is_empty() {
            out.push(segs);
        }
    }
    (out, grouped)
}

fn allowed(rules: &[String], path: &[String]) -> bool {
    rules.iter().any(|r| {
        let want: Vec<&str> = r.split("::").collect();
        want.len() <= path.len() && want.iter().zip(path).all(|(a, b)| *a == b)
    })
}

#[test]
fn every_arrow_is_one_the_table_allows() {
    let table = table();
    let modules = modules();
    let listed: BTreeSet<&String> = table.keys().collect();
    let present: BTreeSet<&String> = modules.keys().collect();
    assert_eq!(
        listed, present,
        "the src/lib.rs dependency table must list exactly the modules of src/"
    );
    let mut bad = Vec::new();
    let mut arrows = 0;
    for (m, files) in &modules {
        for f in files {
            for (n, line) in code_lines(f) {
                let (paths, grouped) = crate_paths(&line);
                if grouped {
                    bad.push(format!(
                        "{}:{n}: grouped `crate::{{…}}` import; write one path per module",
                        f.display()
                    ));
                }
                for p in paths {
                    if &p[0] == m || !modules.contains_key(&p[0]) {
                        continue; // itself, or a crate-root re-export (crate::Error)
                    }
                    arrows += 1;
                    if !allowed(&table[m], &p) {
                        bad.push(format!(
                            "{}:{n}: {m} uses crate::{}, which the src/lib.rs table does not allow",
                            f.display(),
                            p.join("::")
                        ));
                    }
                }
            }
        }
    }
    assert!(
        arrows > 50,
        "only {arrows} cross-module paths found: the scan is broken"
    );
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_paths_and_flags_what_it_cannot_read() {
    let (p, g) = crate_paths("use crate::copy::select::{Rule, Selector}; // crate::x");
    assert_eq!(p[0], ["copy", "select"]);
    assert!(!g);
    let (p, g) = crate_paths("let x = mycrate::a; use crate::{a, b};");
    assert!(p.is_empty());
    assert!(g);
    let rules = vec!["copy::select".to_string(), "tier".to_string()];
    assert!(allowed(
        &rules,
        &["copy".into(), "select".into(), "Rule".into()]
    ));
    assert!(allowed(&rules, &["tier".into(), "host".into()]));
    assert!(!allowed(
        &rules,
        &["copy".into(), "cuda".into(), "plan".into()]
    ));
    assert!(!allowed(&rules, &["copy".into()]));
}

#[test]
fn pure_modules_do_no_io_threads_or_clock_reads() {
    let root = src();
    let mut files = Vec::new();
    for m in ["policy", "predict"] {
        files.extend(modules().remove(m).unwrap());
    }
    files.push(root.join("session.rs"));
    files.push(root.join("copy/select.rs"));
    let forbidden = [
        "std::fs",
        "std::net",
        "std::thread",
        "Instant::now",
        "SystemTime",
        "std::io::",
        "libc::",
        "cudarc",
        "crate::copy::cuda",
    ];
    let mut bad = Vec::new();
    for f in &files {
        for (n, line) in code_lines(f) {
            for w in forbidden {
                if line.contains(w) {
                    bad.push(format!("{}:{n}: {w} in a pure module", f.display()));
                }
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}
