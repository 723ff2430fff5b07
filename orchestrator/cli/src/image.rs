//! `tapestry image`: the node's OCI image store.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use tapestry_kubelet::images::ImageStore;

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The node's data directory (images live in DIR/images).
    #[arg(long, default_value = "/var/lib/tapestry", value_parser = crate::absolute_path, global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Import an OCI image-layout archive or a `docker save` archive.
    Import {
        /// The archive (tar, optionally compressed).
        file: PathBuf,
        /// Name the image NAME:TAG (required when the archive names none).
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a one-layer image from a directory tree.
    Build {
        /// NAME:TAG of the new image.
        name: String,
        /// The directory that becomes the image's root filesystem.
        #[arg(long)]
        rootfs: PathBuf,
        /// Default command (the image's Cmd), e.g. --cmd sh --cmd -c --cmd 'echo hi'.
        #[arg(long = "cmd")]
        cmd: Vec<String>,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long = "env")]
        env: Vec<String>,
    },
    /// List images.
    Ls,
    /// Remove images by name.
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
}

pub fn run(args: ImageArgs) -> Result<()> {
    let store = ImageStore::open(&args.data_dir.join("images"))?;
    match args.command {
        ImageCommand::Import { file, name } => {
            for n in store.import(&file, name.as_deref())? {
                println!("imported {n}");
            }
        }
        ImageCommand::Build {
            name,
            rootfs,
            cmd,
            env,
        } => {
            for e in &env {
                if !e.contains('=') {
                    anyhow::bail!("--env {e:?}: expected KEY=VALUE");
                }
            }
            store.build(&name, &rootfs, &cmd, &env)?;
            println!("built {}", tapestry_kubelet::images::normalize(&name));
        }
        ImageCommand::Ls => {
            println!("{:<40} {:<20} {:>12}  CREATED", "IMAGE", "ID", "SIZE");
            for (name, rec) in store.list()? {
                let id = rec.config.trim_start_matches("sha256:");
                println!(
                    "{:<40} {:<20} {:>12}  {}",
                    name,
                    &id[..12.min(id.len())],
                    human(rec.size),
                    rec.created
                );
            }
        }
        ImageCommand::Rm { names } => {
            for n in names {
                store.remove(&n)?;
                println!("removed {}", tapestry_kubelet::images::normalize(&n));
            }
        }
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1}KiB", b as f64 / 1024.0),
        b => format!("{b}B"),
    }
}
