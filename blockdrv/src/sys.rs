//! The few file syscalls std does not wrap, in one place: hole punching and zeroing, hole/data
//! seeks, read-ahead advice, positioned reads into memory that is not zeroed first, and sending
//! a file's bytes to a socket without copying them (`sendfile`). Every `unsafe` of blockdrv's
//! storage code is here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `fallocate(2)` on `[offset, offset + length)` of `file` with `mode`.
pub fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    let (off, len) = (off_t(offset)?, off_t(length)?);
    // SAFETY: fallocate on a file descriptor this `File` owns; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The range reads as zeroes afterwards; `allocate`: it keeps (or gets) its blocks, else it
/// becomes a hole. The file's size does not change. Where the filesystem cannot zero a range
/// in place (tmpfs), it is punched and allocated again (as far as there is room: the range
/// reads as zeroes either way); where it cannot punch holes either, zeroes are written.
pub fn zero_range(file: &File, offset: u64, length: u64, allocate: bool) -> io::Result<()> {
    const KEEP: libc::c_int = libc::FALLOC_FL_KEEP_SIZE;
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
    if allocate {
        match fallocate(file, libc::FALLOC_FL_ZERO_RANGE | KEEP, offset, length) {
            Err(e) if unsupported(&e) => {}
            done => return done,
        }
    }
    match fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | KEEP, offset, length) {
        Err(e) if unsupported(&e) => return write_zeroes(file, offset, length),
        punched => punched?,
    }
    if allocate {
        match fallocate(file, KEEP, offset, length) {
            Err(e) if unsupported(&e) || e.raw_os_error() == Some(libc::ENOSPC) => {}
            allocated => allocated?,
        }
    }
    Ok(())
}

/// Writes `length` zero bytes at `offset` of `file`, 1 MiB at a time.
fn write_zeroes(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let zeroes = vec![0u8; length.min(1 << 20) as usize];
    let end = offset + length;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// `lseek(fd, offset, whence)`; None where the kernel says ENXIO (no data / hole after it).
pub fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = off_t(offset)?;
    // SAFETY: lseek on a file descriptor this `File` owns. It moves the shared file offset,
    // which nothing here uses (all I/O is positioned).
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The first run of data of `file` in `[from, end)`, as `(start, stop)` (holes skipped), if
/// there is one.
pub fn next_data(file: &File, from: u64, end: u64) -> io::Result<Option<(u64, u64)>> {
    let Some(start) = seek(file, from, libc::SEEK_DATA)?.filter(|s| *s < end) else {
        return Ok(None);
    };
    let stop = seek(file, start, libc::SEEK_HOLE)?
        .unwrap_or(end)
        .min(end)
        .max(start + 1);
    Ok(Some((start, stop)))
}

/// Tells the kernel `[offset, offset + length)` of `file` will be read soon (best effort).
pub fn will_need(file: &File, offset: u64, length: u64) {
    let (Ok(off), Ok(len)) = (off_t(offset), off_t(length)) else {
        return;
    };
    // SAFETY: an advice call on a descriptor this `File` owns; no memory is passed.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
}

/// Copies `len` bytes at `from_at` of `from` to `to` at `to_at`, in the kernel
/// (`copy_file_range`: one copy, or none where the filesystem shares blocks), or through
/// memory where the kernel cannot (another filesystem, an old kernel).
pub fn copy_range(from: &File, from_at: u64, to: &File, to_at: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let (mut a, mut b) = (off_t(from_at + done)?, off_t(to_at + done)?);
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are owned by the `File`s; the offsets are locals the call
        // updates.
        let n = unsafe {
            libc::copy_file_range(from.as_raw_fd(), &mut a, to.as_raw_fd(), &mut b, want, 0)
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as u64,
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                        const CHUNK: u64 = 4 << 20;
                        while done < len {
                            let n = (len - done).min(CHUNK);
                            let buf = read_at(from, n as usize, from_at + done)?;
                            to.write_all_at(&buf, to_at + done)?;
                            done += n;
                        }
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// `len` bytes of `file` from `offset`, read into memory that is not zeroed first (zeroing
/// megabytes only to overwrite them costs as much as the read; a read past the end of the file
/// is an error).
pub fn read_at(file: &File, len: usize, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_onto(file, &mut buf, len, offset)?;
    Ok(buf)
}

/// [`read_at`], onto the end of `buf` (which is left as it was on an error): the parts of a
/// read from several files go into one buffer.
pub fn read_onto(file: &File, buf: &mut Vec<u8>, len: usize, offset: u64) -> io::Result<()> {
    buf.reserve(len);
    let start = buf.len();
    let mut done = 0;
    while done < len {
        let at = off_t(offset + done as u64)?;
        // SAFETY: pread writes at most `len - done` bytes at `buf.as_mut_ptr() + start +
        // done`, inside the `len` bytes past `start` that `buf` has room for (reserved above);
        // the descriptor is `file`'s own.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(start + done).cast(),
                len - done,
                at,
            )
        };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: pread initialized the `len` bytes past `start` above.
    unsafe { buf.set_len(start + len) };
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` to `socket` with `sendfile(2)`: the kernel hands
/// the file's pages to the socket, no copy through memory here. The socket may be non-blocking
/// (one a runtime polls): this waits for room with `poll(2)` and gives up once the peer has
/// taken nothing for `stall`. A file that ends first is an error, as is a peer that goes away.
pub fn send_file(
    socket: BorrowedFd<'_>,
    file: &File,
    offset: u64,
    len: usize,
    stall: Duration,
) -> io::Result<()> {
    let mut off = off_t(offset)?;
    let mut left = len;
    let mut progress = Instant::now();
    while left > 0 {
        // SAFETY: sendfile between two descriptors that stay open for the call (`socket` is
        // borrowed, `file` owned); `off` is a local the kernel advances.
        let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
        match n {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                left -= n as usize;
                progress = Instant::now();
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => {
                        let waited = progress.elapsed();
                        if waited >= stall {
                            return Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                format!("the peer took nothing for {waited:?}"),
                            ));
                        }
                        wait_writable(socket, stall - waited)?;
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Shuts both directions of `socket` down: its peer sees the connection end, and whoever
/// reads it (another descriptor of the same socket too) reads its end.
pub fn shutdown(socket: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor that stays open for the call; no memory is passed.
    if unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Waits until `fd` can be written to (or has an error to report), at most `timeout`.
fn wait_writable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one pollfd, valid for the call, for a descriptor that stays open.
    if unsafe { libc::poll(&mut p, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_range_copies_within_a_filesystem_and_across_two() {
        let data: Vec<u8> = (0..(3 << 20) + 123).map(|i| (i % 251) as u8).collect();
        let here = tempfile::tempdir().unwrap();
        let from = tempfile::tempfile_in(here.path()).unwrap();
        from.write_all_at(&data, 4096).unwrap();
        // The same filesystem (the kernel copies), and tmpfs to the temporary directory's
        // (another filesystem where /tmp is not tmpfs: copied through memory).
        for dir in [here.path(), std::path::Path::new("/dev/shm")] {
            let to = tempfile::tempfile_in(dir).unwrap();
            to.write_all_at(&[7; 10], 0).unwrap();
            copy_range(&from, 4096 + 5, &to, 10, data.len() as u64 - 5).unwrap();
            let back = read_at(&to, data.len() + 5, 0).unwrap();
            assert_eq!(&back[..10], &[7; 10]);
            assert!(back[10..] == data[5..], "{}", dir.display());
        }
        let to = tempfile::tempfile_in(here.path()).unwrap();
        let e = copy_range(&from, data.len() as u64, &to, 0, 8192).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_at_reads_exactly_and_refuses_to_read_past_the_end() {
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        assert_eq!(read_at(&f, 4096, 1000).unwrap(), data[1000..5096]);
        assert_eq!(read_at(&f, 0, 10_000).unwrap(), Vec::<u8>::new());
        let e = read_at(&f, 2, 9_999).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // Onto a buffer: appended; on an error the buffer is as it was.
        let mut buf = data[..10].to_vec();
        read_onto(&f, &mut buf, 100, 10).unwrap();
        assert_eq!(buf, data[..110]);
        assert!(read_onto(&f, &mut buf, 2, 9_999).is_err());
        assert_eq!(buf, data[..110]);
    }

    #[test]
    fn send_file_sends_the_range_through_a_full_socket_and_stops_at_a_stall_or_the_end() {
        use std::io::Read;
        use std::os::fd::AsFd;
        let f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        f.write_all_at(&data, 0).unwrap();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        // Non-blocking, as a runtime's socket is; 3 MiB do not fit in its buffer at once.
        a.set_nonblocking(true).unwrap();
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut got = vec![0u8; 3 << 20];
            b.read_exact(&mut got).unwrap();
            (got, b)
        });
        send_file(a.as_fd(), &f, 1000, 3 << 20, Duration::from_secs(10)).unwrap();
        let (got, b) = reader.join().unwrap();
        assert!(got == data[1000..1000 + (3 << 20)], "other bytes arrived");
        // Nobody reads: it gives up.
        let e = send_file(a.as_fd(), &f, 0, 4 << 20, Duration::from_millis(200)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // Past the end of the file.
        drop(b);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = send_file(a.as_fd(), &f, (4 << 20) - 10, 20, Duration::from_secs(1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn zero_range_punches_a_hole_or_keeps_the_blocks_and_seek_finds_them() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        zero_range(&f, 0, 512 << 10, false).unwrap();
        zero_range(&f, 512 << 10, 256 << 10, true).unwrap();
        assert_eq!(seek(&f, 0, libc::SEEK_DATA).unwrap(), Some(512 << 10));
        assert_eq!(seek(&f, 0, libc::SEEK_HOLE).unwrap(), Some(0));
        assert_eq!(seek(&f, 1 << 20, libc::SEEK_DATA).unwrap(), None);
        assert_eq!(
            next_data(&f, 0, 1 << 20).unwrap(),
            Some((512 << 10, 1 << 20))
        );
        assert_eq!(
            next_data(&f, 0, 600 << 10).unwrap(),
            Some((512 << 10, 600 << 10))
        );
        assert_eq!(next_data(&f, 0, 512 << 10).unwrap(), None);
        assert_eq!(read_at(&f, 4, (512 << 10) + 10).unwrap(), [0; 4]);
        assert_eq!(read_at(&f, 4, (768 << 10) + 10).unwrap(), [7; 4]);
        assert!(fallocate(&f, libc::FALLOC_FL_PUNCH_HOLE, 0, 4096).is_err());
    }

    /// On tmpfs, which has no `FALLOC_FL_ZERO_RANGE`, zeroing that keeps the blocks works too.
    #[test]
    fn zero_range_keeps_the_blocks_on_tmpfs_too() {
        let f = tempfile::tempfile_in("/dev/shm").unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        assert_eq!(
            fallocate(&f, libc::FALLOC_FL_ZERO_RANGE, 0, 4096)
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EOPNOTSUPP),
            "/dev/shm is not tmpfs here"
        );
        // Blocks of 512 bytes: all 1 MiB of them held, also by the zeroed range (tmpfs's
        // seeks call allocated pages never written a hole all the same).
        let blocks = |f: &File| std::os::unix::fs::MetadataExt::blocks(&f.metadata().unwrap());
        zero_range(&f, 4096, 256 << 10, true).unwrap();
        assert_eq!(read_at(&f, 4, 4096 + 10).unwrap(), [0; 4]);
        assert_eq!(read_at(&f, 4, (260 << 10) + 10).unwrap(), [7; 4]);
        assert_eq!(blocks(&f), 2048);
        zero_range(&f, 0, 4096, false).unwrap();
        assert_eq!(blocks(&f), 2040);
        assert_eq!(read_at(&f, 4, 10).unwrap(), [0; 4]);
    }
}
