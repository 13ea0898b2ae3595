//! The layering rules, checked on the source so a change that breaks them fails CI:
//! dependencies between the workspace crates point down (the binary → engine, agents →
//! net, db → core), and inside each crate no modules import each other in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Each crate's source directory and the workspace crates it may depend on.
const CRATES: &[(&str, &str, &[&str])] = &[
    ("seedcast-core", "core", &[]),
    ("seedcast-net", "net", &["seedcast-core"]),
    ("seedcast-db", "db", &["seedcast-core"]),
    ("seedcast-qemu", "qemu", &[]),
    (
        "seedcast-engine",
        "engine",
        &["seedcast-core", "seedcast-net", "seedcast-db"],
    ),
    (
        "seedcast-agents",
        "agents",
        &[
            "seedcast-core",
            "seedcast-net",
            "seedcast-db",
            "seedcast-qemu",
        ],
    ),
    (
        "seedcast",
        ".",
        &[
            "seedcast-core",
            "seedcast-net",
            "seedcast-db",
            "seedcast-qemu",
            "seedcast-engine",
            "seedcast-agents",
        ],
    ),
];

/// The workspace crates named in a manifest's `[dependencies]` table.
fn workspace_deps(manifest: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(manifest)?;
    let mut out = BTreeSet::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps
            && let Some(name) = line.split(['.', ' ', '=']).next()
            && name.starts_with("seedcast")
        {
            out.insert(name.to_string());
        }
    }
    Ok(out)
}

#[test]
fn crate_dependencies_point_down() -> Result<()> {
    for (name, dir, allowed) in CRATES {
        let deps = workspace_deps(&Path::new(ROOT).join(dir).join("Cargo.toml"))?;
        for d in &deps {
            ensure!(
                allowed.contains(&d.as_str()),
                "{name} depends on {d}, which is not below it"
            );
        }
    }
    Ok(())
}

/// The source of `path` without its test module and comments.
fn code(path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)?;
    let text = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
    Ok(text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// Identifiers that follow `crate::` (and those inside `use crate::{…}` at its top level).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (j, c) in list.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        out.insert(ident(&list[j..]));
                        start = false;
                    }
                    c if !c.is_whitespace() => start = false,
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

/// Each top-level module of the crate in `src` and the others it refers to.
fn module_graph(src: &Path) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| d.display().to_string())? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let module = |p: &Path| -> Option<String> {
        let rel = p.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_string_lossy();
        let m = first.trim_end_matches(".rs").to_string();
        (m != "lib" && m != "main" && !m.is_empty()).then_some(m)
    };
    let tops: BTreeSet<String> = files.iter().filter_map(|p| module(p)).collect();
    let mut g: BTreeMap<String, BTreeSet<String>> =
        tops.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for p in &files {
        let Some(m) = module(p) else { continue };
        for t in crate_paths(&code(p)?) {
            if tops.contains(&t) && t != m {
                g.get_mut(&m).expect("known module").insert(t);
            }
        }
    }
    Ok(g)
}

/// A circle in `g`, if there is one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == m) {
            let mut c = path[i..].to_vec();
            c.push(m.to_string());
            return Some(c);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for n in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, n, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    g.keys()
        .find_map(|m| visit(g, m, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_itself_through_others() -> Result<()> {
    let mut modules = 0;
    for (name, dir, _) in CRATES {
        let g = module_graph(&Path::new(ROOT).join(dir).join("src"))?;
        modules += g.len();
        if let Some(c) = find_cycle(&g) {
            anyhow::bail!(
                "{name}: modules import each other in a circle: {}",
                c.join(" → ")
            );
        }
    }
    // The walk found the modules (a crate with only `lib.rs` has none).
    ensure!(modules > 30, "only {modules} modules found");
    Ok(())
}

#[test]
fn the_checker_sees_circles_and_brace_lists() {
    let code = "use crate::{a::X, b, c::{d, e}};\nlet y = crate::f::g();";
    let want: BTreeSet<String> = ["a", "b", "c", "f"].iter().map(|s| s.to_string()).collect();
    assert_eq!(crate_paths(code), want);
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("x", vec!["y"]),
        ("y", vec!["z"]),
        ("z", vec!["x"]),
        ("w", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(find_cycle(&g).unwrap(), ["x", "y", "z", "x"]);
    let mut acyclic = g.clone();
    acyclic.get_mut("z").unwrap().clear();
    assert!(find_cycle(&acyclic).is_none());
}
