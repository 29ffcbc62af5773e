//! Unix-socket plumbing: the private socket directory, peer credentials, fd passing.

use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, MsgFlags, getsockopt, recvmsg, sendmsg,
    sockopt::PeerCredentials,
};

use crate::error::{Result, StoreError};

/// The default socket: `$XDG_RUNTIME_DIR/trove/troved.sock`, else `/tmp/trove-$UID/troved.sock`.
pub fn default_socket_path() -> PathBuf {
    let uid = nix::unistd::getuid().as_raw();
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("trove").join("troved.sock"),
        _ => PathBuf::from(format!("/tmp/trove-{uid}")).join("troved.sock"),
    }
}

/// Creates the socket's directory with mode 0700 if missing; if it exists it must be a
/// directory owned by us and not accessible to group or others.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // Umask may have cleared bits but never adds any; make it exact.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
            Ok(())
        }
        Err(e) => Err(e.into()),
        Ok(m) => {
            let uid = nix::unistd::getuid().as_raw();
            if !m.is_dir() {
                return Err(StoreError::InvalidRequest(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            if m.uid() != uid {
                return Err(StoreError::Refused(format!(
                    "socket directory {} belongs to uid {}, not {uid}",
                    dir.display(),
                    m.uid()
                )));
            }
            if m.mode() & 0o077 != 0 {
                return Err(StoreError::Refused(format!(
                    "socket directory {} has mode {:o}: must be 0700",
                    dir.display(),
                    m.mode() & 0o777
                )));
            }
            Ok(())
        }
    }
}

/// The uid and pid of the process at the other end.
pub fn peer_cred(s: &UnixStream) -> Result<(u32, i32)> {
    let c = getsockopt(s, PeerCredentials)?;
    Ok((c.uid(), c.pid()))
}

/// Sends `data` with `fd` attached (SCM_RIGHTS).
pub fn send_with_fd(s: &UnixStream, data: &[u8], fd: BorrowedFd<'_>) -> Result<()> {
    let iov = [IoSlice::new(data)];
    let fds = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let n = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)?;
    if n != data.len() {
        return Err(StoreError::Protocol("short write of the welcome".into()));
    }
    Ok(())
}

/// Receives exactly one frame of `len` bytes that carries one fd.
pub fn recv_with_fd(s: &UnixStream, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed this fd in our table for us; we own it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    Ok((msg.bytes, fd))
}

/// Sends without blocking; a full socket buffer is an error (the peer is not reading).
pub fn send_nonblocking(s: &UnixStream, data: &[u8]) -> io::Result<()> {
    let n = nix::sys::socket::send(
        s.as_raw_fd(),
        data,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    )
    .map_err(io::Error::from)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "partial write to a client that is not reading",
        ));
    }
    Ok(())
}
