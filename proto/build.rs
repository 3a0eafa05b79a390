//! Compiles `baton/v1/*.proto` with protox (pure Rust, so no protoc is needed)
//! and generates the prost messages and tonic clients and servers.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "baton/v1/types.proto",
        "baton/v1/coordinator.proto",
        "baton/v1/admin.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
