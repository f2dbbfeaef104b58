use clap::Parser;

fn main() {
    let cli = quantlab::cli::Cli::parse();
    if let Err(e) = quantlab::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
