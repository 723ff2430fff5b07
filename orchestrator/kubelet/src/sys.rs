//! Thin wrappers over the system calls the node agent makes directly.

use std::ffi::{CStr, CString};
use std::path::Path;

use anyhow::Result;

/// A path as the NUL-terminated string system calls take.
pub fn cstr(p: &Path) -> Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    Ok(CString::new(p.as_os_str().as_bytes())?)
}

/// mount(2), with the OS error on failure.
pub fn mount(
    source: &CStr,
    target: &CStr,
    fstype: &CStr,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> std::io::Result<()> {
    let data = data.map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: NUL-terminated strings that outlive the call; data may be null.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reclaim the memory still charged to an emptied cgroup-v1 memory cgroup
/// (mostly page cache) before it is removed. Otherwise the removed cgroup
/// lingers in the kernel as long as any of those pages stay cached, and
/// every lingering one makes memory accounting slower for the whole node.
/// Directories of other controllers have no such file; errors are ignored.
pub fn release_memory_at(dir: &Path) {
    use std::io::Write;
    // Never create the file: only a memory cgroup has it.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("memory.force_empty"))
    {
        let _ = f.write_all(b"0");
    }
}

/// The cgroup-v1 memory directory of a cgroup path as given to the OCI
/// runtime (`/tapestry/podUID/ID`).
pub fn memory_cgroup_dir(cgroup: &str) -> std::path::PathBuf {
    Path::new("/sys/fs/cgroup/memory").join(cgroup.trim_start_matches('/'))
}
