//! The `divergence` command line. All logic lives in the library and in `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
