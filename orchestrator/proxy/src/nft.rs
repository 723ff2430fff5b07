//! Talking to the kernel through libnftables (the library behind `nft`,
//! loaded at run time): one transaction per sync (all of it applies or none
//! of it), as libnftables JSON for a full sync and as text for an
//! incremental one (see [`crate::script`]), and the table's current chains
//! and sets before a full sync.
//!
//! One context stays open for the proxy's life. Each `nft` process opens
//! and closes a netlink socket, and closing it after a transaction that
//! rewrote a chain waits for the kernel to release the old rules (an RCU
//! grace period, about 10 ms): most of what one change would cost.

use std::collections::BTreeSet;
use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::ptr::NonNull;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::rules::{self, document, Existing, Table};
use crate::script;

/// `NFT_CTX_OUTPUT_JSON`: JSON listings, and JSON input is accepted.
const OUTPUT_JSON: c_uint = 1 << 4;

/// libnftables' entry points (`libnftables.so.1`, installed with nft).
struct Library {
    ctx_new: unsafe extern "C" fn(u32) -> *mut c_void,
    ctx_free: unsafe extern "C" fn(*mut c_void),
    set_output_flags: unsafe extern "C" fn(*mut c_void, c_uint),
    buffer_output: unsafe extern "C" fn(*mut c_void) -> c_int,
    buffer_error: unsafe extern "C" fn(*mut c_void) -> c_int,
    output_buffer: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    error_buffer: unsafe extern "C" fn(*mut c_void) -> *const c_char,
    run: unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int,
    /// Keeps the functions above mapped.
    _lib: libloading::Library,
}

impl Library {
    fn load() -> Result<Library> {
        // SAFETY: loading libnftables runs no initialisers with
        // preconditions, and each symbol is typed as libnftables.h declares.
        unsafe {
            let lib = libloading::Library::new("libnftables.so.1")
                .context("loading libnftables.so.1 (is nftables installed?)")?;
            macro_rules! symbol {
                ($name:literal) => {
                    *lib.get(concat!($name, "\0").as_bytes())
                        .context(concat!("libnftables lacks ", $name))?
                };
            }
            Ok(Library {
                ctx_new: symbol!("nft_ctx_new"),
                ctx_free: symbol!("nft_ctx_free"),
                set_output_flags: symbol!("nft_ctx_output_set_flags"),
                buffer_output: symbol!("nft_ctx_buffer_output"),
                buffer_error: symbol!("nft_ctx_buffer_error"),
                output_buffer: symbol!("nft_ctx_get_output_buffer"),
                error_buffer: symbol!("nft_ctx_get_error_buffer"),
                run: symbol!("nft_run_cmd_from_buffer"),
                _lib: lib,
            })
        }
    }
}

/// A libnftables context, bound to the network namespace of the thread
/// that opened it.
pub struct Nft {
    lib: Library,
    ctx: NonNull<c_void>,
}

// SAFETY: a context is used by one thread at a time (`&mut self`), and
// libnftables keeps no thread-local state.
unsafe impl Send for Nft {}

impl Nft {
    /// A context in the calling thread's network namespace.
    pub fn open() -> Result<Nft> {
        let lib = Library::load()?;
        let ctx = new_context(&lib)?;
        Ok(Nft { lib, ctx })
    }

    /// Apply `cmds` (libnftables JSON) as one transaction: a full sync.
    ///
    /// The context is then replaced by a fresh one. libnftables keeps every
    /// object a transaction named in its cache and frees that cache at the
    /// next command; after a full sync of 10,000 Services that took tens
    /// of milliseconds, which landed on the first change to follow.
    pub fn apply(&mut self, cmds: Vec<Value>) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        let applied = self
            .run(&serde_json::to_string(&document(cmds))?, true)
            .map(drop);
        let fresh = new_context(&self.lib)?;
        let spent = std::mem::replace(&mut self.ctx, fresh);
        // SAFETY: the old context is not used after this.
        unsafe { (self.lib.ctx_free)(spent.as_ptr()) };
        applied
    }

    /// Apply an incremental sync's commands as one transaction.
    pub fn apply_commands(&mut self, cmds: &[rules::Command]) -> Result<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        self.run(&script::render(cmds)?, false).map(drop)
    }

    /// The chains, sets and maps the proxy's tables hold now (none for a
    /// table that does not exist).
    pub fn existing(&mut self) -> Result<Existing> {
        let mut found = Existing {
            tables: self.tables()?,
            ..Existing::default()
        };
        for &table in &found.tables {
            let listing = self.run(&format!("list table ip {}", table.name()), true)?;
            let listing: Value = serde_json::from_str(&listing).context("parsing nft's listing")?;
            for object in listing["nftables"].as_array().into_iter().flatten() {
                for (kind, names) in [
                    ("chain", &mut found.chains),
                    ("set", &mut found.sets),
                    ("map", &mut found.maps),
                ] {
                    if let Some(name) = object[kind]["name"].as_str() {
                        names.insert((table, name.to_string()));
                    }
                }
            }
        }
        Ok(found)
    }

    /// Remove the proxy's tables and everything in them (at shutdown of a
    /// local node); tables that are not there are already removed.
    pub fn delete_tables(&mut self) -> Result<()> {
        for table in self.tables()? {
            self.run(&format!("delete table ip {}", table.name()), false)
                .with_context(|| format!("deleting table ip {}", table.name()))?;
        }
        Ok(())
    }

    /// The proxy's `ip` tables there are.
    fn tables(&mut self) -> Result<BTreeSet<Table>> {
        let listing = self.run("list tables ip", true)?;
        let listing: Value = serde_json::from_str(&listing).context("parsing nft's listing")?;
        Ok(listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| Table::parse(o["table"]["name"].as_str()?))
            .collect())
    }

    /// Run `input`; what it printed, or nft's error message.
    fn run(&mut self, input: &str, json: bool) -> Result<String> {
        let input = CString::new(input).context("a NUL byte in nft's input")?;
        let ctx = self.ctx.as_ptr();
        // SAFETY: a live context and a NUL-terminated input; the buffers
        // libnftables returns stay valid until its next call on `ctx`, and
        // are copied before that.
        unsafe {
            (self.lib.set_output_flags)(ctx, if json { OUTPUT_JSON } else { 0 });
            let rc = (self.lib.run)(ctx, input.as_ptr());
            let output = text((self.lib.output_buffer)(ctx));
            let error = text((self.lib.error_buffer)(ctx));
            if rc != 0 {
                bail!("nft refused the transaction: {}", error.trim());
            }
            Ok(output)
        }
    }
}

/// A context that buffers its output and errors, in the calling thread's
/// network namespace.
fn new_context(lib: &Library) -> Result<NonNull<c_void>> {
    // SAFETY: plain constructor; null means failure.
    let ctx = NonNull::new(unsafe { (lib.ctx_new)(0) }).context("nft_ctx_new failed")?;
    // SAFETY: a live context, freed here if it cannot be used.
    unsafe {
        if (lib.buffer_output)(ctx.as_ptr()) != 0 || (lib.buffer_error)(ctx.as_ptr()) != 0 {
            (lib.ctx_free)(ctx.as_ptr());
            bail!("libnftables could not buffer its output");
        }
    }
    Ok(ctx)
}

/// A C string libnftables returned, copied.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    CStr::from_ptr(p).to_string_lossy().into_owned()
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: the context is live and not used after this.
        unsafe { (self.lib.ctx_free)(self.ctx.as_ptr()) }
    }
}

/// Apply `cmds` (libnftables JSON) as one transaction, in the calling
/// thread's network namespace: for one-off tables.
pub fn apply(cmds: Vec<Value>) -> Result<()> {
    Nft::open()?.apply(cmds)
}
