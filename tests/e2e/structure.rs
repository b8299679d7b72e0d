//! The code's shape, as ARCHITECTURE.md describes it: which crate may
//! depend on which, no import cycle between a crate's modules, and no
//! source file that has grown into several jobs. Read from the source
//! tree, so a change that breaks the shape fails here with the path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `text` without comments and without its `#[cfg(test)]` tail (test
/// modules sit at the end of a file, by the project's style).
fn code(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named by `crate::…` paths in `code`, including
/// grouped imports (`use crate::{a::X, b};`).
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    out.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The module graph of the crate whose sources are in `src`: top-level
/// module → the top-level modules it names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in sources(src) {
        let rel = path.strip_prefix(src).unwrap();
        let name = rel.to_string_lossy();
        if name.ends_with("tests.rs") || name.contains("tests_support") || name.starts_with("bin/")
        {
            continue;
        }
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let refs = crate_refs(&code(&std::fs::read_to_string(&path).unwrap()));
        let entry = graph.entry(top.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != top));
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(1) => {
                    let from = path.iter().position(|n| n == next).unwrap();
                    let mut c = path[from..].to_vec();
                    c.push(next.clone());
                    return Some(c);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = visit(next, graph, state, path) {
                        return Some(c);
                    }
                }
            }
        }
        path.pop();
        state.insert(node.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if !state.contains_key(node.as_str())
            && let Some(c) = visit(node, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

const CRATES: &[&str] = &[
    "common/src",
    "coordinator/engine/src",
    "coordinator/src",
    "coordinator/cli/src",
    "agent/src",
];

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    for krate in CRATES {
        let graph = module_graph(&root().join(krate));
        assert!(graph.len() > 3, "{krate}: no modules found");
        if let Some(c) = cycle(&graph) {
            panic!("{krate}: modules import each other: {}", c.join(" → "));
        }
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    let graph = BTreeMap::from([
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]);
    assert_eq!(cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let refs = crate_refs("use crate::{fleet::X, metrics};\n let y = crate::ha::f();");
    assert_eq!(
        refs,
        BTreeSet::from(["fleet".into(), "metrics".into(), "ha".into()])
    );
    assert!(crate_refs(&code("// crate::doc\nfn f() {}")).is_empty());
}

/// The `[dependencies]` section of a crate's manifest.
fn dependencies(manifest: &str) -> String {
    let text = std::fs::read_to_string(root().join(manifest)).unwrap();
    let start = text.find("\n[dependencies]").unwrap();
    let rest = &text[start + 1..];
    let end = rest[1..].find("\n[").map_or(rest.len(), |e| e + 1);
    rest[..end]
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_crate_graph_is_as_designed() {
    // The coordinator does not link the agent; only the CLI's demo does.
    let coordinator = dependencies("coordinator/Cargo.toml");
    assert!(!coordinator.contains("baton-agent"), "{coordinator}");
    let cli = dependencies("coordinator/cli/Cargo.toml");
    for daemon in ["baton-coordinator", "baton-agent"] {
        let line = cli.lines().find(|l| l.starts_with(daemon)).unwrap();
        assert!(line.contains("optional = true"), "{line}");
    }
    // The engine: no tokio, no gRPC, and common without its runtime.
    let engine = dependencies("coordinator/engine/Cargo.toml");
    for io in ["tokio", "tonic", "baton-proto", "redb", "etcd"] {
        assert!(
            !engine.contains(io),
            "the engine depends on {io}:\n{engine}"
        );
    }
    let common = engine
        .lines()
        .find(|l| l.starts_with("baton-common"))
        .unwrap();
    assert!(common.contains("default-features = false"), "{common}");
    // What common builds without `runtime` does not bring tokio.
    let common = dependencies("common/Cargo.toml");
    for line in common
        .lines()
        .filter(|l| l.contains("tokio") || l.contains("tonic"))
    {
        assert!(line.contains("optional = true"), "{line}");
    }
}

/// The longest a source file may grow (tests included) before it is
/// split by job.
const MAX_FILE_LINES: usize = 1_200;

#[test]
fn no_source_file_has_grown_into_several_jobs() {
    for krate in CRATES {
        for path in sources(&root().join(krate)) {
            let lines = std::fs::read_to_string(&path).unwrap().lines().count();
            assert!(
                lines <= MAX_FILE_LINES,
                "{} has {lines} lines (the limit is {MAX_FILE_LINES}): split it by job",
                path.display()
            );
        }
    }
}

/// The README's size: what it is, the two commands, a fleet by hand and
/// where to read on; the rest is in docs/.
const MAX_README_BYTES: usize = 8 * 1024;

#[test]
fn the_readme_stays_short_and_every_docs_link_resolves() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.len() <= MAX_README_BYTES,
        "README.md is {} bytes (at most {MAX_README_BYTES}): move the detail into docs/",
        readme.len()
    );
    // Relative Markdown links in the README and docs/ name files that exist.
    let mut files = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "md") {
                files.push(p);
            }
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap_or_default();
            let target = target.split('#').next().unwrap_or_default();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = file.parent().unwrap().join(target);
            assert!(
                path.exists(),
                "{} links to {target}, which does not exist",
                file.display()
            );
        }
    }
}
