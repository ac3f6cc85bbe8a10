fn main() -> std::process::ExitCode {
    hie_broker::cli::main()
}
