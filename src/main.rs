/// The feed's matcher and writer (and the server's workers) allocate on one thread and free
/// on another; glibc's allocator serialises those frees on a lock (measured: a third of the
/// pipelined import's context switches). mimalloc frees across threads without one.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    hie_broker::cli::main()
}
