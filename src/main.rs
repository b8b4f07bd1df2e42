//! The `pifleet` binary: parse the command line, run it, map the outcome to
//! an exit code. Everything else lives in the library.
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match pifleet::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; a bad
            // argument exits 64 like every other usage error of pifleet.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(pifleet::cli::EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    pifleet::systemd::init_logging();
    pifleet::cli::run(cli)
}
