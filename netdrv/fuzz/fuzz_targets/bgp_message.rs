//! Arbitrary bytes as a BGP message, with 2- and 4-octet AS paths: decoding must never panic,
//! and what decodes must encode to a message that decodes again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use netdrv::bgp::wire::{decode, message_len, Message};

fuzz_target!(|data: &[u8]| {
    let _ = message_len(data);
    for four_octet in [false, true] {
        if let Ok(m) = decode(data, four_octet) {
            let again = m.encode(four_octet);
            let d = decode(&again, four_octet);
            match (&m, &d) {
                // Everything but UPDATE keeps its exact form.
                (Message::Update(_), _) => assert!(d.is_ok(), "{m:?} -> {d:?}"),
                _ => assert_eq!(d.as_ref().ok(), Some(&m)),
            }
        }
    }
});
