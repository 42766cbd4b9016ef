//! Keeps the crate map in `src/lib.rs` true: modules are listed lowest first, and no module
//! names (`crate::…`) one listed after it, so the import graph has no cycle.

use std::{collections::BTreeSet, fs, path::Path};

/// The top-level modules in the order the crate map lists them.
fn map_order(lib: &str) -> Vec<String> {
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! - "))
        .map(|l| l.trim_start_matches('[').trim_start_matches('`'))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

/// Every module's source text: `src/<m>.rs` and everything under `src/<m>/`.
fn sources(src: &Path, module: &str) -> String {
    let mut text = fs::read_to_string(src.join(format!("{module}.rs"))).unwrap_or_default();
    let mut dirs = vec![src.join(module)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                text.push_str(&fs::read_to_string(&path).expect("a source file"));
            }
        }
    }
    text
}

/// The top-level modules `text` names through `crate::` paths in code, `crate::{a, b::c}`
/// groups included; a doc comment's link is not an import.
fn named(text: &str, modules: &[String]) -> BTreeSet<String> {
    let text: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .flat_map(|l| [l, "\n"])
        .collect();
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let heads: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => {
                // Top-level entries of the group: split at commas outside nested braces.
                let mut depth = 0;
                let mut heads = vec![];
                let mut start = 0;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            heads.push(&group[start..j]);
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            heads.push(&group[start..j]);
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
                heads
            }
            None => vec![rest],
        };
        for h in heads {
            let name: String = h
                .trim_start()
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

#[test]
fn no_module_names_one_listed_after_it_in_the_crate_map() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let order = map_order(&lib);
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
        })
        .map(|l| l.trim_end_matches(';').to_owned())
        .filter(|m| !m.ends_with("_tests"))
        .collect();
    assert_eq!(
        declared,
        order.iter().cloned().collect(),
        "the crate map lists every module once"
    );
    let mut upward = vec![];
    for (i, m) in order.iter().enumerate() {
        for dep in named(&sources(&src, m), &order) {
            if order[i..].contains(&dep) && dep != *m {
                upward.push(format!("{m} → {dep}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports of modules listed later in src/lib.rs's crate map: {upward:?}"
    );
}
