fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/tapestry/tap/v1/tap.proto",
        "proto/tapestry/tap/v2/ingest.proto",
        "proto/tapestry/tool/v1/tool.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // A batch's records are read in place: `Bytes`, a slice of the
    // received buffer, not a copy.
    tonic_prost_build::configure()
        .bytes(".tapestry.tap.v2.Batch.records")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
