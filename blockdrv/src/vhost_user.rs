//! The vhost-user-blk front end: a guest's virtio-blk requests, taken straight from its virtqueue
//! (the guest's memory is shared with this process), served by the same [`Volume`] interface as
//! NBD: a file, or a replicated volume on a storage node. QEMU connects to the unix socket
//! (`-chardev socket,id=c,path=SOCK -device vhost-user-blk-pci,chardev=c`, with the guest's
//! memory shareable: `-object memory-backend-memfd,share=on`), libvirt with `<disk
//! type='vhostuser'>`, and the guest sees an ordinary virtio disk.
//!
//! One request queue. A request is checked (header, lengths, range), executed on the volume
//! through the tokio runtime it was given, and completed with its status: `IOERR` for a bad or
//! out-of-range request or a failed volume call, `UNSUPP` for a type it does not know. Writes
//! are complete only once the volume has them, as for NBD; `FLUSH` makes them durable (a
//! replicated volume's writes are committed on a majority before they complete anyway).
//! Discard and write-zeroes (with the unmap flag: a hole) go to the volume's trim and zero.
//! The socket takes one front end at a time and the next once it has gone (QEMU reconnects
//! with `reconnect=1` on its chardev).

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackendMut, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueT, Reader, Writer};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::volume::Volume;

/// virtio-blk's sector, whatever the block size.
const SECTOR: u64 = 512;
const QUEUE_SIZE: usize = 256;
/// Most data descriptors in one request (the queue size less the header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Most bytes in one descriptor; a request is cut into volume calls of at most the volume's
/// `max_request` anyway.
const SIZE_MAX: u32 = 1 << 20;
/// Most sectors one discard or write-zeroes segment covers, and segments in one request.
const MAX_ZERO_SECTORS: u32 = (256 << 20) / SECTOR as u32;
const MAX_ZERO_SEGS: u32 = 16;
/// A discard or write-zeroes segment: sector u64, sectors u32, flags u32.
const SEGMENT: usize = 16;
/// `VIRTIO_BLK_ID_BYTES`.
const ID_BYTES: usize = 20;

/// The device's end of one connection.
struct BlkBackend {
    volume: Arc<dyn Volume>,
    rt: tokio::runtime::Handle,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    event_idx: bool,
    /// What `GET_ID` answers (the volume's name, cut to 20 bytes).
    id: Vec<u8>,
}

/// A request that gets `IOERR`, and why (logged).
struct Failed(String);

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Failed {
        Failed(e.to_string())
    }
}

/// `len` bytes in pieces of at most `chunk`: (offset in the request, length) of each.
fn pieces(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(chunk.max(1))
        .map(move |done| (done, (len - done).min(chunk)))
}

impl BlkBackend {
    /// `virtio_blk_config` (virtio 1.2, 5.2.4) as it stands: the capacity follows the volume
    /// as it grows (read again by the guest at its next look; no config interrupt is sent).
    fn config(&self) -> Vec<u8> {
        let mut c = vec![0u8; 60];
        let mut put = |at: usize, v: &[u8]| c[at..at + v.len()].copy_from_slice(v);
        put(0, &(self.volume.size() / SECTOR).to_le_bytes()); // capacity, in sectors
        put(8, &SIZE_MAX.to_le_bytes()); // size_max
        put(12, &SEG_MAX.to_le_bytes()); // seg_max
        put(20, &(SECTOR as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        put(36, &MAX_ZERO_SECTORS.to_le_bytes()); // max_discard_sectors
        put(40, &MAX_ZERO_SEGS.to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &MAX_ZERO_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &MAX_ZERO_SEGS.to_le_bytes()); // max_write_zeroes_seg
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// The byte offset of `bytes` bytes from `sector`, if they are inside the volume.
    fn range(&self, sector: u64, bytes: u64) -> Result<u64, Failed> {
        let offset = sector
            .checked_mul(SECTOR)
            .filter(|o| {
                o.checked_add(bytes)
                    .is_some_and(|end| end <= self.volume.size())
            })
            .ok_or_else(|| {
                Failed(format!(
                    "{bytes} bytes at sector {sector}: outside the volume ({} bytes)",
                    self.volume.size()
                ))
            })?;
        Ok(offset)
    }

    /// The byte offset of a read or write of `len` bytes from `sector`: whole sectors, inside
    /// the volume.
    fn sectors(&self, sector: u64, len: usize, what: &str) -> Result<u64, Failed> {
        if !(len as u64).is_multiple_of(SECTOR) {
            return Err(Failed(format!("a {what} of {len} bytes")));
        }
        self.range(sector, len as u64)
    }

    /// Executes one request: its header and data from `r`, its data for the guest into `w`
    /// (the status byte is not part of `w`).
    fn execute(&self, r: &mut Reader<'_, ()>, w: &mut Writer<'_, ()>) -> Result<u8, Failed> {
        let mut hdr = [0u8; 16];
        r.read_exact(&mut hdr)
            .map_err(|_| Failed("a request without a header".into()))?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let chunk = self.volume.max_request().min(SIZE_MAX) as usize;
        match kind {
            VIRTIO_BLK_T_IN => {
                let len = w.available_bytes();
                let offset = self.sectors(sector, len, "read")?;
                for (done, n) in pieces(len, chunk) {
                    let data = self
                        .rt
                        .block_on(self.volume.read(offset + done as u64, n as u32))?;
                    w.write_all(&data)?;
                }
            }
            VIRTIO_BLK_T_OUT => {
                let len = r.available_bytes();
                let offset = self.sectors(sector, len, "write")?;
                for (done, n) in pieces(len, chunk) {
                    let mut data = vec![0u8; n];
                    r.read_exact(&mut data)?;
                    self.rt
                        .block_on(self.volume.write(offset + done as u64, data, false))?;
                }
            }
            VIRTIO_BLK_T_FLUSH => self.rt.block_on(self.volume.flush())?,
            VIRTIO_BLK_T_GET_ID => {
                let n = w.available_bytes().min(ID_BYTES);
                let mut id = self.id.clone();
                id.resize(n, 0);
                w.write_all(&id)?;
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if !r.available_bytes().is_multiple_of(SEGMENT) || r.available_bytes() == 0 {
                    return Err(Failed(format!(
                        "{} bytes of discard segments",
                        r.available_bytes()
                    )));
                }
                while r.available_bytes() > 0 {
                    let mut seg = [0u8; SEGMENT];
                    r.read_exact(&mut seg)?;
                    let sector = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
                    let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
                    let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
                    let len = u64::from(sectors) * SECTOR;
                    let offset = self.range(sector, len)?;
                    if kind == VIRTIO_BLK_T_DISCARD {
                        self.rt.block_on(self.volume.trim(offset, len, false))?;
                    } else {
                        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                        self.rt
                            .block_on(self.volume.write_zeroes(offset, len, !unmap, false))?;
                    }
                }
            }
            _ => return Ok(VIRTIO_BLK_S_UNSUPP as u8),
        }
        Ok(VIRTIO_BLK_S_OK as u8)
    }

    /// Takes every request the guest made available on `vring`, completes each, and tells the
    /// guest (with event-idx: only when it asked to be told).
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let mem = self.mem.memory();
        loop {
            if self.event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            loop {
                // Its own statement: the queue's lock is released before `add_used` takes it.
                let next = vring
                    .get_mut()
                    .get_queue_mut()
                    .pop_descriptor_chain(mem.clone());
                let Some(chain) = next else {
                    break;
                };
                let head = chain.head_index();
                let used = self.complete(chain, &mem);
                vring.add_used(head, used).map_err(io::Error::other)?;
            }
            if !self.event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                break;
            }
        }
        if !self.event_idx || vring.needs_notification().map_err(io::Error::other)? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Executes one descriptor chain and writes its status; returns the bytes written to the
    /// guest's buffers.
    fn complete<M>(&self, chain: virtio_queue::DescriptorChain<M>, mem: &GuestMemoryMmap) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap> + Clone,
    {
        let (reader, writer) = (chain.clone().reader(mem), chain.writer(mem));
        let (Ok(mut r), Ok(mut w)) = (reader, writer) else {
            tracing::warn!("vhost-user-blk: a descriptor chain outside the guest's memory");
            return 0;
        };
        let Some(data_len) = w.available_bytes().checked_sub(1) else {
            tracing::warn!("vhost-user-blk: a request with no room for its status");
            return 0;
        };
        let Ok(mut status) = w.split_at(data_len) else {
            return 0;
        };
        let code = self.execute(&mut r, &mut w).unwrap_or_else(|Failed(why)| {
            tracing::warn!("vhost-user-blk: {why}");
            VIRTIO_BLK_S_IOERR as u8
        });
        if status.write_all(&[code]).is_err() {
            return 0;
        }
        (w.bytes_written() + 1) as u32
    }
}

impl VhostUserBackendMut for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        .iter()
        .fold(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), |f, b| {
            f | (1u64 << b)
        })
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let c = self.config();
        let start = (offset as usize).min(c.len());
        let end = start.saturating_add(size as usize).min(c.len());
        c[start..end].to_vec()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = mem;
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::empty()).ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        match vrings.get(usize::from(device_event)) {
            Some(vring) => self.process_queue(vring),
            None => Err(io::Error::other(format!("no queue {device_event}"))),
        }
    }
}

/// A volume served on a socket; [`Served::stop`] ends it.
#[derive(Debug)]
pub struct Served {
    socket: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Served {
    /// Stops taking front ends; the socket goes. (One connected now is served until it goes;
    /// the volume's calls fail once the volume is gone.)
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept it waits in: the connection ends at once, and so does the loop.
        let _ = std::os::unix::net::UnixStream::connect(&self.socket);
    }
}

/// Serves `volume` as a vhost-user-blk device on the unix socket `socket` (replaced if it
/// exists, bound when this returns), one front end after another, on a thread of its own;
/// volume calls run on `rt`.
pub fn serve(
    name: &str,
    volume: Arc<dyn Volume>,
    socket: &Path,
    rt: tokio::runtime::Handle,
) -> io::Result<Served> {
    let name = name.to_string();
    let id = name.as_bytes()[..name.len().min(ID_BYTES)].to_vec();
    let mut listener = Listener::new(socket, true).map_err(io::Error::other)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name(format!("vhost-{name}"))
        .spawn(move || {
            while !stopped.load(Ordering::SeqCst) {
                // The front end's memory, mapped by the daemon as it is told of it.
                let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
                let backend = Arc::new(Mutex::new(BlkBackend {
                    volume: volume.clone(),
                    rt: rt.clone(),
                    mem: mem.clone(),
                    event_idx: false,
                    id: id.clone(),
                }));
                let daemon = VhostUserDaemon::new(format!("vhost-user-blk-{name}"), backend, mem);
                let mut daemon = match daemon {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(volume = %name, "vhost-user-blk: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(1));
                        continue;
                    }
                };
                if let Err(e) = daemon.start(&mut listener) {
                    tracing::warn!(volume = %name, "vhost-user-blk: {e}");
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    continue;
                }
                // Until the front end goes; dropping the daemon stops its queue threads.
                if let Err(e) = daemon.wait() {
                    tracing::debug!(volume = %name, "vhost-user-blk front end: {e}");
                }
            }
            // The listener goes with the thread, and its socket with it.
        })?;
    Ok(Served {
        socket: socket.to_owned(),
        stop,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::MemVolume;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const HEADER: u64 = 0x10_0000;
    const OUT: u64 = 0x20_0000;
    const IN: u64 = 0x40_0000;
    const STATUS: u64 = 0x60_0000;

    fn backend(rt: &tokio::runtime::Runtime) -> BlkBackend {
        let volume = MemVolume::new(1 << 20);
        BlkBackend {
            volume: Arc::new(volume),
            rt: rt.handle().clone(),
            mem: GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            event_idx: false,
            id: b"vol".to_vec(),
        }
    }

    /// One request through `complete`, as a guest lays it out: the header, the data it
    /// sends, room for `in_len` bytes back and the status byte. Returns the status, the bytes
    /// the device wrote back and what `complete` said it used.
    fn request(
        b: &BlkBackend,
        kind: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> (u8, Vec<u8>, u32) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x80_0000)]).unwrap();
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HEADER)).unwrap();
        mem.write_slice(out, GuestAddress(OUT)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let w = VRING_DESC_F_WRITE as u16;
        let mut descs = vec![RawDescriptor::from(Descriptor::new(HEADER, 16, 0, 0))];
        if !out.is_empty() {
            descs.push(Descriptor::new(OUT, out.len() as u32, 0, 0).into());
        }
        if in_len > 0 {
            descs.push(Descriptor::new(IN, in_len, w, 0).into());
        }
        descs.push(Descriptor::new(STATUS, 1, w, 0).into());
        let q = MockSplitQueue::new(&mem, 16);
        let chain = q.build_desc_chain(&descs).unwrap();
        let used = b.complete(chain, &mem);
        let mut back = vec![0u8; in_len as usize];
        mem.read_slice(&mut back, GuestAddress(IN)).unwrap();
        (mem.read_obj(GuestAddress(STATUS)).unwrap(), back, used)
    }

    fn ok() -> u8 {
        VIRTIO_BLK_S_OK as u8
    }

    fn ioerr() -> u8 {
        VIRTIO_BLK_S_IOERR as u8
    }

    #[test]
    fn requests_are_served_and_bad_ones_fail_without_touching_the_volume() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let b = backend(&rt);
        // Write two sectors at sector 2, read them back (and the sectors around them).
        let data: Vec<u8> = (0..1024u32).map(|i| i as u8 | 1).collect();
        assert_eq!(
            request(&b, VIRTIO_BLK_T_OUT, 2, &data, 0),
            (ok(), vec![], 1)
        );
        let (s, back, used) = request(&b, VIRTIO_BLK_T_IN, 1, &[], 2048);
        assert_eq!((s, used), (ok(), 2049));
        assert_eq!(&back[512..1536], &data[..]);
        assert!(back[..512].iter().chain(&back[1536..]).all(|x| *x == 0));
        // The last sector is fine; one past it, or a read running off the end, is not.
        assert_eq!(request(&b, VIRTIO_BLK_T_IN, 2047, &[], 512).0, ok());
        assert_eq!(
            request(&b, VIRTIO_BLK_T_IN, 2048, &[], 512),
            (ioerr(), vec![0; 512], 1)
        );
        assert_eq!(request(&b, VIRTIO_BLK_T_IN, 2047, &[], 1024).0, ioerr());
        assert_eq!(
            request(&b, VIRTIO_BLK_T_IN, u64::MAX / 2, &[], 512).0,
            ioerr()
        );
        // Writes out of range or not whole sectors change nothing.
        assert_eq!(request(&b, VIRTIO_BLK_T_OUT, 2048, &[9; 512], 0).0, ioerr());
        assert_eq!(request(&b, VIRTIO_BLK_T_OUT, 2, &[9; 100], 0).0, ioerr());
        let (_, back, _) = request(&b, VIRTIO_BLK_T_IN, 2, &[], 1024);
        assert_eq!(back, data);
        // Write zeroes with unmap, and a discard segment out of range.
        let seg = |sector: u64, n: u32, flags: u32| {
            let mut s = sector.to_le_bytes().to_vec();
            s.extend(n.to_le_bytes());
            s.extend(flags.to_le_bytes());
            s
        };
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(
            request(&b, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg(2, 1, unmap), 0).0,
            ok()
        );
        let (_, back, _) = request(&b, VIRTIO_BLK_T_IN, 2, &[], 1024);
        assert!(back[..512].iter().all(|x| *x == 0) && back[512..] == data[512..]);
        assert_eq!(
            request(&b, VIRTIO_BLK_T_DISCARD, 0, &seg(2040, 16, 0), 0).0,
            ioerr()
        );
        assert_eq!(request(&b, VIRTIO_BLK_T_DISCARD, 0, &[0; 10], 0).0, ioerr());
        // Flush, the id, and a type it does not know.
        assert_eq!(request(&b, VIRTIO_BLK_T_FLUSH, 0, &[], 0).0, ok());
        let (s, id, used) = request(&b, VIRTIO_BLK_T_GET_ID, 0, &[], 20);
        assert_eq!((s, used), (ok(), 21));
        assert_eq!(&id[..4], b"vol\0");
        assert_eq!(request(&b, 99, 0, &[], 0).0, VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn the_config_space_has_the_capacity_and_limits() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let b = backend(&rt);
        let c = b.get_config(0, 60);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(
            b.get_config(56, 100),
            vec![1, 0, 0, 0],
            "clamped to the config's end"
        );
        assert!(b.get_config(200, 4).is_empty());
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    }
}
