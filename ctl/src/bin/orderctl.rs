//! `orderctl`: publish orders, count outcomes, audit, inspect and replay dead
//! letters (the code is `orderpipeline_ctl`, shared with `kubectl orderpipeline`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    orderpipeline_ctl::cli::main_from(std::env::args_os()).await
}
