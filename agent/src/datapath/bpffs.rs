//! The few BPF filesystem operations aya does not expose: whether a path is on bpffs, a
//! descriptor for a pinned object and pinning a descriptor (aya's `FdLink` hides its
//! descriptor, which the watchdog needs to re-pin a link and to see whether it is still
//! attached).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// `statfs.f_type` of a BPF filesystem (`BPF_FS_MAGIC`, linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `enum bpf_cmd` (linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;

/// The `BPF_OBJ_*` member of `union bpf_attr`.
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// Whether `path` (which exists) is on a BPF filesystem.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = c_path(path)?;
    // SAFETY: zeroed is a valid statfs; the kernel fills it.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and struct.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn bpf_obj(cmd: libc::c_long, path: &Path, fd: u32) -> io::Result<libc::c_long> {
    let c = c_path(path)?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
    };
    // SAFETY: `attr` is a valid prefix of `union bpf_attr` for this command; the kernel
    // reads `size_of` bytes and the path, which outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &attr as *const ObjAttr,
            std::mem::size_of::<ObjAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new descriptor for the object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let fd = bpf_obj(BPF_OBJ_GET, path, 0)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the object `fd` refers to at `path`.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    bpf_obj(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32).map(|_| ())
}

/// The interface a link (XDP or TCX) is attached to, from its fdinfo: 0 once detached
/// (`bpftool link detach`, the interface gone). `None` when the kernel does not say.
pub fn link_ifindex(fd: BorrowedFd<'_>) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    agent_common::fdinfo::field(&text, "ifindex")?.parse().ok()
}
