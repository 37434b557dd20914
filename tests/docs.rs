//! The README stays in step with the code: the two commands open it, every
//! config key the code accepts is in its table, and every CLI subcommand is listed.

use std::path::Path;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

#[test]
fn readme_opens_with_the_two_commands() {
    let r = readme();
    let first_block = r
        .split("```sh")
        .nth(1)
        .expect("a sh block")
        .split("```")
        .next()
        .unwrap();
    let cmds: Vec<&str> = first_block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        cmds,
        [
            "cargo run --release --features cli -- replay",
            "./scripts/test.sh"
        ]
    );
    let ci =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run")).unwrap();
    assert!(
        ci.contains("./scripts/test.sh"),
        ".ci/run must run the README's test command"
    );
}

#[test]
fn every_config_key_is_documented() {
    let r = readme();
    for (key, default, _) in kvpark::config::KEYS {
        let row = format!("| `{key}` | `{default}` |");
        assert!(
            r.contains(&row),
            "README config table lacks the row for {key} (expected {row:?})"
        );
        // the documented default is what the code uses
        let json = format!("{{\"{key}\": {default}}}");
        let with = kvpark::config::Config::from_json(json.as_bytes()).unwrap();
        let without = kvpark::config::Config::from_json(b"{}").unwrap();
        assert_eq!(
            with, without,
            "documented default of {key} differs from the code's"
        );
    }
}

#[test]
fn every_subcommand_is_listed() {
    let r = readme();
    for cmd in [
        "kvpark replay",
        "kvpark tune",
        "kvpark trace synth",
        "kvpark trace stats",
        "kvpark bench",
        "kvpark inspect",
        "kvpark config",
    ] {
        assert!(r.contains(&format!("`{cmd}")), "README does not list {cmd}");
    }
}
