//! The `pifleet` binary: parse the command line, run it, map the outcome to
//! an exit code. Everything else lives in the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = pifleet::cli::Cli::parse();
    pifleet::systemd::init_logging();
    pifleet::cli::run(cli)
}
