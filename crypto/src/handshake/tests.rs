//! Handshake tests.
use super::*;

#[test]
fn smoke_round_trip() {
    let id = crate::keys::IdentityKeypair::generate().public();
    let onion = X25519Secret::generate();
    let (st, skin) = client_start(&id, &onion.public(), b"cm").unwrap();
    let (rk, reply) = relay_respond(&id, &[&onion], &skin, |cm| {
        assert_eq!(cm, b"cm");
        b"sm".to_vec()
    })
    .unwrap();
    let (ck, sm) = st.finish(&reply).unwrap();
    assert_eq!(sm, b"sm");
    assert_eq!(ck.forward(), rk.forward());
    assert_eq!(ck.backward(), rk.backward());
    assert_eq!(ck.binding(), rk.binding());
}
