//! `baton`: the Baton operator CLI. See `baton --help`.

fn main() -> std::process::ExitCode {
    baton_cli::main()
}
