//! `rcu-trace`: see `rcu-trace --help` and the crate docs (`lib.rs`).

use clap::Parser;

fn main() {
    let cli = rcu_trace::cli::Cli::parse();
    std::process::exit(rcu_trace::run::run(cli));
}
