//! `include/kvpark.h` must be exactly what cbindgen generates from `src/ffi`.
//! Regenerate with `KVPARK_BLESS=1 cargo test --test header`.

use std::path::Path;

#[test]
fn header_matches_cbindgen_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root)
        .with_config(cfg)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let path = root.join("include/kvpark.h");
    if std::env::var_os("KVPARK_BLESS").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let have = std::fs::read(&path).unwrap_or_default();
    assert!(
        have == out,
        "include/kvpark.h is stale: regenerate with KVPARK_BLESS=1 cargo test --test header"
    );
    let text = String::from_utf8(out).unwrap();
    let defines: Vec<&str> = text.lines().filter(|l| l.starts_with("#define ")).collect();
    let version = format!(
        "#define KVPARK_ABI_VERSION {}",
        kvpark::ffi::KVPARK_ABI_VERSION
    );
    assert_eq!(
        defines,
        ["#define KVPARK_H", version.as_str()],
        "only kvpark-prefixed names may enter the C namespace, and the ABI version \
         (written in cbindgen.toml) must be the library's"
    );
    // every type the header names is kvpark's
    for line in text.lines() {
        let line = line.trim_start();
        for intro in ["typedef struct ", "typedef enum ", "struct ", "enum "] {
            if let Some(rest) = line.strip_prefix(intro) {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.is_empty() || name.starts_with("Kvpark"),
                    "unprefixed type {name:?} in the C header ({line})"
                );
            }
        }
    }
    for sym in [
        "kvpark_abi_version",
        "kvpark_last_error",
        "kvpark_planner_match",
        "kvpark_mover_register",
        "KVPARK_STATUS_NULL_POINTER = 1",
    ] {
        assert!(text.contains(sym), "header lacks {sym}");
    }
}
