//! The `courier` binary: everything lives in [`courier::cli`]; this file
//! only hands it control and returns its exit code.

/// mimalloc instead of the system allocator: the broker allocates and frees
/// small buffers per message on several threads, where glibc malloc spent
/// about an eighth of the broker's CPU when draining (docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    courier::cli::main()
}
