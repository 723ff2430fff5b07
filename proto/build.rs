fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tapestry/tap/v1/tap.proto",
        "proto/tapestry/tool/v1/tool.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["proto"])?;
    Ok(())
}
