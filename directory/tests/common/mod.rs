//! Shared helpers for the directory tests.
#![allow(dead_code, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;

use allium_crypto::{IdentityKeypair, X25519Secret};
use allium_directory::authority::{
    self, AuthorityConfig, AuthorityHandle, FakeReachability, StartOptions,
};
use allium_directory::doc::descriptor::{DESC_VERSION, default_protocols};
use allium_directory::doc::{ExitPolicy, RelayDescriptor, Signed};
use allium_directory::{AuthorityInfo, now_unix};
use tokio::net::TcpListener;

pub const INTERVAL: u64 = 60;

pub struct Relay {
    pub id: IdentityKeypair,
    pub link: X25519Secret,
    pub onion: X25519Secret,
    pub addr: SocketAddr,
}

impl Relay {
    pub fn new(port: u16) -> Self {
        Self {
            id: IdentityKeypair::generate(),
            link: X25519Secret::generate(),
            onion: X25519Secret::generate(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
    pub fn desc(&self, published: u64, exit: bool) -> RelayDescriptor {
        RelayDescriptor {
            version: DESC_VERSION,
            identity: self.id.public(),
            link_key: self.link.public(),
            onion_key: self.onion.public(),
            nickname: format!("relay{}", self.addr.port()),
            addrs: vec![self.addr],
            bandwidth_observed: 1_000_000,
            exit_policy: if exit {
                ExitPolicy {
                    allow_private: true,
                    ..ExitPolicy::accept_all()
                }
            } else {
                ExitPolicy::reject_all()
            },
            family: vec![],
            protocols: default_protocols(),
            contact: "ops@example.invalid".into(),
            published,
            expires: published + 3 * 3600,
        }
    }
    pub fn signed(&self, published: u64, exit: bool) -> Vec<u8> {
        Signed::sign(&self.desc(published, exit), &self.id)
            .expect("sign")
            .to_bytes()
    }
}

pub struct Net {
    pub dirs: Vec<tempfile::TempDir>,
    pub infos: Vec<AuthorityInfo>,
    pub handles: Vec<Option<AuthorityHandle>>,
    pub reach: Arc<FakeReachability>,
}

pub fn config(dir: &std::path::Path, addr: SocketAddr, infos: &[AuthorityInfo]) -> AuthorityConfig {
    AuthorityConfig::new(dir.to_path_buf(), addr, infos.to_vec()).for_test_network(INTERVAL)
}

impl Net {
    pub async fn start(n: usize) -> Self {
        let now = now_unix();
        let mut dirs = Vec::new();
        let mut listeners = Vec::new();
        let mut infos = Vec::new();
        for _ in 0..n {
            let d = tempfile::tempdir().expect("tempdir");
            let (_identity, keys) =
                authority::keys::generate_for_test(d.path(), now).expect("keys");
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            infos.push(AuthorityInfo {
                identity: keys.identity(),
                dir_addr: l.local_addr().expect("addr"),
            });
            dirs.push(d);
            listeners.push(l);
        }
        let reach = Arc::new(FakeReachability::all_up());
        let mut handles = Vec::new();
        for (d, l) in dirs.iter().zip(listeners) {
            let addr = l.local_addr().expect("addr");
            let h = authority::start_with(
                config(d.path(), addr, &infos),
                StartOptions {
                    listener: Some(l),
                    reachability: reach.clone(),
                    schedule: false,
                },
            )
            .await
            .expect("start");
            handles.push(Some(h));
        }
        Self {
            dirs,
            infos,
            handles,
            reach,
        }
    }

    pub fn live(&self) -> Vec<&AuthorityHandle> {
        self.handles.iter().flatten().collect()
    }

    pub async fn stop(&mut self, i: usize) {
        if let Some(h) = self.handles.get_mut(i).and_then(Option::take) {
            h.shutdown().await;
        }
    }

    pub async fn restart(&mut self, i: usize) {
        let info = self.infos[i];
        let l = TcpListener::bind(info.dir_addr).await.expect("rebind");
        let h = authority::start_with(
            config(self.dirs[i].path(), info.dir_addr, &self.infos),
            StartOptions {
                listener: Some(l),
                reachability: self.reach.clone(),
                schedule: false,
            },
        )
        .await
        .expect("restart");
        self.handles[i] = Some(h);
    }

    /// The start of the current period (already valid now).
    pub fn current_va() -> u64 {
        authority::next_valid_after(now_unix(), INTERVAL) - INTERVAL
    }
}
