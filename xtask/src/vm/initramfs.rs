//! The VM's root file system: cpio (newc) archives the kernel unpacks into its rootfs.
//!
//! Two archives, concatenated (the kernel unpacks one after the other, as with early microcode):
//! a common one (busybox, iproute2 and the other tools, the test binaries, the libraries `ldd`
//! lists) built once per run, and a small one per kernel holding its modules and `/init`.
//! Uncompressed: decompressing under TCG costs more than loading the bytes.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{self, Write as _},
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::cmd::{self, CmdError};

/// Debian's busybox-static: no libraries, every applet a link to it.
const BUSYBOX: &str = "/bin/busybox";
/// Real tools the tests run through PATH. Busybox has applets of the same names (and of
/// iproute2's parts) that lack what the tests need (`ip link add ... type veth`): no such
/// applet gets a link, so PATH finds these. Busybox's `setpriv` has no `--bounding-set`,
/// which tests/privilege.rs needs.
const TOOLS: &[&str] = &["ip", "tc", "ethtool", "bpftool", "ping", "curl", "setpriv"];
const SHADOWED_APPLETS: &[&str] = &[
    "ip", "ipaddr", "iplink", "ipneigh", "iproute", "iprule", "iptunnel", "tc", "ping", "ping6",
    "setpriv",
];
/// Merged /usr, as on the host: the loader path `ldd` prints (`/lib64/...`) works either way.
const USR_MERGE: &[(&str, &str)] = &[
    ("bin", "usr/bin"),
    ("sbin", "usr/sbin"),
    ("lib", "usr/lib"),
    ("lib64", "usr/lib64"),
];
const SKELETON: &[&str] = &[
    "usr/bin",
    "usr/sbin",
    "usr/lib",
    "usr/lib64",
    "dev",
    "proc",
    "sys",
    "tmp",
    "run",
    "root",
    "etc",
    "var",
];
/// Minimal name service: the tests use addresses, but glibc still reads these.
const ETC_FILES: &[(&str, &str)] = &[
    ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
    (
        "etc/nsswitch.conf",
        "hosts: files\npasswd: files\ngroup: files\n",
    ),
    ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
    ("etc/group", "root:x:0:\n"),
];

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Cmd(#[from] CmdError),
    #[error(
        "`{tool}` is not installed (searched PATH, /usr/sbin, /sbin); `cargo xtask setup` installs it"
    )]
    NoTool { tool: String },
    #[error("{action} {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InitramfsError {
    let path = path.to_owned();
    move |source| InitramfsError::Io {
        action,
        path,
        source,
    }
}

/// A directory being filled with what one archive will hold.
pub struct Staging {
    root: PathBuf,
}

impl Staging {
    /// An empty staging directory at `root` (whatever was there is removed).
    pub fn new(root: &Path) -> Result<Self, InitramfsError> {
        if root.exists() {
            fs::remove_dir_all(root).map_err(io_error("remove", root))?;
        }
        fs::create_dir_all(root).map_err(io_error("create", root))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Where the guest's absolute `path` lives in the staging directory.
    fn host_path(&self, guest: &Path) -> PathBuf {
        self.root.join(guest.strip_prefix("/").unwrap_or(guest))
    }

    fn parent_dirs(&self, guest: &Path) -> Result<PathBuf, InitramfsError> {
        let dest = self.host_path(guest);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
        }
        Ok(dest)
    }

    pub fn dir(&self, guest: &str) -> Result<(), InitramfsError> {
        let dest = self.host_path(Path::new(guest));
        fs::create_dir_all(&dest).map_err(io_error("create", &dest))
    }

    pub fn symlink(&self, guest: &str, target: &str) -> Result<(), InitramfsError> {
        let dest = self.parent_dirs(Path::new(guest))?;
        symlink(target, &dest).map_err(io_error("symlink", &dest))
    }

    pub fn text(&self, guest: &str, text: &str, mode: u32) -> Result<(), InitramfsError> {
        let dest = self.parent_dirs(Path::new(guest))?;
        fs::write(&dest, text).map_err(io_error("write", &dest))?;
        set_mode(&dest, mode)
    }

    /// Copies `src` (following links) to the guest's `guest`.
    pub fn copy(&self, src: &Path, guest: &Path) -> Result<(), InitramfsError> {
        let dest = self.parent_dirs(guest)?;
        fs::copy(src, &dest).map_err(io_error("copy to", &dest))?;
        Ok(())
    }

    /// Copies a directory tree (regular files and directories).
    pub fn copy_tree(&self, src: &Path, guest: &Path) -> Result<(), InitramfsError> {
        for entry in fs::read_dir(src).map_err(io_error("read", src))? {
            let entry = entry.map_err(io_error("read", src))?;
            let path = entry.path();
            let to = guest.join(entry.file_name());
            if path.is_dir() {
                self.copy_tree(&path, &to)?;
            } else {
                self.copy(&path, &to)?;
            }
        }
        Ok(())
    }

    /// Copies an executable without its debug info (a tenth of the size: less to load and
    /// unpack), then the libraries it needs.
    pub fn executable(
        &self,
        src: &Path,
        guest: &Path,
        libs: &mut Libraries,
    ) -> Result<(), InitramfsError> {
        let dest = self.parent_dirs(guest)?;
        cmd::output(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&dest)
                .arg(src),
        )?;
        libs.add_needed_by(src)
    }

    /// Writes the staged tree as one newc archive.
    pub fn write_cpio(&self, out: &Path) -> Result<(), InitramfsError> {
        let mut names = Vec::new();
        list(&self.root, Path::new(""), &mut names).map_err(io_error("read", &self.root))?;
        let file = File::create(out).map_err(io_error("create", out))?;
        let mut cpio = Command::new("cpio");
        // Owned by root in the guest whoever built it; names come one a line on stdin.
        cpio.args(["--create", "--format=newc", "--owner=0:0", "--quiet"])
            .current_dir(&self.root)
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(Stdio::piped());
        let described = cmd::describe(&cpio);
        let spawn_error = |source| CmdError::Spawn {
            cmd: described.clone(),
            source,
        };
        let mut child = cpio.spawn().map_err(spawn_error)?;
        if let Some(mut stdin) = child.stdin.take() {
            // cpio reads names as it archives and writes to the file, never to us: no deadlock.
            let mut text = String::new();
            for name in &names {
                text.push_str(&name.to_string_lossy());
                text.push('\n');
            }
            stdin
                .write_all(text.as_bytes())
                .map_err(io_error("write names to cpio for", out))?;
        }
        let result = child.wait_with_output().map_err(spawn_error)?;
        if !result.status.success() {
            return Err(CmdError::Failed {
                cmd: described,
                status: result.status,
                stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
            }
            .into());
        }
        Ok(())
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<(), InitramfsError> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_error("chmod", path))
}

/// Every entry below `dir`, each directory before its contents (the kernel's unpacker creates
/// no missing parents), in a stable order.
fn list(base: &Path, rel: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(base.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for name in entries {
        let path = rel.join(&name);
        out.push(path.clone());
        let meta = fs::symlink_metadata(base.join(&path))?;
        if meta.is_dir() {
            list(base, &path, out)?;
        }
    }
    Ok(())
}

/// Shared libraries `ldd` lists for the staged executables, copied once each at the end.
#[derive(Default)]
pub struct Libraries {
    paths: BTreeSet<PathBuf>,
}

impl Libraries {
    pub fn add_needed_by(&mut self, binary: &Path) -> Result<(), InitramfsError> {
        let mut ldd = Command::new("ldd");
        ldd.arg(binary);
        let text = match cmd::output(&mut ldd) {
            Ok(text) => text,
            // A static binary: ldd says so and fails.
            Err(CmdError::Failed { stderr, .. }) if stderr.contains("not a dynamic executable") => {
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.paths.extend(parse_ldd(&text));
        Ok(())
    }

    pub fn install(&self, staging: &Staging) -> Result<(), InitramfsError> {
        for lib in &self.paths {
            staging.copy(lib, lib)?;
        }
        Ok(())
    }
}

/// The files in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and the loader
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let file = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = file.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Where `tool` is on this machine: PATH, then the sbin directories a non-root PATH lacks.
fn find_tool(tool: &str) -> Result<PathBuf, InitramfsError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| InitramfsError::NoTool {
            tool: tool.to_owned(),
        })
}

/// The directory layout, busybox with its applet links, and the files under /etc.
pub fn base(staging: &Staging) -> Result<(), InitramfsError> {
    for dir in SKELETON {
        staging.dir(dir)?;
    }
    for (link, target) in USR_MERGE {
        staging.symlink(link, target)?;
    }
    // /var/run/netns is where `ip netns add` keeps its mounts.
    staging.symlink("var/run", "../run")?;
    let busybox = Path::new(BUSYBOX);
    if !busybox.is_file() {
        return Err(InitramfsError::NoTool {
            tool: "busybox (Debian package busybox-static)".into(),
        });
    }
    staging.copy(busybox, Path::new("/usr/bin/busybox"))?;
    let applets = cmd::output(Command::new(busybox).arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let name = applet.rsplit('/').next().unwrap_or(applet);
        if SHADOWED_APPLETS.contains(&name) || name == "busybox" {
            continue;
        }
        // `bin/sh` and `usr/bin/sh` are one directory here: link each name once.
        let guest = format!("usr/{}", applet.trim_start_matches("usr/"));
        if fs::symlink_metadata(staging.host_path(Path::new(&guest))).is_err() {
            staging.symlink(&guest, "/usr/bin/busybox")?;
        }
    }
    for (path, text) in ETC_FILES {
        staging.text(path, text, 0o644)?;
    }
    Ok(())
}

/// The real tools the tests call, under /usr/sbin, with their libraries queued in `libs`.
pub fn tools(staging: &Staging, libs: &mut Libraries) -> Result<(), InitramfsError> {
    for tool in TOOLS {
        let src = find_tool(tool)?;
        staging.copy(&src, &Path::new("/usr/sbin").join(tool))?;
        libs.add_needed_by(&src)?;
    }
    Ok(())
}

/// Copies a kernel module, decompressed (busybox `insmod` takes plain `.ko` only).
pub fn module(staging: &Staging, src: &Path, guest: &Path) -> Result<(), InitramfsError> {
    let name = src.to_string_lossy();
    let decompressor = [(".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")]
        .iter()
        .find(|(ext, _)| name.ends_with(ext));
    let Some((_, program)) = decompressor else {
        return staging.copy(src, guest);
    };
    let dest = staging.parent_dirs(guest)?;
    let out = File::create(&dest).map_err(io_error("create", &dest))?;
    let mut decompress = Command::new(program);
    decompress.args(["-d", "-c"]).arg(src).stdout(out);
    cmd::run(&mut decompress)?;
    Ok(())
}

/// `'...'` for sh, whatever `s` holds.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Concatenates archives into `out`.
pub fn concat(parts: &[&Path], out: &Path) -> Result<(), InitramfsError> {
    let mut file = File::create(out).map_err(io_error("create", out))?;
    for part in parts {
        let mut input = File::open(part).map_err(io_error("open", part))?;
        io::copy(&mut input, &mut file).map_err(io_error("append to", out))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_files_ldd_lists() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \tlibgone.so.1 => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn quotes_for_sh() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
