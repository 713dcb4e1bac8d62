//! `orderctl`: publish orders, count outcomes, inspect and replay dead letters
//! (the code is `order_worker::cli`, shared with `kubectl orderpipeline`).

#[tokio::main]
async fn main() -> std::process::ExitCode {
    order_worker::cli::main_from(std::env::args_os(), "orderctl").await
}
