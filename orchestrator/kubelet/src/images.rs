//! A content-addressed OCI image store under `DATA/images`.
//!
//! Layout: `blobs/sha256/HEX` holds layer archives and image configs exactly
//! as imported (their name is the SHA-256 of their bytes), `layers/HEX/` the
//! unpacked layer trees (made on first use), and `images.json` the names
//! (`name:tag`) with their config and ordered layer digests.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One named image: its config blob and its layers, bottom first.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    pub config: String,
    pub layers: Vec<String>,
    pub size: u64,
    pub created: String,
}

/// What a container inherits from its image's config.
#[derive(Clone, Debug, Default)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

pub struct ImageStore {
    root: PathBuf,
}

/// `busybox` → `busybox:latest`; Docker Hub prefixes are dropped so that
/// `docker.io/library/busybox:1.36` and `busybox:1.36` are one image.
pub fn normalize(reference: &str) -> String {
    let mut r = reference.trim().to_string();
    for prefix in [
        "docker.io/library/",
        "docker.io/",
        "index.docker.io/library/",
    ] {
        if let Some(rest) = r.strip_prefix(prefix) {
            r = rest.to_string();
        }
    }
    if let Some((name, _digest)) = r.split_once('@') {
        r = name.to_string();
    }
    let last = r.rsplit('/').next().unwrap_or("");
    if !last.contains(':') {
        r.push_str(":latest");
    }
    r
}

fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex(&hasher.finalize()), size))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_hex(digest: &str) -> Result<&str> {
    let h = digest
        .strip_prefix("sha256:")
        .with_context(|| format!("unsupported digest {digest:?} (only sha256)"))?;
    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("malformed digest {digest:?}");
    }
    Ok(h)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl ImageStore {
    pub fn open(root: &Path) -> Result<ImageStore> {
        for d in ["blobs/sha256", "layers", "tmp"] {
            fs::create_dir_all(root.join(d))
                .with_context(|| format!("creating {}", root.join(d).display()))?;
        }
        Ok(ImageStore {
            root: root.to_path_buf(),
        })
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("images.json")
    }

    pub fn list(&self) -> Result<BTreeMap<String, ImageRecord>> {
        match fs::read(self.index_path()) {
            Ok(b) => serde_json::from_slice(&b).context("parsing images.json"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).context("reading images.json"),
        }
    }

    fn save(&self, index: &BTreeMap<String, ImageRecord>) -> Result<()> {
        let tmp = self.root.join("images.json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(index)?)?;
        fs::rename(&tmp, self.index_path())?;
        Ok(())
    }

    pub fn get(&self, reference: &str) -> Result<Option<ImageRecord>> {
        Ok(self.list()?.remove(&normalize(reference)))
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest_hex(digest)?))
    }

    /// Move (or copy) `file` into the blob store; returns its digest and size.
    fn add_blob(&self, file: &Path, expected: Option<&str>) -> Result<(String, u64)> {
        let (h, size) = sha256_file(file)?;
        let digest = format!("sha256:{h}");
        if let Some(e) = expected {
            if e != digest {
                bail!(
                    "{}: content digest {digest} does not match {e}",
                    file.display()
                );
            }
        }
        let dest = self.blob_path(&digest)?;
        if !dest.exists() && fs::rename(file, &dest).is_err() {
            let tmp = part_path(&dest);
            fs::copy(file, &tmp)?;
            fs::rename(&tmp, &dest)?;
        }
        Ok((digest, size))
    }

    fn add_bytes(&self, bytes: &[u8]) -> Result<String> {
        let digest = format!("sha256:{}", hex(&Sha256::digest(bytes)));
        let dest = self.blob_path(&digest)?;
        if !dest.exists() {
            let tmp = part_path(&dest);
            fs::write(&tmp, bytes)?;
            fs::rename(&tmp, &dest)?;
        }
        Ok(digest)
    }

    /// Run `f` holding the store's lock. The node agents of a local cluster
    /// share one store, and `tapestry image` changes it while they run: every
    /// read-modify-write of the index happens under this lock.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        use std::os::fd::AsRawFd;
        let path = self.root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: a descriptor this function owns; closing it unlocks.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        f()
    }

    fn tag(&self, name: &str, record: ImageRecord) -> Result<()> {
        self.locked(|| {
            let mut index = self.list()?;
            index.insert(normalize(name), record);
            self.save(&index)
        })
    }

    fn record(&self, config: String, layers: Vec<String>) -> Result<ImageRecord> {
        let mut size = 0;
        for l in &layers {
            size += fs::metadata(self.blob_path(l)?)?.len();
        }
        Ok(ImageRecord {
            config,
            layers,
            size,
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
    }

    /// Make a one-layer image from a directory tree.
    pub fn build(&self, name: &str, rootfs: &Path, cmd: &[String], env: &[String]) -> Result<()> {
        if !rootfs.is_dir() {
            bail!("--rootfs {}: not a directory", rootfs.display());
        }
        let tmp = tempdir_in(&self.root.join("tmp"))?;
        let layer = tmp.join("layer.tar");
        run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("--sort=name")
            .arg("-C")
            .arg(rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."))?;
        let (diff_id, _) = self.add_blob(&layer, None)?;
        let mut envs =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        envs.extend(env.iter().cloned());
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "created": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "config": {"Env": envs, "Cmd": cmd},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        });
        let config = self.add_bytes(&serde_json::to_vec(&config)?)?;
        let _ = fs::remove_dir_all(&tmp);
        let rec = self.record(config, vec![diff_id])?;
        self.tag(name, rec)
    }

    /// An image holding one program, `/bin/NAME`, and the shared libraries
    /// it links (as `ldd` finds them on this host), tagged
    /// `REPOSITORY:VERSION-HASH` after the program's contents so a rebuilt
    /// program gets a new tag (and workloads using it roll). Built only when
    /// that tag is not in the store yet. Returns the reference.
    pub fn build_program_image(
        &self,
        repository: &str,
        version: &str,
        exe: &Path,
    ) -> Result<String> {
        let bytes = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
        let digest = hex(&Sha256::digest(&bytes));
        let reference = format!("{repository}:{version}-{}", &digest[..12]);
        if self.get(&reference)?.is_some() {
            return Ok(reference);
        }
        let name = exe
            .file_name()
            .and_then(|n| n.to_str())
            .context("the program has no file name")?;
        let tmp = tempdir_in(&self.root.join("tmp"))?;
        let rootfs = tmp.join("rootfs");
        let built = (|| -> Result<()> {
            fs::create_dir_all(rootfs.join("bin"))?;
            fs::create_dir_all(rootfs.join("tmp"))?;
            fs::copy(exe, rootfs.join("bin").join(name))?;
            for lib in shared_libraries(exe)? {
                let target = rootfs.join(lib.strip_prefix("/").unwrap_or(&lib));
                if let Some(dir) = target.parent() {
                    fs::create_dir_all(dir)?;
                }
                // Symlinked libraries are copied as the files they name.
                fs::copy(&lib, &target).with_context(|| format!("copying {}", lib.display()))?;
            }
            self.build(&reference, &rootfs, &[format!("/bin/{name}")], &[])
        })();
        let _ = fs::remove_dir_all(&tmp);
        built.with_context(|| format!("building image {reference} from {}", exe.display()))?;
        Ok(reference)
    }

    /// Import an OCI image-layout archive or a `docker save` archive.
    /// Returns the names imported.
    pub fn import(&self, archive: &Path, name: Option<&str>) -> Result<Vec<String>> {
        let tmp = tempdir_in(&self.root.join("tmp"))?;
        let result = self.import_in(archive, &tmp, name);
        let _ = fs::remove_dir_all(&tmp);
        result
    }

    fn import_in(&self, archive: &Path, tmp: &Path, name: Option<&str>) -> Result<Vec<String>> {
        run(Command::new("tar")
            .arg("--no-same-owner")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(tmp))
        .with_context(|| format!("unpacking {}", archive.display()))?;
        let mut images: Vec<(Vec<String>, String, Vec<String>)> = Vec::new();
        if tmp.join("manifest.json").exists() {
            // docker save: [{"Config": "...", "RepoTags": [...], "Layers": [...]}]
            let manifest: Value = serde_json::from_slice(&fs::read(tmp.join("manifest.json"))?)
                .context("parsing manifest.json")?;
            for entry in manifest.as_array().context("manifest.json is not a list")? {
                let config_path = entry["Config"].as_str().context("manifest.json: Config")?;
                let (config, _) = self.add_blob(&safe_join(tmp, config_path)?, None)?;
                let mut layers = Vec::new();
                for l in entry["Layers"]
                    .as_array()
                    .context("manifest.json: Layers")?
                {
                    let l = l.as_str().context("manifest.json: Layers[] not a string")?;
                    layers.push(self.add_blob(&safe_join(tmp, l)?, None)?.0);
                }
                let tags = entry["RepoTags"]
                    .as_array()
                    .map(|t| {
                        t.iter()
                            .filter_map(Value::as_str)
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                images.push((tags, config, layers));
            }
        } else if tmp.join("index.json").exists() {
            let index: Value = serde_json::from_slice(&fs::read(tmp.join("index.json"))?)
                .context("parsing index.json")?;
            for m in index["manifests"]
                .as_array()
                .context("index.json: manifests")?
            {
                let tags: Vec<String> = [
                    "io.containerd.image.name",
                    "org.opencontainers.image.ref.name",
                ]
                .iter()
                .filter_map(|k| m["annotations"][k].as_str())
                .take(1)
                .map(str::to_string)
                .collect();
                let (config, layers) = self.oci_manifest(tmp, m)?;
                images.push((tags, config, layers));
            }
        } else {
            bail!(
                "{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
                archive.display()
            );
        }
        let mut names = Vec::new();
        for (tags, config, layers) in images {
            let tags = match name {
                Some(n) => vec![n.to_string()],
                None if tags.is_empty() => bail!(
                    "{}: the archive names no image; pass --name NAME:TAG",
                    archive.display()
                ),
                None => tags,
            };
            let rec = self.record(config.clone(), layers.clone())?;
            for t in tags {
                self.tag(&t, rec.clone())?;
                names.push(normalize(&t));
            }
        }
        Ok(names)
    }

    /// Resolve an OCI descriptor (manifest or index) to config + layers.
    fn oci_manifest(&self, tmp: &Path, desc: &Value) -> Result<(String, Vec<String>)> {
        let digest = desc["digest"]
            .as_str()
            .context("descriptor without digest")?;
        let path = tmp.join("blobs/sha256").join(digest_hex(digest)?);
        let doc: Value = serde_json::from_slice(
            &fs::read(&path).with_context(|| format!("reading blob {digest}"))?,
        )?;
        if let Some(list) = doc["manifests"].as_array() {
            let pick = list
                .iter()
                .find(|m| {
                    m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64"
                })
                .or_else(|| list.first())
                .context("image index without manifests")?;
            return self.oci_manifest(tmp, pick);
        }
        let config_digest = doc["config"]["digest"]
            .as_str()
            .context("manifest: config.digest")?;
        let config_path = tmp.join("blobs/sha256").join(digest_hex(config_digest)?);
        let (config, _) = self.add_blob(&config_path, Some(config_digest))?;
        let mut layers = Vec::new();
        for l in doc["layers"].as_array().context("manifest: layers")? {
            let d = l["digest"].as_str().context("manifest: layers[].digest")?;
            let p = tmp.join("blobs/sha256").join(digest_hex(d)?);
            layers.push(self.add_blob(&p, Some(d))?.0);
        }
        Ok((config, layers))
    }

    /// Remove a name; blobs no other image uses are removed too.
    pub fn remove(&self, reference: &str) -> Result<()> {
        self.locked(|| self.remove_locked(reference))
    }

    fn remove_locked(&self, reference: &str) -> Result<()> {
        let mut index = self.list()?;
        let key = normalize(reference);
        let Some(rec) = index.remove(&key) else {
            bail!("image {key:?} not found");
        };
        self.save(&index)?;
        let in_use: std::collections::HashSet<&String> = index
            .values()
            .flat_map(|r| r.layers.iter().chain(std::iter::once(&r.config)))
            .collect();
        for d in rec.layers.iter().chain(std::iter::once(&rec.config)) {
            if !in_use.contains(d) {
                let _ = fs::remove_file(self.blob_path(d)?);
                let _ = fs::remove_dir_all(self.root.join("layers").join(digest_hex(d)?));
            }
        }
        Ok(())
    }

    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfig> {
        let doc: Value = serde_json::from_slice(&fs::read(self.blob_path(&rec.config)?)?)
            .context("parsing image config")?;
        let c = &doc["config"];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(ImageConfig {
            entrypoint: strings(&c["Entrypoint"]),
            cmd: strings(&c["Cmd"]),
            env: strings(&c["Env"]),
            working_dir: c["WorkingDir"].as_str().unwrap_or("").to_string(),
            user: c["User"].as_str().unwrap_or("").to_string(),
        })
    }

    /// The unpacked layer directories, bottom first (unpacking on demand).
    pub fn layer_dirs(&self, rec: &ImageRecord) -> Result<Vec<PathBuf>> {
        rec.layers.iter().map(|d| self.unpacked(d)).collect()
    }

    fn unpacked(&self, digest: &str) -> Result<PathBuf> {
        let layers = self.root.join("layers");
        let dir = layers.join(digest_hex(digest)?);
        if dir.join(".done").exists() {
            return Ok(dir.join("fs"));
        }
        // Pods starting together may unpack the same layer at once: each
        // unpacks into a directory of its own and the first rename wins.
        let tmp = tempdir_in(&self.root.join("tmp"))?;
        let unpacked = self.unpack_into(digest, &tmp);
        if let Err(e) = unpacked {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if fs::rename(&tmp, &dir).is_err() {
            if !dir.join(".done").exists() {
                // Left half-written by an older agent: replace it.
                let _ = fs::remove_dir_all(&dir);
                if fs::rename(&tmp, &dir).is_ok() {
                    return Ok(dir.join("fs"));
                }
            }
            let _ = fs::remove_dir_all(&tmp);
            if !dir.join(".done").exists() {
                bail!(
                    "unpacking layer {digest}: could not move it into {}",
                    dir.display()
                );
            }
        }
        Ok(dir.join("fs"))
    }

    /// Unpack a layer blob into `dir/fs` and mark it complete.
    fn unpack_into(&self, digest: &str, dir: &Path) -> Result<()> {
        let fsdir = dir.join("fs");
        fs::create_dir_all(&fsdir)?;
        // GNU tar recognises gzip/xz/zstd layers by their magic bytes.
        run(Command::new("tar")
            .arg("--numeric-owner")
            .arg("--same-permissions")
            .arg("-xf")
            .arg(self.blob_path(digest)?)
            .arg("-C")
            .arg(&fsdir))
        .with_context(|| format!("unpacking layer {digest}"))?;
        convert_whiteouts(&fsdir)?;
        fs::write(dir.join(".done"), b"")?;
        Ok(())
    }
}

fn safe_join(base: &Path, rel: &str) -> Result<PathBuf> {
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        bail!("archive path {rel:?} escapes the archive");
    }
    Ok(base.join(rel))
}

/// The shared libraries (and the loader) `exe` needs, as `ldd` lists them;
/// none for a static program.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || out.stderr.is_empty() {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {}: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
    // `/lib64/ld-linux-x86-64.so.2 (0x...)`.
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// A name no other writer of the store (thread or process) picks.
fn unique_name() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

fn tempdir_in(parent: &Path) -> Result<PathBuf> {
    let dir = parent.join(unique_name());
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Where a blob is written before it is renamed into place: two writers of
/// the same blob never truncate each other's copy.
fn part_path(dest: &Path) -> PathBuf {
    dest.with_extension(format!("{}.part", unique_name()))
}

/// OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) become overlayfs ones
/// (a 0/0 character device, the `trusted.overlay.opaque` xattr).
fn convert_whiteouts(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        let ft = entry.file_type()?;
        if name == ".wh..wh..opq" {
            fs::remove_file(&path)?;
            set_xattr(dir, "trusted.overlay.opaque", b"y")?;
        } else if let Some(target) = name.strip_prefix(".wh.") {
            fs::remove_file(&path)?;
            mknod_whiteout(&dir.join(target))?;
        } else if ft.is_dir() {
            convert_whiteouts(&path)?;
        }
    }
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<()> {
    let p = crate::sys::cstr(path)?;
    let n = std::ffi::CString::new(name)?;
    // SAFETY: valid NUL-terminated strings and a live buffer.
    let rc = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setxattr {name} on {}", path.display()));
    }
    Ok(())
}

fn mknod_whiteout(path: &Path) -> Result<()> {
    let p = crate::sys::cstr(path)?;
    // SAFETY: valid path; a 0/0 character device is overlayfs' whiteout.
    let rc = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("whiteout {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalize() {
        assert_eq!(normalize("busybox"), "busybox:latest");
        assert_eq!(normalize("docker.io/library/busybox:1.36"), "busybox:1.36");
        assert_eq!(normalize("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(normalize("busybox:local"), "busybox:local");
    }

    #[test]
    fn build_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("rootfs");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::write(root.join("bin/hello"), b"hi").unwrap();
        let store = ImageStore::open(&dir.path().join("images")).unwrap();
        store
            .build("hello:1", &root, &["/bin/hello".into()], &[])
            .unwrap();
        let rec = store.get("hello:1").unwrap().expect("image");
        assert_eq!(rec.layers.len(), 1);
        let cfg = store.config(&rec).unwrap();
        assert_eq!(cfg.cmd, vec!["/bin/hello"]);
        let dirs = store.layer_dirs(&rec).unwrap();
        assert_eq!(fs::read(dirs[0].join("bin/hello")).unwrap(), b"hi");
        store.remove("hello:1").unwrap();
        assert!(store.get("hello:1").unwrap().is_none());
        assert!(store.remove("hello:1").is_err());
    }
}
