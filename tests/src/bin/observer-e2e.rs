//! The observer command itself, built inside this package so its tests can run it
//! (`CARGO_BIN_EXE_observer-e2e`): the same one line as observer/src/main.rs.
fn main() -> std::process::ExitCode {
    observer::main()
}
