//! Compiles the mesh's protos with protox (no system `protoc` needed). The
//! gRPC client and server code is generated only with the `grpc` feature,
//! so the API crate stays free of tokio for its other users.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/mesh/discovery/v1/discovery.proto",
        "proto/mesh/ca/v1/ca.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        tonic_prost_build::configure()
            .build_transport(false)
            .bytes(".mesh.discovery.v1.Resource.body")
            .compile_fds(fds)?;
    } else {
        prost_build::Config::new()
            .bytes([".mesh.discovery.v1.Resource.body"])
            .compile_fds(fds)?;
    }
    Ok(())
}
