//! Tests of the HSDir descriptor store and its request forms.

use std::net::SocketAddr;

use allium_crypto::hs::{BlindedKeypair, BlindedPublicKey, Subcredential, TimePeriod};
use allium_crypto::{IdentityKeypair, X25519Secret};

use super::*;
use crate::hs::desc::{HsDescBuilder, HsDescContents, IntroPointInfo, MAX_HS_DESC_LEN};

const PERIOD: TimePeriod = TimePeriod {
    number: 20787,
    length_minutes: 1440,
};
const NOW: u64 = 1_796_040_000;
const LIFETIME_MIN: u16 = 180;

fn desc(seed: u8, revision: u64) -> (BlindedPublicKey, Vec<u8>) {
    let id = IdentityKeypair::from_seed(&[seed; 32]);
    let blinded = BlindedKeypair::derive(&id, &PERIOD);
    let sub = Subcredential::for_identity(&id.public(), &blinded.public());
    let signing = IdentityKeypair::from_seed(&[seed.wrapping_add(1); 32]);
    let contents = HsDescContents {
        version: 1,
        intro_points: vec![IntroPointInfo {
            relay_id: IdentityKeypair::from_seed(&[seed.wrapping_add(2); 32]).public(),
            link_key: X25519Secret::from_bytes([seed.wrapping_add(3); 32]).public(),
            onion_key: X25519Secret::from_bytes([seed.wrapping_add(4); 32]).public(),
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 9001))],
            auth_key: IdentityKeypair::from_seed(&[seed.wrapping_add(5); 32]).public(),
            enc_key: X25519Secret::from_bytes([seed.wrapping_add(6); 32]).public(),
        }],
        pow: None,
    };
    let raw = HsDescBuilder {
        blinded: &blinded,
        signing_key: &signing,
        subcredential: &sub,
        revision,
        lifetime_minutes: LIFETIME_MIN,
        cert_expires: NOW + 6 * 3600,
        contents: &contents,
        auth_clients: &[],
    }
    .build()
    .expect("builds");
    (blinded.public(), raw)
}

fn upload(s: &mut HsDescStore, key: &BlindedPublicKey, body: &[u8], now: u64) -> Vec<u8> {
    let whole = encode_hs_upload(key, body);
    let head_len = request_head_complete(&whole).expect("complete head");
    let req = parse_request(&whole[..head_len]).expect("parses");
    s.respond(&req, &whole[head_len..], now)
        .expect("a descriptor request")
}

fn fetch(s: &mut HsDescStore, key: &BlindedPublicKey, now: u64) -> Vec<u8> {
    let req =
        parse_request(&encode_request(&DirRequest::HsDesc { blinded: *key })).expect("parses");
    s.respond(&req, &[], now).expect("a descriptor request")
}

fn status(resp: &[u8]) -> &str {
    std::str::from_utf8(&resp[9..12]).expect("status")
}

#[test]
fn request_forms_round_trip_and_bad_ones_are_refused() {
    let key = BlindedPublicKey([0xab; 32]);
    for req in [
        DirRequest::HsDesc { blinded: key },
        DirRequest::HsUpload {
            blinded: key,
            len: 1234,
        },
    ] {
        let head = encode_request(&req);
        assert!(head.len() <= MAX_REQUEST_HEAD);
        assert_eq!(request_head_complete(&head), Some(head.len()));
        assert_eq!(parse_request(&head).expect("parses"), req);
    }
    let get = format!("GET {HS_PATH_PREFIX}{} HTTP/1.0\r\n\r\n", "ab".repeat(32));
    assert_eq!(
        encode_request(&DirRequest::HsDesc { blinded: key }),
        get.as_bytes()
    );
    let post = format!(
        "POST {HS_PATH_PREFIX}{} HTTP/1.0\r\nContent-Length: 1234\r\n\r\n",
        "ab".repeat(32)
    );
    assert_eq!(
        encode_request(&DirRequest::HsUpload {
            blinded: key,
            len: 1234
        }),
        post.as_bytes()
    );
    let too_big = MAX_HS_DESC_LEN + 1;
    for bad in [
        format!("GET {HS_PATH_PREFIX}{} HTTP/1.0\r\n\r\n", "AB".repeat(32)),
        format!("GET {HS_PATH_PREFIX}{} HTTP/1.0\r\n\r\n", "ab".repeat(31)),
        format!("POST {HS_PATH_PREFIX}{} HTTP/1.0\r\n\r\n", "ab".repeat(32)),
        format!(
            "POST {HS_PATH_PREFIX}{} HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
            "ab".repeat(32)
        ),
        format!(
            "POST {HS_PATH_PREFIX}{} HTTP/1.0\r\nContent-Length: 012\r\n\r\n",
            "ab".repeat(32)
        ),
        format!(
            "POST {HS_PATH_PREFIX}{} HTTP/1.0\r\nContent-Length: {too_big}\r\n\r\n",
            "ab".repeat(32)
        ),
        "POST /allium/v1/consensus HTTP/1.0\r\nContent-Length: 5\r\n\r\n".to_owned(),
    ] {
        assert!(parse_request(bad.as_bytes()).is_err(), "{bad:?}");
    }
    // A plain archive answers descriptor requests 404 (it is not an HSDir).
    let a = DirArchive::new(ArchiveConfig::default());
    let r = a.respond(get.as_bytes(), NOW);
    assert!(r.starts_with(b"HTTP/1.0 404 "));
}

#[test]
fn upload_then_fetch_byte_exact_and_absent_is_404() {
    let mut s = HsDescStore::default();
    let (key, raw) = desc(1, 5);
    let r = fetch(&mut s, &key, NOW);
    assert_eq!(status(&r), "404");
    assert!(parse_hs_desc_response(&r).is_err());
    let r = upload(&mut s, &key, &raw, NOW);
    assert_eq!(status(&r), "200", "{}", String::from_utf8_lossy(&r));
    parse_hs_upload_response(&r).expect("stored");
    let r = fetch(&mut s, &key, NOW + 60);
    assert_eq!(parse_hs_desc_response(&r).expect("served"), raw);
    assert_eq!(s.len(), 1);
    let st = s.stats();
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(st.uploads_stored.load(Relaxed), 1);
    assert_eq!(st.fetches_served.load(Relaxed), 1);
    assert_eq!(st.fetches_missed.load(Relaxed), 1);
}

#[test]
fn revision_must_grow_and_bad_uploads_are_refused() {
    let mut s = HsDescStore::default();
    let (key, r5) = desc(1, 5);
    let (_, r4) = desc(1, 4);
    let (_, r6) = desc(1, 6);
    assert_eq!(s.upload(&key, &r5, NOW), Ok(()));
    assert_eq!(
        s.upload(&key, &r5, NOW),
        Err(HsStoreError::NotNewer { held: 5, got: 5 })
    );
    let r = upload(&mut s, &key, &r4, NOW);
    assert_eq!(status(&r), "409");
    assert!(parse_hs_upload_response(&r).is_err());
    assert_eq!(s.upload(&key, &r6, NOW), Ok(()));
    let got = parse_hs_desc_response(&fetch(&mut s, &key, NOW)).expect("served");
    assert_eq!(got, r6);
    // Under another key's path: refused.
    let (other, _) = desc(2, 1);
    assert_eq!(s.upload(&other, &r6, NOW), Err(HsStoreError::WrongKey));
    // A flipped byte breaks the signature (or the encoding).
    let mut bad = r6.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        s.upload(&key, &bad, NOW),
        Err(HsStoreError::Invalid(_))
    ));
    // Expired certificate.
    let (k3, r3) = desc(3, 1);
    assert!(matches!(
        s.upload(&k3, &r3, NOW + 7 * 3600),
        Err(HsStoreError::Invalid(_))
    ));
    assert_eq!(
        s.upload(&key, &vec![0; MAX_HS_DESC_LEN + 1], NOW),
        Err(HsStoreError::TooLarge)
    );
    // A body shorter than announced.
    let req = DirRequest::HsUpload {
        blinded: key,
        len: r6.len() + 1,
    };
    let r = s.respond(&req, &r6, NOW).expect("descriptor request");
    assert_eq!(status(&r), "400");
    assert_eq!(s.len(), 1);
}

#[test]
fn descriptors_expire_at_their_lifetime_and_the_store_is_bounded() {
    let mut s = HsDescStore::new(2, usize::MAX);
    let (k1, d1) = desc(1, 1);
    let (k2, d2) = desc(2, 1);
    let (k3, d3) = desc(3, 1);
    assert_eq!(s.upload(&k1, &d1, NOW), Ok(()));
    assert_eq!(s.upload(&k2, &d2, NOW + 600), Ok(()));
    assert_eq!(s.upload(&k3, &d3, NOW + 600), Err(HsStoreError::Full));
    assert_eq!(status(&upload(&mut s, &k3, &d3, NOW + 600)), "503");
    // A replacement is fine when full.
    let (_, d1b) = desc(1, 2);
    assert_eq!(s.upload(&k1, &d1b, NOW + 600), Ok(()));
    let life = u64::from(LIFETIME_MIN) * 60;
    assert!(s.get_compressed(&k2, NOW + 600 + life - 1).is_some());
    assert!(s.get_compressed(&k2, NOW + 600 + life).is_none());
    assert_eq!(s.expire(NOW + 600 + life), 2);
    assert!(s.is_empty());
    assert_eq!(s.bytes(), 0);
    // Room again.
    assert_eq!(s.upload(&k3, &d3, NOW + 600 + life), Ok(()));
    // The byte bound holds too.
    let mut small = HsDescStore::new(100, d1.len());
    assert_eq!(small.upload(&k1, &d1, NOW), Err(HsStoreError::Full));
}
