//! The one volume interface every front end (NBD, vhost-user-blk) serves, and its
//! simplest implementation: a sparse local file. Front ends check ranges against [`Volume::size`]
//! before they call; implementations may assume requests are inside the volume.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// A run of the volume with one allocation state (`base:allocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated (reads as zeroes).
    pub hole: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

/// Where the bytes of a read are: `len` bytes of `file` from `offset`, for a front end that
/// sends them straight from the file (see [`Volume::read_sendable`]).
#[derive(Debug, Clone)]
pub struct FileRegion {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u32,
}

/// What a read for a front end that can send from files gives.
#[derive(Debug)]
pub enum Sendable {
    /// The bytes are in one file: taken from it when they are sent.
    Region(FileRegion),
    /// The bytes, read now (shared: the leader's answer to a node without a replica goes out
    /// as it came in).
    Data(bytes::Bytes),
}

/// A block volume. Writes are durable once `flush` returns, or at once with `fua`.
#[async_trait::async_trait]
pub trait Volume: Send + Sync + std::fmt::Debug {
    fn size(&self) -> u64;

    /// Whether zeroing a range costs no more than trimming it (`NBD_CMD_FLAG_FAST_ZERO`).
    fn fast_zero(&self) -> bool;

    /// The longest read or write it takes in one request.
    fn max_request(&self) -> u32 {
        32 << 20
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>>;

    /// A read whose bytes are taken from a file when they are sent, not now, if the volume
    /// keeps them in one (the region of the file), or else read now as [`Volume::read`] reads
    /// them. Whatever is ordered before the call (completed writes, a read barrier) is in the
    /// region; a write that completes after it may be seen too, as it may be by a read that
    /// overlaps it.
    async fn read_sendable(&self, offset: u64, length: u32) -> io::Result<Sendable> {
        Ok(Sendable::Data(self.read(offset, length).await?.into()))
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()>;

    /// Makes every write completed before the call durable.
    async fn flush(&self) -> io::Result<()>;

    /// The range need not be kept (it reads as zeroes here).
    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()>;

    /// The range reads as zeroes afterwards; `allocate`: it stays allocated (no hole).
    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        allocate: bool,
        fua: bool,
    ) -> io::Result<()>;

    /// Allocation state from `offset` on, covering at least the first byte and at most
    /// `length` bytes.
    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>>;

    /// A hint that the range will be read soon.
    async fn cache(&self, offset: u64, length: u64) -> io::Result<()>;
}

/// A volume in memory (nothing is durable): for tests, fuzzing and as a benchmark baseline.
/// Everything reads as data.
#[derive(Debug)]
pub struct MemVolume {
    data: std::sync::Mutex<Vec<u8>>,
    size: u64,
}

impl MemVolume {
    pub fn new(size: usize) -> MemVolume {
        MemVolume {
            data: std::sync::Mutex::new(vec![0u8; size]),
            size: size as u64,
        }
    }

    fn range(offset: u64, length: u64) -> std::ops::Range<usize> {
        offset as usize..(offset + length) as usize
    }
}

#[async_trait::async_trait]
impl Volume for MemVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        Ok(self.data.lock().unwrap()[MemVolume::range(offset, length.into())].to_vec())
    }

    async fn write(&self, offset: u64, data: Vec<u8>, _fua: bool) -> io::Result<()> {
        let r = MemVolume::range(offset, data.len() as u64);
        self.data.lock().unwrap()[r].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, length, false, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _: bool, _: bool) -> io::Result<()> {
        self.data.lock().unwrap()[MemVolume::range(offset, length)].fill(0);
        Ok(())
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent {
            length: length.min(self.size - offset),
            hole: false,
            zero: false,
        }])
    }

    async fn cache(&self, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A volume in a sparse file: holes where nothing was written, trims punch holes, allocation
/// read with `SEEK_DATA`/`SEEK_HOLE`.
#[derive(Debug)]
pub struct FileVolume {
    file: Arc<File>,
    size: u64,
}

impl FileVolume {
    /// Opens `path`, creating a sparse file of `size` bytes if there is none; an existing file
    /// keeps its size.
    pub fn open(path: &Path, size: u64) -> io::Result<FileVolume> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let mut len = file.metadata()?.len();
        if len == 0 && size > 0 {
            file.set_len(size)?;
            len = size;
        }
        Ok(FileVolume {
            file: Arc::new(file),
            size: len,
        })
    }

    /// Runs `f` on the file on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&File) -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || f(&file))
            .await
            .map_err(io::Error::other)?
    }
}

/// The allocation of `[offset, offset + length)` of `file` (of `size` bytes).
pub(crate) fn file_extents(
    file: &File,
    size: u64,
    offset: u64,
    length: u64,
) -> io::Result<Vec<Extent>> {
    let end = offset.saturating_add(length).min(size);
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let (start, stop) = crate::sys::next_data(file, at, end)?.unwrap_or((end, end));
        for (from, to, hole) in [(at, start, true), (start, stop, false)] {
            if to > from {
                out.push(Extent {
                    length: to - from,
                    hole,
                    zero: hole,
                });
            }
        }
        at = stop;
    }
    Ok(out)
}

#[async_trait::async_trait]
impl Volume for FileVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn fast_zero(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, length: u32) -> io::Result<Vec<u8>> {
        self.blocking(move |f| crate::sys::read_at(f, length as usize, offset))
            .await
    }

    async fn read_sendable(&self, offset: u64, length: u32) -> io::Result<Sendable> {
        Ok(Sendable::Region(FileRegion {
            file: self.file.clone(),
            offset,
            len: length,
        }))
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> io::Result<()> {
        self.blocking(move |f| {
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn flush(&self) -> io::Result<()> {
        self.blocking(|f| f.sync_data()).await
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, length, false, fua).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u64,
        allocate: bool,
        fua: bool,
    ) -> io::Result<()> {
        self.blocking(move |f| {
            crate::sys::zero_range(f, offset, length, allocate)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
        .await
    }

    async fn extents(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let size = self.size;
        self.blocking(move |f| file_extents(f, size, offset, length))
            .await
    }

    async fn cache(&self, offset: u64, length: u64) -> io::Result<()> {
        self.blocking(move |f| {
            crate::sys::will_need(f, offset, length);
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_new_file_volume_is_one_hole_and_written_blocks_are_data() {
        let dir = tempfile::tempdir().unwrap();
        let v = FileVolume::open(&dir.path().join("v"), 1 << 20).unwrap();
        assert_eq!(v.size(), 1 << 20);
        let all = v.extents(0, 1 << 20).await.unwrap();
        assert_eq!(
            all,
            [Extent {
                length: 1 << 20,
                hole: true,
                zero: true
            }]
        );
        v.write(65536, vec![7u8; 4096], true).await.unwrap();
        assert_eq!(v.read(65536, 4096).await.unwrap(), vec![7u8; 4096]);
        assert_eq!(v.read(0, 16).await.unwrap(), vec![0u8; 16]);
        let ext = v.extents(0, 1 << 20).await.unwrap();
        assert_eq!(ext.iter().map(|e| e.length).sum::<u64>(), 1 << 20);
        let data: Vec<_> = ext.iter().filter(|e| !e.hole).collect();
        assert_eq!(data.len(), 1, "{ext:?}");
        // Trimmed: a hole again, reading zeroes.
        v.trim(65536, 4096, false).await.unwrap();
        assert_eq!(v.read(65536, 4096).await.unwrap(), vec![0u8; 4096]);
        assert!(v.extents(0, 1 << 20).await.unwrap().iter().all(|e| e.hole));
        // Zeroed with allocation: zeroes, not a hole.
        v.write(0, vec![1u8; 8192], false).await.unwrap();
        v.write_zeroes(0, 8192, true, false).await.unwrap();
        assert_eq!(v.read(0, 8192).await.unwrap(), vec![0u8; 8192]);
        // A reopened volume keeps its size and contents.
        v.write(4096 * 3, vec![9u8; 10], false).await.unwrap();
        v.flush().await.unwrap();
        drop(v);
        let v = FileVolume::open(&dir.path().join("v"), 0).unwrap();
        assert_eq!(v.size(), 1 << 20);
        assert_eq!(v.read(4096 * 3, 10).await.unwrap(), vec![9u8; 10]);
    }
}
