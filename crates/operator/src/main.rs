//! `nodeport-firewall`: a thin entry point; the work is in the library.

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the controller parses every watched Service in full
/// before stripping it, and glibc's per-thread arenas keep the freed space, so with 10,000
/// Services the process held twice the memory it used (see the note on issue 4).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // Installed as `kubectl-nodeport_firewall`, help and errors say `kubectl nodeport-firewall`.
    let parsed = nodeport_firewall::cli::Cli::command()
        .bin_name(nodeport_firewall::cli::bin_name())
        .try_get_matches()
        .and_then(|m| nodeport_firewall::cli::Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            // Exit codes are a contract for CI (0 no changes, 2 changes pending, 1 anything
            // else): clap's own exit code for a usage error is 2, which would read as
            // "changes pending". --help and --version are not errors.
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(nodeport_firewall::cli::EXIT_ERROR),
            };
        }
    };
    nodeport_firewall::cli::init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(nodeport_firewall::cli::run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
