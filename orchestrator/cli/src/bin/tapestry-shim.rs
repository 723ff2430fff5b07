//! `tapestry-shim`: the per-container monitor the node agent starts for
//! every container (see `tapestry_kubelet::shim`), as a program of its own.
//! It is the same code as `tapestry container-shim`, without the rest of
//! Tapestry: it starts in a fraction of the time and each running container
//! costs a fraction of the memory.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "tapestry-shim",
    version,
    about = "Tapestry's per-container monitor"
)]
struct Cli {
    #[command(flatten)]
    args: tapestry_kubelet::shim::ShimArgs,
}

fn main() {
    std::process::exit(tapestry_kubelet::shim::main(Cli::parse().args));
}
