use clap::Parser;

fn main() {
    // Built for x86-64-v3: say so on an older CPU instead of dying on an illegal instruction.
    let missing = quantlab::nn::kernels::isa::missing_build_features();
    if !missing.is_empty() {
        eprintln!(
            "error: this quantlab binary needs a CPU with {} (x86-64-v3); this one lacks them. \
             Rebuild without .cargo/config.toml's target-cpu for a baseline x86-64 binary.",
            missing.join(", ")
        );
        std::process::exit(1);
    }
    if let Err(e) = quantlab::nn::kernels::isa::check_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    quantlab::nn::kernels::prefill::keep_freed_memory();
    let cli = quantlab::cli::Cli::parse();
    if let Err(e) = quantlab::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
