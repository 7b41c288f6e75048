//! The `courier` binary: everything lives in [`courier::cli`]; this file
//! only hands it control and returns its exit code.

fn main() -> std::process::ExitCode {
    courier::cli::main()
}
