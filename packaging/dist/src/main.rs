//! `baton-dist`: writes what packages and docs take from the code. See
//! `baton-dist --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Generate Baton's man pages, shell completions and reference docs from
/// the code (used by `packaging/deb/build` and to refresh docs/reference).
#[derive(Debug, Parser)]
#[command(
    name = "baton-dist",
    version,
    after_help = "Examples:
  cargo run -p baton-dist -- reference docs/reference
  cargo run -p baton-dist -- man target/dist/man
  cargo run -p baton-dist -- completions target/dist/completions"
)]
enum Dist {
    /// Write docs/reference's generated pages (cli.md, config.md,
    /// service-toml.md, plan.md) into DIR.
    Reference {
        /// The directory, normally docs/reference.
        dir: PathBuf,
    },
    /// Write a man page per command into DIR.
    Man {
        /// The directory.
        dir: PathBuf,
    },
    /// Write bash, zsh and fish completions into DIR/{bash,zsh,fish}.
    Completions {
        /// The directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let result = match Dist::parse() {
        Dist::Reference { dir } => baton_dist::reference().and_then(|pages| {
            pages
                .into_iter()
                .map(|(name, text)| {
                    std::fs::write(dir.join(name), text)
                        .map(|()| dir.join(name).display().to_string())
                        .map_err(|e| format!("cannot write {}: {e}", dir.join(name).display()))
                })
                .collect()
        }),
        Dist::Man { dir } => baton_dist::man_pages(&dir).map_err(|e| e.to_string()),
        Dist::Completions { dir } => baton_dist::completions(&dir).map_err(|e| e.to_string()),
    };
    match result {
        Ok(files) => {
            eprintln!("baton-dist: wrote {} files", files.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("baton-dist: {e}");
            ExitCode::FAILURE
        }
    }
}
