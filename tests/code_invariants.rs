//! Invariants of the code itself, checked as ordinary tests (see
//! docs/ARCHITECTURE.md): every source file opens with a `//!` paragraph,
//! and the layers depend on each other in one direction only.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // Build output of the standalone peer benches is not ours.
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn sources(sub: &str) -> Vec<(PathBuf, String)> {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join(sub), &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p, text)
        })
        .collect()
}

/// Lines of code, without comments.
fn code_lines(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim_start)
        .filter(|l| !l.starts_with("//"))
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut missing = Vec::new();
    for dir in ["src", "tests", "benches", "examples"] {
        for (path, text) in sources(dir) {
            if !text.trim_start().starts_with("//!") {
                missing.push(path.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "files without a //! header: {missing:#?}"
    );
}

#[test]
fn storage_knows_nothing_of_the_layers_above_and_only_meta_uses_sled() {
    for (path, text) in sources("src/storage") {
        for line in code_lines(&text) {
            for banned in [
                "tonic",
                "crate::api",
                "crate::broker",
                "crate::server",
                "prost",
            ] {
                assert!(
                    !line.contains(banned),
                    "{} uses {banned}: {line}",
                    path.display()
                );
            }
            if !path.ends_with("meta.rs") {
                assert!(
                    !line.contains("sled::"),
                    "{} uses sled outside meta.rs: {line}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn the_broker_knows_nothing_of_grpc() {
    for (path, text) in sources("src/broker") {
        for line in code_lines(&text) {
            for banned in ["tonic", "crate::api", "prost", "sled::"] {
                assert!(
                    !line.contains(banned),
                    "{} uses {banned}: {line}",
                    path.display()
                );
            }
        }
    }
}

#[test]
fn only_the_api_layer_builds_a_grpc_status() {
    for dir in ["src/storage", "src/broker"] {
        for (path, text) in sources(dir) {
            assert!(
                !text.contains("Status::"),
                "{} builds a gRPC status",
                path.display()
            );
        }
    }
}
