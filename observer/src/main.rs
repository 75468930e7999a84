fn main() -> std::process::ExitCode {
    observer::main()
}
