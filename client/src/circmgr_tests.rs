//! The circuit manager with a scripted fake builder and tokio's paused clock: pool reuse,
//! isolation, dirtiness, retries on other paths, timeouts. No sockets, no real waiting.

// The paused tokio clock: its sleeps and reads are simulated time.
#![allow(clippy::disallowed_methods)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use allium_crypto::{IdentityKeypair, X25519Secret};

use super::*;
use crate::err::CircError;
use crate::path::RelayFlags;

/// What the fake builder does with the next build.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Ok,
    /// Fail while adding hop `n`.
    FailAt(usize),
    /// Never finish (stuck at hop `n`).
    Hang(usize),
    /// The guard refuses the CREATE (DESTROY RESOURCELIMIT: its link is at its circuit cap).
    GuardFull,
}

#[derive(Debug)]
struct FakeCirc {
    exit: RelayInfo,
    hops: [RelayId; 3],
    closed: AtomicBool,
    streams: AtomicUsize,
}

impl PooledCirc for FakeCirc {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
    fn n_streams(&self) -> usize {
        self.streams.load(Ordering::Acquire)
    }
    fn exit(&self) -> &RelayInfo {
        &self.exit
    }
    fn hops(&self) -> [RelayId; 3] {
        self.hops
    }
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

#[derive(Default)]
struct FakeBuilder {
    script: Mutex<VecDeque<Outcome>>,
    paths: Mutex<Vec<[RelayId; 3]>>,
}

impl CircBuilder for FakeBuilder {
    type Circ = FakeCirc;

    async fn build<'a>(
        &'a self,
        path: &'a Path,
        progress: Arc<crate::control::BuildProgress>,
    ) -> Result<Arc<FakeCirc>, ClientError> {
        let hops = [path.guard.id, path.middle.id, path.exit.id];
        self.paths.lock().unwrap().push(hops);
        let next = self
            .script
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Outcome::Ok);
        match next {
            Outcome::Ok => {
                progress.store(3, Ordering::Release);
                Ok(Arc::new(FakeCirc {
                    exit: path.exit.clone(),
                    hops,
                    closed: AtomicBool::new(false),
                    streams: AtomicUsize::new(0),
                }))
            }
            Outcome::FailAt(n) => {
                progress.store(n, Ordering::Release);
                Err(CircError::Destroyed(allium_proto::cell::DestroyReason::CONNECTFAILED).into())
            }
            Outcome::GuardFull => {
                progress.store(0, Ordering::Release);
                Err(CircError::Destroyed(allium_proto::cell::DestroyReason::RESOURCELIMIT).into())
            }
            Outcome::Hang(n) => {
                progress.store(n, Ordering::Release);
                std::future::pending().await
            }
        }
    }

    async fn close_links(&self) {}
    fn close_links_now(&self) {}
}

fn relay(i: u8, exit_ports: Vec<(u16, u16)>) -> RelayInfo {
    RelayInfo {
        id: IdentityKeypair::generate().public(),
        link_key: X25519Secret::generate().public(),
        onion_key: X25519Secret::generate().public(),
        addrs: vec![SocketAddr::from(([127, 0, 0, i], 9000))],
        flags: RelayFlags {
            running: true,
            valid: true,
            guard: true,
            exit: !exit_ports.is_empty(),
            fast: true,
            stable: true,
            ..RelayFlags::default()
        },
        weight: 1,
        family: vec![],
        exit_ports,
    }
}

struct Rig {
    mgr: Arc<CircMgr<FakeBuilder>>,
    _dir: tempfile::TempDir,
    relays: Vec<RelayInfo>,
}

/// A manager over six relays: four exits for every port, two that exit only to port 22.
fn rig(script: &[Outcome]) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ProxyConfig {
        data_dir: dir.path().to_path_buf(),
        test_network: true,
        primary_guards: 2,
        ..ProxyConfig::default()
    };
    let guards = GuardSet::load(dir.path()).unwrap();
    let (ready, _) = watch::channel(false);
    let builder = FakeBuilder::default();
    builder
        .script
        .lock()
        .unwrap()
        .extend(script.iter().copied());
    let mgr = Arc::new(CircMgr::with_builder(Arc::new(cfg), guards, ready, builder));
    let mut relays: Vec<RelayInfo> = (1..=4).map(|i| relay(i, vec![(1, 65535)])).collect();
    relays.push(relay(5, vec![(22, 22)]));
    relays.push(relay(6, vec![(22, 22)]));
    mgr.set_dir(DirView {
        relays: relays.clone(),
        weights: Default::default(),
        hs: Default::default(),
        distinct_subnets: false,
    });
    Rig {
        mgr,
        _dir: dir,
        relays,
    }
}

fn builds(r: &Rig) -> usize {
    r.mgr.builder.paths.lock().unwrap().len()
}

#[tokio::test(start_paused = true)]
async fn a_circuit_is_reused_for_its_isolation_key_only() {
    let r = rig(&[]);
    let alice = IsolationKey::credentials("alice", "pw");
    let bob = IsolationKey::credentials("bob", "pw");
    let a1 = r.mgr.get_circuit(Some(80), &alice).await.unwrap();
    let a2 = r.mgr.get_circuit(Some(443), &alice).await.unwrap();
    assert!(Arc::ptr_eq(&a1, &a2));
    let b = r.mgr.get_circuit(Some(80), &bob).await.unwrap();
    assert!(!Arc::ptr_eq(&a1, &b));
    assert_eq!(builds(&r), 2);
    assert_eq!(r.mgr.circuits_built(), 2);
    assert_eq!(r.mgr.n_circuits(), 2);
    assert!(r.mgr.circuits().iter().all(|c| c.dirty));
}

#[tokio::test(start_paused = true)]
async fn a_clean_circuit_is_claimed_and_a_used_one_preferred() {
    let r = rig(&[]);
    // Build two clean circuits ahead of demand, for port 80 (an exit chosen for no port in
    // particular may be one of the two that allow only port 22).
    r.mgr.note_port(80, now());
    let view = r.mgr.view().unwrap();
    r.mgr.top_up(&view).await.unwrap();
    assert_eq!(r.mgr.n_circuits(), 2);
    assert!(r.mgr.circuits().iter().all(|c| !c.dirty));
    let k = IsolationKey::NoAuth;
    let c1 = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    let c2 = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(
        Arc::ptr_eq(&c1, &c2),
        "the circuit used with this key is preferred"
    );
    assert_eq!(r.mgr.circuits().iter().filter(|c| c.dirty).count(), 1);
    assert_eq!(builds(&r), 2);
}

#[tokio::test(start_paused = true)]
async fn the_exit_must_allow_the_port() {
    let r = rig(&[]);
    let k = IsolationKey::NoAuth;
    let c = r.mgr.get_circuit(Some(25), &k).await.unwrap();
    assert!(c.exit().allows_port(25));
    assert!(!r.relays[4].allows_port(25));
    let c22 = r.mgr.get_circuit(Some(22), &k).await.unwrap();
    assert!(c22.exit().allows_port(22));
    for _ in 0..5 {
        let c = r.mgr.get_circuit(Some(25), &k).await.unwrap();
        assert!(c.exit().allows_port(25));
    }
}

#[tokio::test(start_paused = true)]
async fn dirty_circuits_expire_and_idle_ones_are_closed() {
    let r = rig(&[]);
    let k = IsolationKey::NoAuth;
    let old = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    old.streams.store(1, Ordering::Release);
    tokio::time::advance(r.mgr.cfg.get().max_circuit_dirtiness).await;
    let new = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(
        !Arc::ptr_eq(&old, &new),
        "past its dirtiness a circuit takes no new stream"
    );
    // It still carries a stream: kept until that ends.
    r.mgr.expire(now());
    assert!(!old.is_closed());
    old.streams.store(0, Ordering::Release);
    r.mgr.expire(now());
    assert!(old.is_closed());
    assert!(!new.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_failed_build_is_retried_on_another_path_avoiding_the_failed_relay() {
    let r = rig(&[Outcome::FailAt(1), Outcome::FailAt(2)]);
    let c = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::NoAuth)
        .await
        .unwrap();
    let paths = r.mgr.builder.paths.lock().unwrap().clone();
    assert_eq!(paths.len(), 3);
    let bad_middle = paths[0][1];
    let bad_exit = paths[1][2];
    assert!(!paths[2].contains(&bad_middle), "{paths:?}");
    assert!(!paths[2].contains(&bad_exit), "{paths:?}");
    assert_eq!(c.hops(), paths[2]);
    // The failed relays are avoided for RELAY_RETRY, then usable again.
    let down = r.mgr.relay_down.lock().unwrap().len();
    assert_eq!(down, 2);
    tokio::time::advance(RELAY_RETRY).await;
    let view = r.mgr.view().unwrap();
    r.mgr.choose_path(&view, &[80], now()).unwrap();
    assert!(r.mgr.relay_down.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn three_failures_fail_the_request_and_waiters_fail_fast() {
    let r = rig(&[Outcome::FailAt(0), Outcome::FailAt(1), Outcome::FailAt(2)]);
    let k = IsolationKey::NoAuth;
    let e = r.mgr.get_circuit(Some(80), &k).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Circuit(CircError::Destroyed(_))),
        "{e}"
    );
    assert_eq!(builds(&r), 3);
    // The next request builds afresh (it was not queued behind the failed build).
    r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert_eq!(builds(&r), 4);
}

/// Spawn `get_circuit(80, key)` and let it start (queue for the build lock).
async fn spawn_request(
    r: &Rig,
    k: &IsolationKey,
) -> tokio::task::JoinHandle<Result<(), ClientError>> {
    let mgr = Arc::clone(&r.mgr);
    let k = k.clone();
    let h = tokio::spawn(async move { mgr.get_circuit(Some(80), &k).await.map(|_| ()) });
    tokio::task::yield_now().await;
    h
}

#[tokio::test(start_paused = true)]
async fn a_request_queued_behind_failing_builds_fails_at_once() {
    // Two builds of three attempts each hang: the network looks unreachable.
    let r = rig(&[Outcome::Hang(1); 6]);
    let k = IsolationKey::credentials("a", "b");
    let first = spawn_request(&r, &k).await;
    let second = spawn_request(&r, &k).await;
    let third = spawn_request(&r, &k).await;
    let started = now();
    let e1 = first.await.unwrap().unwrap_err();
    assert!(matches!(e1, ClientError::Timeout(_)), "{e1}");
    // Three attempts, each cut at the build timeout (paused clock: no real wait).
    assert_eq!(started.elapsed(), 3 * r.mgr.cfg.get().circuit_build_timeout);
    // One failed build is not enough to fail the queue: the second request builds its own.
    let e2 = second.await.unwrap().unwrap_err();
    assert!(matches!(e2, ClientError::Timeout(_)), "{e2}");
    assert_eq!(builds(&r), 6);
    // FAIL_FAST_AFTER (2) in a row: the third fails without building.
    assert_eq!(FAIL_FAST_AFTER, 2);
    let e3 = third.await.unwrap().unwrap_err();
    assert!(matches!(e3, ClientError::RecentBuildFailed), "{e3}");
    assert_eq!(builds(&r), 6);
}

/// The scraper's failure: hundreds of requests queue behind builds on demand; one failed build
/// (three attempts) must not fail every request queued behind it.
#[tokio::test(start_paused = true)]
async fn one_failed_build_does_not_fail_the_requests_queued_behind_it() {
    let r = rig(&[Outcome::Hang(1); 3]);
    let k = IsolationKey::credentials("u", "p");
    let first = spawn_request(&r, &k).await;
    let mut queued = Vec::new();
    for _ in 0..19 {
        queued.push(spawn_request(&r, &k).await);
    }
    assert!(first.await.unwrap().is_err());
    for q in queued {
        q.await.unwrap().unwrap();
    }
    // The failed build's three attempts, then one circuit that the 19 share.
    assert_eq!(builds(&r), 4);
}

/// Requests with different isolation keys build at the same time: one that hangs does not hold
/// up another (with fresh credentials per request, one build at a time made requests time out).
#[tokio::test(start_paused = true)]
async fn builds_for_different_keys_run_in_parallel() {
    let r = rig(&[Outcome::Hang(1)]);
    let first = spawn_request(&r, &IsolationKey::credentials("a", "p")).await;
    let started = now();
    let second = spawn_request(&r, &IsolationKey::credentials("b", "p")).await;
    second.await.unwrap().unwrap();
    assert!(started.elapsed() < r.mgr.cfg.get().circuit_build_timeout);
    // The hung build's next attempt succeeds; the key locks are gone with their requests.
    first.await.unwrap().unwrap();
    assert!(r.mgr.key_locks.lock().unwrap().is_empty());
    assert_eq!(builds(&r), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_hop_is_marked_down() {
    let r = rig(&[Outcome::Hang(2)]);
    r.mgr
        .get_circuit(Some(80), &IsolationKey::NoAuth)
        .await
        .unwrap();
    let paths = r.mgr.builder.paths.lock().unwrap().clone();
    assert_eq!(paths.len(), 2);
    let stalled_exit = paths[0][2];
    assert!(r.mgr.relay_down.lock().unwrap().contains_key(&stalled_exit));
}

#[tokio::test(start_paused = true)]
async fn closed_circuits_leave_the_pool_and_close_all_closes_the_rest() {
    let r = rig(&[]);
    let a = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::NoAuth)
        .await
        .unwrap();
    let b = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::credentials("x", "y"))
        .await
        .unwrap();
    a.close();
    assert_eq!(r.mgr.n_circuits(), 1);
    r.mgr.close_all().await;
    assert!(b.is_closed());
    assert_eq!(r.mgr.n_circuits(), 0);
}

#[tokio::test(start_paused = true)]
async fn maintenance_makes_the_proxy_ready_and_keeps_clean_circuits() {
    let r = rig(&[]);
    let (tx, rx) = watch::channel(false);
    let mut ready = r.mgr.ready.subscribe();
    let task = tokio::spawn(Arc::clone(&r.mgr).maintain(rx));
    ready.wait_for(|r| *r).await.unwrap();
    // A clean circuit gets used: maintenance builds another.
    r.mgr
        .get_circuit(Some(80), &IsolationKey::NoAuth)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;
    tx.send(true).unwrap();
    task.await.unwrap();
    // At least two clean circuits, and two for the port in use (an exit built for no port in
    // particular may not allow it, then more are built).
    assert!(r.mgr.circuits().iter().filter(|c| !c.dirty).count() >= 2);
    let pool = r.mgr.pool.lock().unwrap();
    let clean_80 = pool
        .iter()
        .filter(|e| e.dirty_since.is_none() && e.circ.exit().allows_port(80))
        .count();
    assert_eq!(clean_80, 2);
    drop(pool);
    assert_eq!(r.mgr.circuits().iter().filter(|c| c.dirty).count(), 1);
}

#[tokio::test(start_paused = true)]
async fn prebuilt_circuits_cover_every_predicted_port() {
    let r = rig(&[]);
    let k = IsolationKey::NoAuth;
    // Ports 80 and 22 are in use; only relays 5 and 6 exit to 22, and they do not exit to 80,
    // so no single exit covers both.
    r.mgr.get_circuit(Some(80), &k).await.unwrap();
    r.mgr
        .get_circuit(Some(22), &IsolationKey::credentials("x", "y"))
        .await
        .unwrap();
    let view = r.mgr.view().unwrap();
    r.mgr.top_up(&view).await.unwrap();
    {
        let pool = r.mgr.pool.lock().unwrap();
        let clean: Vec<_> = pool.iter().filter(|e| e.dirty_since.is_none()).collect();
        for port in [80u16, 22] {
            let n = clean
                .iter()
                .filter(|e| e.circ.exit().allows_port(port))
                .count();
            assert!(
                n >= r.mgr.cfg.get().prebuilt_circuits,
                "port {port}: {n} clean"
            );
        }
        // Relays 1-4 exit to every port, so a circuit through them counts for both ports:
        // no more than four builds are needed.
        assert!(clean.len() <= 4, "{}", clean.len());
    }
    // A new stream to either port now finds a circuit without building.
    let before = builds(&r);
    r.mgr
        .get_circuit(Some(22), &IsolationKey::credentials("p", "q"))
        .await
        .unwrap();
    r.mgr
        .get_circuit(Some(80), &IsolationKey::credentials("s", "t"))
        .await
        .unwrap();
    assert_eq!(builds(&r), before);
}

#[tokio::test(start_paused = true)]
async fn predicted_ports_expire() {
    let r = rig(&[]);
    r.mgr
        .get_circuit(Some(22), &IsolationKey::NoAuth)
        .await
        .unwrap();
    let view = r.mgr.view().unwrap();
    assert_eq!(r.mgr.predicted_ports(&view, now()), vec![22]);
    tokio::time::advance(PREDICTED_PORT_TTL).await;
    assert!(r.mgr.predicted_ports(&view, now()).is_empty());
}

/// A builder whose builds take a scripted time (simulated), to feed the learned timeout.
#[derive(Default)]
struct TimedBuilder {
    /// Build durations in ms, in order; a build past the end hangs.
    times: Mutex<VecDeque<u64>>,
    inner: FakeBuilder,
}

impl CircBuilder for TimedBuilder {
    type Circ = FakeCirc;

    async fn build<'a>(
        &'a self,
        path: &'a Path,
        progress: Arc<crate::control::BuildProgress>,
    ) -> Result<Arc<FakeCirc>, ClientError> {
        let t = self.times.lock().unwrap().pop_front();
        match t {
            Some(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            None => std::future::pending().await,
        }
        self.inner.build(path, progress).await
    }

    async fn close_links(&self) {}
    fn close_links_now(&self) {}
}

#[tokio::test(start_paused = true)]
async fn the_build_timeout_is_learned_saved_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Arc::new(ProxyConfig {
        data_dir: dir.path().to_path_buf(),
        test_network: true,
        ..ProxyConfig::default()
    });
    let mk = |times: Vec<u64>| {
        let b = TimedBuilder::default();
        b.times.lock().unwrap().extend(times);
        let (ready, _) = watch::channel(false);
        let guards = GuardSet::load(dir.path()).unwrap();
        let mgr = Arc::new(CircMgr::with_builder(Arc::clone(&cfg), guards, ready, b));
        let relays: Vec<RelayInfo> = (1..=4).map(|i| relay(i, vec![(1, 65535)])).collect();
        mgr.set_dir(DirView {
            relays,
            weights: Default::default(),
            hs: Default::default(),
            distinct_subnets: false,
        });
        mgr
    };
    // 100 builds of 200-600 ms (spread like a Pareto tail).
    let times: Vec<u64> = (0..100u64).map(|i| 200 + (i * i) % 400).collect();
    let mgr = mk(times);
    assert_eq!(mgr.current_build_timeout(), Duration::from_secs(10));
    for i in 0..100 {
        let k = IsolationKey::credentials(i.to_string().as_str(), "x");
        mgr.get_circuit(Some(80), &k).await.unwrap();
    }
    let learned = mgr.current_build_timeout();
    assert!(
        learned > Duration::from_millis(250) && learned < Duration::from_secs(2),
        "{learned:?}"
    );
    // A stuck first attempt is now cut at the learned timeout, not at 10 s, and the retry
    // succeeds; the stuck relay is not marked down for it.
    mgr.builder.times.lock().unwrap().extend([100_000, 300]);
    let started = now();
    mgr.get_circuit(Some(80), &IsolationKey::credentials("late", "x"))
        .await
        .unwrap();
    assert!(started.elapsed() < learned + Duration::from_millis(400));
    assert!(mgr.relay_down.lock().unwrap().is_empty());
    // Saved every 10 records: a restarted manager starts from the learned timeout.
    assert!(dir.path().join(CBT_FILE).exists());
    let again = mk(vec![]);
    let restored = again.current_build_timeout();
    assert!(
        restored < Duration::from_secs(2) && restored > Duration::from_millis(250),
        "{restored:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reloaded_dirtiness_applies_to_circuits_already_open() {
    let r = rig(&[]);
    let k = IsolationKey::NoAuth;
    let old = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    let mut new_cfg = (*r.mgr.config()).clone();
    new_cfg.max_circuit_dirtiness = Duration::from_secs(30);
    new_cfg.prebuilt_circuits = 5;
    new_cfg.socks_listen = "127.0.0.1:1".parse().unwrap(); // not reloadable: ignored
    r.mgr.reconfigure(&new_cfg);
    assert_eq!(
        r.mgr.config().max_circuit_dirtiness,
        Duration::from_secs(30)
    );
    assert_eq!(r.mgr.config().prebuilt_circuits, 5);
    assert_ne!(r.mgr.config().socks_listen, new_cfg.socks_listen);
    tokio::time::advance(Duration::from_secs(29)).await;
    let same = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(Arc::ptr_eq(&old, &same), "still within the new dirtiness");
    tokio::time::advance(Duration::from_secs(2)).await;
    let fresh = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(
        !Arc::ptr_eq(&old, &fresh),
        "past the reloaded dirtiness (30 s, not the 600 s it started with)"
    );
}

/// Many streams with different isolation keys race for the same clean circuits: selecting a
/// circuit and setting its key happen under one hold of the pool lock, so each clean circuit
/// goes to one key only, and it records that key. (Were the key set in a second critical
/// section, two racers could both see the circuit clean and share it.)
#[test]
fn racing_claims_never_share_a_clean_circuit_between_keys() {
    const RACERS: usize = 16;
    const CLEAN: usize = 3;
    let r = rig(&[]);
    let exit = r.relays[0].clone();
    let t = now();
    for round in 0..200 {
        let circs: Vec<Arc<FakeCirc>> = (0..CLEAN)
            .map(|_| {
                Arc::new(FakeCirc {
                    exit: exit.clone(),
                    hops: [r.relays[1].id, r.relays[2].id, exit.id],
                    closed: AtomicBool::new(false),
                    streams: AtomicUsize::new(0),
                })
            })
            .collect();
        {
            let mut pool = r.mgr.pool.lock().unwrap();
            for e in pool.iter() {
                e.circ.close();
            }
            pool.clear();
            pool.extend(circs.iter().map(|c| Entry {
                circ: Arc::clone(c),
                dirty_since: None,
                isolation: None,
                last_active: t,
            }));
        }
        let barrier = std::sync::Barrier::new(RACERS);
        let won: Vec<(usize, Option<Arc<FakeCirc>>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..RACERS)
                .map(|i| {
                    let (mgr, barrier) = (&r.mgr, &barrier);
                    s.spawn(move || {
                        let key = IsolationKey::credentials(format!("user{i}"), "pw");
                        barrier.wait();
                        (i, mgr.find(Some(80), &key, t))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<(usize, Arc<FakeCirc>)> = won
            .into_iter()
            .filter_map(|(i, c)| c.map(|c| (i, c)))
            .collect();
        assert_eq!(
            winners.len(),
            CLEAN,
            "round {round}: one claim per clean circuit"
        );
        for (n, (i, c)) in winners.iter().enumerate() {
            for (j, d) in winners.iter().skip(n + 1) {
                assert!(
                    !Arc::ptr_eq(c, d),
                    "round {round}: keys {i} and {j} share a circuit"
                );
            }
            let pool = r.mgr.pool.lock().unwrap();
            let e = pool.iter().find(|e| Arc::ptr_eq(&e.circ, c)).unwrap();
            assert_eq!(
                e.isolation,
                Some(IsolationKey::credentials(format!("user{i}"), "pw")),
                "round {round}: the circuit records its claimant's key"
            );
        }
    }
}

/// A rig whose proxy config is changed by `f`, where only the two port-22 exits are guards (so
/// every circuit to port 80 goes through the first primary guard).
fn rig_with(script: &[Outcome], f: impl FnOnce(&mut ProxyConfig)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ProxyConfig {
        data_dir: dir.path().to_path_buf(),
        test_network: true,
        primary_guards: 2,
        ..ProxyConfig::default()
    };
    f(&mut cfg);
    let guards = GuardSet::load(dir.path()).unwrap();
    let (ready, _) = watch::channel(false);
    let builder = FakeBuilder::default();
    builder
        .script
        .lock()
        .unwrap()
        .extend(script.iter().copied());
    let mgr = Arc::new(CircMgr::with_builder(Arc::new(cfg), guards, ready, builder));
    let mut relays: Vec<RelayInfo> = (1..=4).map(|i| relay(i, vec![(1, 65535)])).collect();
    for r in &mut relays {
        r.flags.guard = false;
    }
    relays.push(relay(5, vec![(22, 22)]));
    relays.push(relay(6, vec![(22, 22)]));
    mgr.set_dir(DirView {
        relays: relays.clone(),
        weights: Default::default(),
        hs: Default::default(),
        distinct_subnets: false,
    });
    Rig {
        mgr,
        _dir: dir,
        relays,
    }
}

#[tokio::test(start_paused = true)]
async fn idle_circuits_close_isolated_ones_sooner() {
    let r = rig(&[]);
    let cfg = r.mgr.config();
    assert_eq!(cfg.isolated_circuit_idle_timeout, Duration::from_secs(30));
    assert_eq!(cfg.circuit_idle_timeout, Duration::from_secs(60));
    let alice = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::credentials("alice", "pw"))
        .await
        .unwrap();
    let token = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::Token(9))
        .await
        .unwrap();
    let busy = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::credentials("bob", "pw"))
        .await
        .unwrap();
    busy.streams.store(1, Ordering::Release);
    let shared = r
        .mgr
        .get_circuit(Some(80), &IsolationKey::NoAuth)
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(29)).await;
    r.mgr.expire(now());
    assert!(!alice.is_closed() && !token.is_closed());
    tokio::time::advance(Duration::from_secs(1)).await;
    r.mgr.expire(now());
    assert!(
        alice.is_closed(),
        "an isolated circuit idle for 30 s is closed"
    );
    assert!(token.is_closed());
    assert!(!busy.is_closed(), "a circuit carrying a stream stays");
    assert!(!shared.is_closed(), "an unauthenticated one gets 60 s");
    // The busy one's stream ends: its idle time counts from when it was last seen busy.
    busy.streams.store(0, Ordering::Release);
    tokio::time::advance(Duration::from_secs(29)).await;
    r.mgr.expire(now());
    assert!(!busy.is_closed());
    tokio::time::advance(Duration::from_secs(1)).await;
    r.mgr.expire(now());
    assert!(busy.is_closed());
    assert!(shared.is_closed(), "idle 60 s");
    // Reusing a circuit restarts its idle time.
    let k = IsolationKey::credentials("carol", "pw");
    let c = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    tokio::time::advance(Duration::from_secs(20)).await;
    let c2 = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(Arc::ptr_eq(&c, &c2));
    tokio::time::advance(Duration::from_secs(20)).await;
    r.mgr.expire(now());
    assert!(!c.is_closed());
}

/// The scraper: fresh SOCKS credentials for every request, 24 requests a second, each
/// stream lasting a second, maintenance every 5 s, for 4 simulated minutes (when the proxy
/// started failing). Circuits must not pile up towards the relay's per-link cap (2,048): at
/// most about the last 35 s of requests stay open.
#[tokio::test(start_paused = true)]
async fn a_scraper_with_fresh_credentials_does_not_pile_up_circuits() {
    let r = rig(&[]);
    let mut open: VecDeque<(Instant, Arc<FakeCirc>)> = VecDeque::new();
    let mut peak = 0;
    let start = now();
    let mut n = 0u64;
    while now().saturating_duration_since(start) < Duration::from_secs(240) {
        for _ in 0..24 {
            n += 1;
            let k = IsolationKey::credentials(format!("u{n}"), "pw");
            let c = r.mgr.get_circuit(Some(443), &k).await.unwrap();
            c.streams.fetch_add(1, Ordering::AcqRel);
            open.push_back((now(), c));
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        while open
            .front()
            .is_some_and(|(t, _)| now().saturating_duration_since(*t) >= Duration::from_secs(1))
        {
            if let Some((_, c)) = open.pop_front() {
                c.streams.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if now()
            .saturating_duration_since(start)
            .as_secs()
            .is_multiple_of(5)
        {
            r.mgr.expire(now());
        }
        peak = peak.max(r.mgr.n_circuits());
    }
    assert_eq!(builds(&r) as u64, n);
    assert!(peak <= 24 * 37, "circuits piled up: peak {peak}");
    assert!(peak >= 24 * 30, "peak {peak}");
    assert_eq!(r.mgr.limit_counts(), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn circuits_per_guard_are_bounded_idle_ones_make_room() {
    let r = rig_with(&[], |c| c.max_circuits_per_guard = 8);
    let mut circs = Vec::new();
    for i in 0..8 {
        let k = IsolationKey::credentials(format!("u{i}"), "pw");
        let c = r.mgr.get_circuit(Some(80), &k).await.unwrap();
        c.streams.store(1, Ordering::Release);
        circs.push(c);
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let guard = circs[0].hops[0];
    assert!(
        circs.iter().all(|c| c.hops[0] == guard),
        "one primary guard"
    );
    // Every circuit carries a stream: the ninth is refused, without trying to build.
    let k = IsolationKey::credentials("late", "pw");
    let e = r.mgr.get_circuit(Some(80), &k).await.unwrap_err();
    assert!(
        matches!(e, ClientError::GuardCircuitLimit { limit: 8 }),
        "{e}"
    );
    assert_eq!(e.kind(), crate::err::ErrorKind::ResourceLimit);
    assert!(!e.is_retriable());
    assert_eq!(builds(&r), 8);
    assert_eq!(r.mgr.limit_counts(), (1, 0));
    // Two become idle: the one idle longest (by when last seen busy) makes room.
    circs[5].streams.store(0, Ordering::Release);
    circs[2].streams.store(0, Ordering::Release);
    let c = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    assert!(circs[2].is_closed(), "the longest idle is closed");
    assert!(!circs[5].is_closed());
    assert_eq!(r.mgr.n_circuits(), 8);
    assert!(!c.is_closed());
}

#[tokio::test(start_paused = true)]
async fn a_guard_at_its_circuit_cap_gets_our_idle_circuits_back() {
    let r = rig_with(&[], |_| {});
    let idle: Vec<Arc<FakeCirc>> = {
        let mut v = Vec::new();
        for i in 0..3 {
            let k = IsolationKey::credentials(format!("u{i}"), "pw");
            v.push(r.mgr.get_circuit(Some(80), &k).await.unwrap());
        }
        v
    };
    idle[0].streams.store(1, Ordering::Release);
    r.mgr
        .builder
        .script
        .lock()
        .unwrap()
        .push_back(Outcome::GuardFull);
    let k = IsolationKey::credentials("next", "pw");
    let c = r.mgr.get_circuit(Some(80), &k).await.unwrap();
    let paths = r.mgr.builder.paths.lock().unwrap().clone();
    assert_eq!(paths.len(), 5);
    assert_eq!(
        paths[4][0], paths[3][0],
        "the guard is retried at once, not marked down"
    );
    assert!(idle[1].is_closed() && idle[2].is_closed());
    assert!(!idle[0].is_closed(), "a circuit carrying a stream is kept");
    assert!(!c.is_closed());
    assert_eq!(r.mgr.limit_counts(), (0, 1));
}

/// Vanguards-lite: every onion-service path (`onion_hops`, what `circuit_ending_at` builds) has
/// one of the persisted layer-2 vanguards as its middle, compatible with its guard and last hop.
#[test]
fn onion_service_paths_have_a_vanguard_as_middle() {
    let r = rig(&[]);
    let vg = r.mgr.vanguard_ids();
    assert_eq!(vg.len(), crate::vanguards::N_VANGUARDS);
    let view = r.mgr.view().unwrap();
    let mut middles = std::collections::HashSet::new();
    for last in &r.relays {
        for _ in 0..25 {
            let (g, m) = r.mgr.onion_hops(&view, last).unwrap();
            assert!(vg.contains(&m.id), "middle is not a vanguard");
            assert_ne!(m.id, last.id);
            assert_ne!(m.id, g.id);
            assert_ne!(g.id, last.id);
            middles.insert(m.id);
        }
    }
    assert!(middles.iter().all(|m| vg.contains(m)));
    // Kept in the data directory: a restarted proxy has the same set.
    let again = crate::vanguards::VanguardSet::load(r._dir.path()).unwrap();
    assert_eq!(again.ids(), vg);
}

/// The HopTarget sibling: a rendezvous point outside the consensus still gets a vanguard middle.
#[test]
fn a_target_outside_the_consensus_gets_a_vanguard_middle_too() {
    let r = rig(&[]);
    let vg = r.mgr.vanguard_ids();
    let view = r.mgr.view().unwrap();
    let stranger = relay(77, vec![]);
    let t = crate::core::HopTarget::new(stranger.id, stranger.onion_key, &stranger.addrs);
    for _ in 0..20 {
        let (g, m, last) = r.mgr.onion_hops_for_target(&view, &t).unwrap();
        assert!(vg.contains(&m.id));
        assert_eq!(last.id, stranger.id);
        assert_eq!(last.addrs, stranger.addrs);
        assert_ne!(g.id, m.id);
    }
    // A listed target uses its consensus entry.
    let listed = &r.relays[0];
    let t = crate::core::HopTarget::new(listed.id, listed.onion_key, &listed.addrs);
    let (_, m, last) = r.mgr.onion_hops_for_target(&view, &t).unwrap();
    assert_eq!(last.flags, listed.flags);
    assert!(vg.contains(&m.id) && m.id != listed.id);
}
