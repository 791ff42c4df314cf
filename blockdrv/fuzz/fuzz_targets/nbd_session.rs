//! Everything a client may send, as one byte string, to a server with a memory export: the
//! handshake and transmission code must end the connection cleanly, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(blockdrv::nbd::server::run_transcript(data));
});
