//! The one description of a directory authority that relays, clients and authorities configure:
//! its identity and its HTTP directory address.
//!
//! In TOML (`[[authorities]]` in `relay.example.toml`, `proxy.example.toml` and
//! `authority.example.toml`) an entry is
//!
//! ```toml
//! [[authorities]]
//! identity = "64 hex digits of the authority's Ed25519 identity"
//! dir_addr = "192.0.2.1:7000"
//! ```
//!
//! `address` is accepted as another name for `dir_addr`; other keys are an error.

use std::net::SocketAddr;

use allium_crypto::RelayId;
use serde::{Deserialize, Serialize};

/// A directory authority: identity and HTTP directory address. Relays, clients and authorities
/// all configure authorities with this type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "AuthorityToml", into = "AuthorityToml")]
pub struct AuthorityInfo {
    /// The authority's offline identity key.
    pub identity: RelayId,
    /// Its HTTP directory address.
    pub dir_addr: SocketAddr,
}

/// The text form of [`AuthorityInfo`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorityToml {
    identity: String,
    #[serde(alias = "address")]
    dir_addr: SocketAddr,
}

impl TryFrom<AuthorityToml> for AuthorityInfo {
    type Error = String;
    fn try_from(t: AuthorityToml) -> Result<Self, String> {
        let identity = RelayId::from_hex(&t.identity).map_err(|_| {
            format!(
                "authority identity {:?} is not 64 hex digits; copy it from the authority's \
                 `allium keygen authority` output",
                t.identity
            )
        })?;
        Ok(Self {
            identity,
            dir_addr: t.dir_addr,
        })
    }
}

impl From<AuthorityInfo> for AuthorityToml {
    fn from(a: AuthorityInfo) -> Self {
        Self {
            identity: a.identity.to_hex(),
            dir_addr: a.dir_addr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct File {
        authorities: Vec<AuthorityInfo>,
    }

    #[test]
    fn toml_round_trip_and_alias() {
        let text = "[[authorities]]\nidentity = \"".to_owned()
            + &"ab".repeat(32)
            + "\"\naddress = \"192.0.2.1:7000\"\n";
        let f: File = toml::from_str(&text).expect("parses");
        assert_eq!(f.authorities.len(), 1);
        assert_eq!(f.authorities[0].identity, RelayId([0xab; 32]));
        assert_eq!(
            f.authorities[0].dir_addr,
            "192.0.2.1:7000".parse().expect("addr")
        );
        let out = toml::to_string(&f).expect("serialises");
        assert!(out.contains("dir_addr = \"192.0.2.1:7000\""), "{out}");
        assert_eq!(toml::from_str::<File>(&out).expect("reparses"), f);
    }

    #[test]
    fn bad_entries_are_errors_that_say_why() {
        let e = toml::from_str::<File>(
            "[[authorities]]\nidentity = \"xyz\"\ndir_addr = \"127.0.0.1:1\"\n",
        )
        .expect_err("bad identity");
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let ok_id = "11".repeat(32);
        let e = toml::from_str::<File>(&format!(
            "[[authorities]]\nidentity = \"{ok_id}\"\ndir_addr = \"127.0.0.1:1\"\nport = 3\n"
        ))
        .expect_err("unknown key");
        assert!(e.to_string().contains("port"), "{e}");
        assert!(
            toml::from_str::<File>(&format!("[[authorities]]\nidentity = \"{ok_id}\"\n")).is_err()
        );
    }
}
