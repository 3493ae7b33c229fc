//! The `allium` binary: a thin shell over the library crates.

fn main() -> std::process::ExitCode {
    allium::main()
}
