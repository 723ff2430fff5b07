//! Compiles the C eBPF programs in `../ebpf/` with clang into `$OUT_DIR`,
//! where `src/bpf.rs` embeds them. A missing clang or BPF headers is a build
//! error that says which Debian packages to install.

use std::{env, path::PathBuf, process::Command};

const PROGRAMS: &[&str] = &["tap.bpf.c"];

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let ebpf = manifest.join("../ebpf");
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_string());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed={}", ebpf.display());

    // Debian keeps <asm/types.h> under the multiarch include directory.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        other => other,
    };

    for prog in PROGRAMS {
        let src = ebpf.join(prog);
        let obj = out.join(prog.replace(".c", ".o"));
        let result = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg(format!("-I{}", ebpf.join("include").display()))
            .arg(format!("-I/usr/include/{multiarch}"))
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output();
        match result {
            Err(e) => panic!(
                "\n\ntap-agent needs clang to compile its eBPF programs ({}): running `{clang}` failed: {e}\n\
                 Install it (Debian: apt-get install clang libbpf-dev linux-libc-dev) or point CLANG at it.\n\n",
                src.display()
            ),
            Ok(o) if !o.status.success() => panic!(
                "\n\nclang failed to compile {} (needs libbpf-dev and linux-libc-dev headers):\n{}\n",
                src.display(),
                String::from_utf8_lossy(&o.stderr)
            ),
            Ok(_) => {}
        }
    }
}
