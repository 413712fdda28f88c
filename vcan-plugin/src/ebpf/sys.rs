//! The few raw `bpf(2)` and `statfs(2)` calls aya 0.14 does not expose: loading a program from
//! raw instructions (the per-attachment entry programs), its id, attaching and pinning it as a
//! TCX link, whether a program id is still loaded, which interface a pinned TCX link is attached
//! to, and whether a directory is on bpffs.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_PROG_TYPE_SCHED_CLS`: a tc classifier.
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `BPF_LINK_TYPE_TCX` (enum bpf_link_type in linux/bpf.h).
const BPF_LINK_TYPE_TCX: u32 = 11;

/// `union bpf_attr` is large; the kernel only reads the prefix a command uses and requires the
/// rest to be zero, so a zeroed, 8-byte aligned buffer of this size serves every command here.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, offset: usize, v: u32) {
        self.0[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
    }
    fn put_u64(&mut self, offset: usize, v: u64) {
        self.0[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
    }
}

/// Calls `bpf(2)` with `cmd` and `attr`.
///
/// # Safety
///
/// Every address written into `attr` (paths, info buffers, instruction and log buffers) must
/// point to memory that is valid for the whole call, of at least the size `cmd` reads or writes
/// there (the lengths given alongside in `attr`), and writable where the kernel writes.
unsafe fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` itself is a live, writable buffer of the size passed; the addresses inside it
    // are the caller's contract.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Reads up to `count` entries of the hash map `map` with one `BPF_MAP_LOOKUP_BATCH`, starting
/// at `position` (`None`: the beginning) into `keys` and `values` (`key_size` and `value_size`
/// bytes per entry; a per-CPU map's value is one 8-byte aligned value per possible CPU). Returns
/// how many entries were read and where the next call goes on, `None` once the map is done.
///
/// One call replaces `count` lookups: reading every attachment's counters for a scrape is a few
/// system calls instead of two per interface.
pub fn lookup_batch(
    map: BorrowedFd<'_>,
    position: Option<u32>,
    keys: &mut [u8],
    key_size: usize,
    values: &mut [u8],
    value_size: usize,
) -> io::Result<(usize, Option<u32>)> {
    let count = (keys.len() / key_size.max(1)).min(values.len() / value_size.max(1));
    let count = u32::try_from(count).map_err(|_| io::Error::other("batch too large"))?;
    let mut in_batch = position.unwrap_or(0);
    let mut out_batch = 0u32;
    let mut attr = Attr::new();
    if position.is_some() {
        attr.put_u64(0, (&mut in_batch as *mut u32) as u64);
    }
    attr.put_u64(8, (&mut out_batch as *mut u32) as u64);
    attr.put_u64(16, keys.as_mut_ptr() as u64);
    attr.put_u64(24, values.as_mut_ptr() as u64);
    attr.put_u32(32, count);
    attr.put_u32(36, map.as_raw_fd() as u32);
    // SAFETY: the kernel reads the position (4 bytes, a hash map's batch token), writes the next
    // one and at most `count` keys and values into buffers checked above to hold them, all of
    // which outlive the call.
    let result = unsafe { sys_bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
    // The kernel writes back how many entries it copied, also when it reached the end.
    let mut read = [0u8; 4];
    read.copy_from_slice(&attr.0[32..36]);
    let read = u32::from_ne_bytes(read) as usize;
    match result {
        Ok(_) => Ok((read, Some(out_batch))),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok((read, None)),
        Err(e) => Err(e),
    }
}

/// A command that returns a new file descriptor.
///
/// # Safety
///
/// As for [`sys_bpf`].
unsafe fn bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: the caller's contract is sys_bpf's.
    let rc = unsafe { sys_bpf(cmd, attr) }?;
    let fd = i32::try_from(rc).map_err(|_| io::Error::other("bpf(2) returned a bad fd"))?;
    // SAFETY: the command returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads a tc classifier from raw instructions (8 bytes each, `struct bpf_insn`) under `name`
/// (at most 15 bytes). On a rejection the error carries the verifier's log.
pub fn load_classifier(insns: &[[u8; 8]], name: &str, license: &str) -> io::Result<OwnedFd> {
    let license = CString::new(license).map_err(|_| io::Error::other("license contains NUL"))?;
    let load = |log: Option<&mut Vec<u8>>| {
        let mut attr = Attr::new();
        attr.put_u32(0, BPF_PROG_TYPE_SCHED_CLS);
        attr.put_u32(4, insns.len() as u32);
        attr.put_u64(8, insns.as_ptr() as u64);
        attr.put_u64(16, license.as_ptr() as u64);
        if let Some(log) = log {
            attr.put_u32(24, 1); // log_level
            attr.put_u32(28, log.len() as u32);
            attr.put_u64(32, log.as_mut_ptr() as u64);
        }
        let n = name.len().min(15);
        attr.0[48..48 + n].copy_from_slice(&name.as_bytes()[..n]); // prog_name
        // SAFETY: the kernel reads `insns` and `license` and writes at most log_size bytes of
        // `log`, all of which outlive the call.
        unsafe { bpf_fd(BPF_PROG_LOAD, &mut attr) }
    };
    match load(None) {
        Ok(fd) => Ok(fd),
        Err(e)
            if e.raw_os_error() == Some(libc::EACCES) || e.raw_os_error() == Some(libc::EINVAL) =>
        {
            // Load again with the verifier's log, which is what explains a rejection.
            let mut log = vec![0u8; 64 * 1024];
            match load(Some(&mut log)) {
                Ok(fd) => Ok(fd),
                Err(_) => {
                    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                    Err(io::Error::new(
                        e.kind(),
                        format!(
                            "{e}; verifier log:\n{}",
                            String::from_utf8_lossy(&log[..end])
                        ),
                    ))
                }
            }
        }
        Err(e) => Err(e),
    }
}

/// The kernel id of a loaded program.
pub fn prog_id(prog: &OwnedFd) -> io::Result<u32> {
    // struct bpf_prog_info: type @0, id @4, ... (the kernel fills at most info_len bytes).
    let mut info = [0u32; 16];
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32);
    attr.put_u32(4, std::mem::size_of_val(&info) as u32);
    attr.put_u64(8, info.as_mut_ptr() as u64);
    // SAFETY: `info` is writable, of the length given, and outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info[1])
}

/// Attaches `prog` to interface `ifindex` of the calling thread's namespace as a TCX link
/// (`attach_type` is `BPF_TCX_INGRESS` or `BPF_TCX_EGRESS`) and pins the link at `pin`, which then
/// holds it: the returned fd may be dropped.
pub fn tcx_attach_and_pin(
    prog: &OwnedFd,
    ifindex: u32,
    attach_type: u32,
    pin: &Path,
) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, prog.as_raw_fd() as u32); // prog_fd
    attr.put_u32(4, ifindex); // target_ifindex
    attr.put_u32(8, attach_type);
    // flags, relative_fd and expected_revision stay 0: append after whatever is attached.
    // SAFETY: this command's attributes hold no addresses.
    let link = unsafe { bpf_fd(BPF_LINK_CREATE, &mut attr) }?;
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("pin path contains a NUL byte"))?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64); // pathname
    attr.put_u32(8, link.as_raw_fd() as u32); // bpf_fd
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }?;
    Ok(())
}

/// Whether a program with this id is still loaded. Our loader keeps no program fds after
/// attaching, so for clsact attachments this is "still attached somewhere": the kernel frees a
/// program (and its id) once the last filter using it is gone with its interface.
pub fn prog_exists(id: u32) -> io::Result<bool> {
    if id == 0 {
        return Ok(false);
    }
    let mut attr = Attr::new();
    attr.put_u32(0, id); // prog_id
    // SAFETY: this command's attributes hold no addresses.
    match unsafe { bpf_fd(BPF_PROG_GET_FD_BY_ID, &mut attr) } {
        Ok(_fd) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The interface a pinned TCX link is attached to: `Ok(None)` when the pin does not exist or
/// the link's device is gone (the kernel clears it when the device is unregistered).
pub fn tcx_link_ifindex(pin: &Path) -> io::Result<Option<u32>> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("pin path contains a NUL byte"))?;
    let mut attr = Attr::new();
    attr.put_u64(0, path.as_ptr() as u64); // pathname
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    let fd = match unsafe { bpf_fd(BPF_OBJ_GET, &mut attr) } {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    // struct bpf_link_info: type @0, id @4, prog_id @8, then an 8-aligned union whose tcx
    // member is { ifindex @16, attach_type @20 }.
    let mut info = [0u64; 16];
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32); // info.bpf_fd
    attr.put_u32(4, std::mem::size_of_val(&info) as u32); // info.info_len
    attr.put_u64(8, info.as_mut_ptr() as u64); // info.info
    // SAFETY: the kernel writes at most `info_len` bytes into `info`, which outlives the call.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let link_type = info[0] as u32;
    let ifindex = info[2] as u32;
    if link_type != BPF_LINK_TYPE_TCX {
        return Err(io::Error::other(format!(
            "{} is not a TCX link (type {link_type})",
            pin.display()
        )));
    }
    Ok((ifindex != 0).then_some(ifindex))
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    // SAFETY: statfs writes a struct statfs into `buf`, which is zero-initialised and owned.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string and buf a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between architectures
    Ok(buf.f_type as i64 == BPF_FS_MAGIC)
}
