//! End-to-end layer tests: a client circuit and a service circuit joined at a rendezvous point
//! (the last relay of each), with the virtual hop keyed on both ends from the same `HopKeys`.

use rand::{RngExt as _, SeedableRng as _};

use super::*;

const RELAY: u8 = 3;
const RELAY_EARLY: u8 = 4;

fn keys(i: u8) -> HopKeys {
    HopKeys::dangerously_from_parts([i; 32], [i.wrapping_add(0x40); 32], [0; 32])
}

/// Client circuit (`nc` hops) and service circuit (`ns` hops) whose last relays are the
/// rendezvous point, joined, with the end-to-end hop added on both ends.
struct Joined {
    client: ClientCircuitCrypto,
    service: ClientCircuitCrypto,
    /// The relays of the client's circuit (the last one is the RP's state for it).
    rc: Vec<RelayHopCrypto>,
    /// The relays of the service's circuit (the last one is the RP's state for it).
    rs: Vec<RelayHopCrypto>,
}

impl Joined {
    fn new(nc: u8, ns: u8) -> Self {
        let mut client = ClientCircuitCrypto::new();
        let mut service = ClientCircuitCrypto::new();
        let mut rc = Vec::new();
        let mut rs = Vec::new();
        for i in 1..=nc {
            client.add_hop(&keys(i)).unwrap();
            rc.push(RelayHopCrypto::new(&keys(i)));
        }
        for i in 1..=ns {
            service.add_hop(&keys(0x80 + i)).unwrap();
            rs.push(RelayHopCrypto::new(&keys(0x80 + i)));
        }
        let e = keys(0xEE);
        client.add_end_to_end(&e, EndToEndRole::Client).unwrap();
        service.add_end_to_end(&e, EndToEndRole::Service).unwrap();
        Self {
            client,
            service,
            rc,
            rs,
        }
    }

    /// Client to service: the forward cell crosses the client's relays (every one, the RP
    /// included, says `Pass`), the RP hands the body to the service circuit as a backward cell.
    /// `at_rp` may alter the body at the RP, between the two circuits.
    fn send_to_service(
        &mut self,
        cmd: u8,
        msg: &[u8],
        at_rp: impl FnOnce(&mut CellBody),
    ) -> (Tag, Result<(usize, Tag, CellBody), CryptoError>) {
        let mut body = [0u8; CELL_BODY_LEN];
        let hop = self.client.n_hops() - 1;
        let t = self
            .client
            .encrypt_forward(hop, cmd, msg, &mut body)
            .unwrap();
        for r in &mut self.rc {
            assert_eq!(r.decrypt_forward(cmd, &mut body).unwrap(), Forward::Pass);
        }
        at_rp(&mut body);
        for r in self.rs.iter_mut().rev() {
            r.relay_backward(&mut body).unwrap();
        }
        let got = self
            .service
            .decrypt_backward(RELAY, &mut body)
            .map(|(h, t)| (h, t, body));
        (t, got)
    }

    /// Service to client, the mirror image.
    fn send_to_client(
        &mut self,
        cmd: u8,
        msg: &[u8],
        at_rp: impl FnOnce(&mut CellBody),
    ) -> (Tag, Result<(usize, Tag, CellBody), CryptoError>) {
        let mut body = [0u8; CELL_BODY_LEN];
        let hop = self.service.n_hops() - 1;
        let t = self
            .service
            .encrypt_forward(hop, cmd, msg, &mut body)
            .unwrap();
        for r in &mut self.rs {
            assert_eq!(r.decrypt_forward(cmd, &mut body).unwrap(), Forward::Pass);
        }
        at_rp(&mut body);
        for r in self.rc.iter_mut().rev() {
            r.relay_backward(&mut body).unwrap();
        }
        let got = self
            .client
            .decrypt_backward(RELAY, &mut body)
            .map(|(h, t)| (h, t, body));
        (t, got)
    }
}

fn msg(rng: &mut impl rand::Rng, len: usize) -> Vec<u8> {
    let mut m = vec![0u8; len];
    rng.fill_bytes(&mut m);
    m
}

fn check(sent: &[u8], tag: Tag, got: Result<(usize, Tag, CellBody), CryptoError>, hop: usize) {
    let (h, t, body) = got.expect("end-to-end cell authenticates");
    assert_eq!(h, hop, "the virtual hop is the origin");
    assert_eq!(
        t, tag,
        "both ends see the same end-to-end tag (for SENDMEs)"
    );
    assert_eq!(
        &body[BACKWARD_MSG_OFFSET..BACKWARD_MSG_OFFSET + sent.len()],
        sent
    );
}

#[test]
fn round_trips_both_ways_for_every_circuit_length() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    for nc in 1..=3u8 {
        for ns in 1..=3u8 {
            let mut j = Joined::new(nc, ns);
            assert_eq!(j.client.n_hops(), usize::from(nc) + 1);
            for round in 0..40 {
                let len = if round % 7 == 0 {
                    RELAY_MSG_LEN
                } else {
                    rng.random_range(0..=RELAY_MSG_LEN)
                };
                let m = msg(&mut rng, len);
                if rng.random_bool(0.5) {
                    let cmd = if round % 3 == 0 { RELAY_EARLY } else { RELAY };
                    let (t, got) = j.send_to_service(cmd, &m, |_| {});
                    check(&m, t, got, usize::from(ns));
                } else {
                    let (t, got) = j.send_to_client(RELAY, &m, |_| {});
                    check(&m, t, got, usize::from(nc));
                }
            }
        }
    }
}

#[test]
fn the_rendezvous_point_still_speaks_to_both_ends() {
    let mut j = Joined::new(3, 3);
    // The RP originates a cell on the client circuit (e.g. RENDEZVOUS2 came first).
    let mut body = [0u8; CELL_BODY_LEN];
    j.rc[2]
        .encrypt_backward(RELAY, b"from rp", &mut body)
        .unwrap();
    for r in j.rc[..2].iter_mut().rev() {
        r.relay_backward(&mut body).unwrap();
    }
    let (hop, _) = j.client.decrypt_backward(RELAY, &mut body).unwrap();
    assert_eq!(hop, 2);
    assert_eq!(&body[BACKWARD_MSG_OFFSET..][..7], b"from rp");
    // And to the service.
    let mut body = [0u8; CELL_BODY_LEN];
    j.rs[2].encrypt_backward(RELAY, b"rp2", &mut body).unwrap();
    for r in j.rs[..2].iter_mut().rev() {
        r.relay_backward(&mut body).unwrap();
    }
    assert_eq!(j.service.decrypt_backward(RELAY, &mut body).unwrap().0, 2);
    // A cell for the RP itself is recognised there.
    let mut body = [0u8; CELL_BODY_LEN];
    j.client
        .encrypt_forward(2, RELAY, b"to rp", &mut body)
        .unwrap();
    for r in &mut j.rc[..2] {
        assert_eq!(r.decrypt_forward(RELAY, &mut body).unwrap(), Forward::Pass);
    }
    assert!(matches!(
        j.rc[2].decrypt_forward(RELAY, &mut body).unwrap(),
        Forward::Recognized { .. }
    ));
    // The ends stay in step afterwards.
    let (t, got) = j.send_to_service(RELAY, b"after", |_| {});
    check(b"after", t, got, 3);
    let (t, got) = j.send_to_client(RELAY, b"back", |_| {});
    check(b"back", t, got, 3);
}

#[test]
fn any_bit_flipped_at_the_rendezvous_point_is_caught_by_the_far_end() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..64 {
        let bit = rng.random_range(0..CELL_BODY_LEN * 8);
        let mut j = Joined::new(3, 3);
        let (_, got) = j.send_to_service(RELAY, b"hello", |b| b[bit / 8] ^= 1 << (bit % 8));
        assert!(got.is_err(), "service accepted a cell flipped at bit {bit}");
        // The service's state is poisoned: nothing later authenticates either.
        let (_, got) = j.send_to_service(RELAY, b"again", |_| {});
        assert!(got.is_err());

        let mut j = Joined::new(3, 3);
        let (_, got) = j.send_to_client(RELAY, b"hello", |b| b[bit / 8] ^= 1 << (bit % 8));
        assert!(got.is_err(), "client accepted a cell flipped at bit {bit}");
    }
}

#[test]
fn flips_on_the_service_circuit_never_get_past_the_next_relay_or_the_service() {
    // Forward (service to RP): the next relay's AEAD fails, as on any circuit.
    let mut j = Joined::new(3, 3);
    let mut body = [0u8; CELL_BODY_LEN];
    j.service
        .encrypt_forward(3, RELAY, b"x", &mut body)
        .unwrap();
    j.rs[0].decrypt_forward(RELAY, &mut body).unwrap();
    body[500] ^= 0x10;
    assert!(j.rs[1].decrypt_forward(RELAY, &mut body).is_err());
    // Backward (RP to service): a middle relay flips a bit, the service rejects.
    let mut j = Joined::new(3, 3);
    let mut body = [0u8; CELL_BODY_LEN];
    j.client.encrypt_forward(3, RELAY, b"x", &mut body).unwrap();
    for r in &mut j.rc {
        r.decrypt_forward(RELAY, &mut body).unwrap();
    }
    j.rs[2].relay_backward(&mut body).unwrap();
    j.rs[1].relay_backward(&mut body).unwrap();
    body[3] ^= 1;
    j.rs[0].relay_backward(&mut body).unwrap();
    assert!(j.service.decrypt_backward(RELAY, &mut body).is_err());
}

#[test]
fn drop_and_replay_at_the_rendezvous_point_are_caught() {
    // Drop: the RP swallows one cell; the relays behind it never see it, so their counters
    // stay in step, but the service's end-to-end counter does not.
    let mut j = Joined::new(3, 3);
    let mut body = [0u8; CELL_BODY_LEN];
    j.client
        .encrypt_forward(3, RELAY, b"lost", &mut body)
        .unwrap();
    for r in &mut j.rc {
        r.decrypt_forward(RELAY, &mut body).unwrap();
    }
    let (_, got) = j.send_to_service(RELAY, b"next", |_| {});
    assert!(got.is_err());
    // Replay: the RP sends the same end-to-end body twice.
    let mut j = Joined::new(3, 3);
    let mut kept = [0u8; CELL_BODY_LEN];
    let (t, got) = j.send_to_service(RELAY, b"once", |b| kept = *b);
    check(b"once", t, got, 3);
    for r in j.rs.iter_mut().rev() {
        r.relay_backward(&mut kept).unwrap();
    }
    assert!(j.service.decrypt_backward(RELAY, &mut kept).is_err());
}

#[test]
fn the_rendezvous_point_sees_only_pseudorandom_bytes() {
    // Two different messages of the same length give bodies at the RP that share no long run
    // with the plaintext, and a zero message does not show up as zeros.
    let mut j = Joined::new(3, 3);
    let zeros = [0u8; RELAY_MSG_LEN];
    let mut seen = [0u8; CELL_BODY_LEN];
    let (t, got) = j.send_to_service(RELAY, &zeros, |b| seen = *b);
    check(&zeros, t, got, 3);
    let zero_bytes = seen.iter().filter(|b| **b == 0).count();
    assert!(zero_bytes < 20, "{zero_bytes} zero bytes at the RP");
}

#[test]
fn the_virtual_hop_is_the_last_one() {
    let mut c = ClientCircuitCrypto::new();
    assert!(matches!(
        c.add_end_to_end(&keys(1), EndToEndRole::Client),
        Err(CryptoError::NoSuchHop)
    ));
    for i in 1..=3 {
        c.add_hop(&keys(i)).unwrap();
    }
    c.add_end_to_end(&keys(9), EndToEndRole::Client).unwrap();
    assert_eq!(c.end_to_end_role(), Some(EndToEndRole::Client));
    assert!(c.add_hop(&keys(4)).is_err());
    assert!(c.add_end_to_end(&keys(9), EndToEndRole::Client).is_err());
    let mut body = [0u8; CELL_BODY_LEN];
    assert!(c.encrypt_forward(4, RELAY, b"", &mut body).is_err());

    let mut c = ClientCircuitCrypto::new();
    for i in 1..=4 {
        c.add_hop(&keys(i)).unwrap();
    }
    assert!(c.add_end_to_end(&keys(9), EndToEndRole::Service).is_err());
}

#[test]
fn a_cell_without_the_marker_is_refused_by_the_service() {
    // Two services with the same keys: one's cell (no marker) offered to the other as if it
    // came from the client authenticates only under the client-to-service keys, which it was
    // not built with, so it fails; and a client-role cell offered to a client fails too.
    let mut j = Joined::new(2, 2);
    let mut body = [0u8; CELL_BODY_LEN];
    j.client
        .encrypt_forward(2, RELAY, b"hi", &mut body)
        .unwrap();
    // Not through the relays: the service can't peel layers that were never put on.
    assert!(j.service.decrypt_backward(RELAY, &mut body).is_err());
}
