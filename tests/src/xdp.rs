//! A trivial XDP program (`return XDP_PASS` or `XDP_DROP`), loaded with two raw `bpf(2)`
//! calls, for measuring what XDP itself costs on the test path: capacity numbers without
//! the agent, but with an XDP hook in the same place and mode as the agent's.

use std::mem::size_of;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;

/// XDP attach modes, as in the policy's `xdp_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpMode {
    Generic,
    Native,
}

/// What the trivial program returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass = 2,
    Drop = 1,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i32> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the stated size; the kernel
    // treats missing trailing fields as zero.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc as i32)
}

/// An attached XDP program; detached when dropped (it is held by a bpf link, not pinned).
#[derive(Debug)]
pub struct XdpGuard {
    _link: OwnedFd,
    _prog: OwnedFd,
}

/// Attaches `return verdict` to `ifname` inside `ns`.
pub fn attach_trivial(
    ns: &Netns,
    ifname: &str,
    mode: XdpMode,
    verdict: Verdict,
) -> Result<XdpGuard> {
    let ifname = ifname.to_owned();
    ns.run(move || -> Result<XdpGuard> {
        // r0 = verdict; exit
        let insns: [u64; 2] = [
            u64::from_le_bytes([0xb7, 0, 0, 0, verdict as u8, 0, 0, 0]),
            u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
        ];
        let license = b"GPL\0";
        let mut name = [0u8; 16];
        name[..9].copy_from_slice(b"agt_xdp_t");
        let mut load = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_XDP,
            ..Default::default()
        };
        let prog =
            bpf(BPF_PROG_LOAD, &mut load).context("BPF_PROG_LOAD of a trivial XDP program")?;
        // SAFETY: a fresh fd returned by the kernel.
        let prog = unsafe { OwnedFd::from_raw_fd(prog) };
        let cname = std::ffi::CString::new(ifname.clone())?;
        // SAFETY: a valid C string.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            bail!("no interface {ifname} in this namespace");
        }
        let mut link = LinkCreateAttr {
            prog_fd: std::os::fd::AsRawFd::as_raw_fd(&prog) as u32,
            target_ifindex: ifindex,
            attach_type: BPF_XDP,
            flags: match mode {
                XdpMode::Generic => XDP_FLAGS_SKB_MODE,
                XdpMode::Native => XDP_FLAGS_DRV_MODE,
            },
        };
        let link = bpf(BPF_LINK_CREATE, &mut link)
            .with_context(|| format!("BPF_LINK_CREATE XDP {mode:?} on {ifname}"))?;
        // SAFETY: a fresh fd returned by the kernel.
        let link = unsafe { OwnedFd::from_raw_fd(link) };
        Ok(XdpGuard {
            _link: link,
            _prog: prog,
        })
    })?
}
