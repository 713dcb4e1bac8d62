//! Compiles `orders/v1/orders.proto` with protox (pure Rust, no system `protoc`)
//! and generates the prost types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "orders/v1/orders.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
