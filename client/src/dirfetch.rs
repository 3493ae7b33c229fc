//! Directory fetches over BEGIN_DIR: one-hop circuits to a guard (or, for a first bootstrap, to a
//! fallback directory cache), a directory stream per request, and the consensus offered to the
//! [`ConsensusCache`] (which verifies it: any source will do, the documents are signed).
//!
//! A request is exactly the head `allium_directory::dircache::encode_request` writes (no user
//! agent, no other header); the response is read until the cache's END DONE, bounded by
//! `MAX_RESPONSE` bytes and [`DIR_FETCH_TIMEOUT`]. A consensus is asked for as a diff from the
//! one held; certificates only when the held ones do not verify the new consensus.

use std::sync::Arc;
use std::time::Duration;

use allium_directory::DirError;
use allium_directory::client::ConsensusCache;
use allium_directory::dircache::{
    DirRequest, MAX_RESPONSE, consensus_digest, encode_request, parse_certs_response,
    parse_consensus_response,
};
use allium_proto::relaymsg::EndReason;

use crate::circ::{self, Circuit, StreamEvent};
use crate::config::FallbackDir;
use crate::core::{CircParams, StreamTarget};
use crate::err::{CircError, ClientError, StreamError};
use crate::link::Link;
use crate::path::{RelayFlags, RelayInfo};

/// Longest time one directory exchange (open the stream, request, whole response) may take.
pub(crate) const DIR_FETCH_TIMEOUT: Duration = Duration::from_secs(30);

/// A fallback directory cache as a relay to connect to.
pub(crate) fn fallback_relay(f: &FallbackDir) -> RelayInfo {
    RelayInfo {
        id: f.identity,
        link_key: f.link_key,
        onion_key: f.onion_key,
        addrs: vec![f.or_addr],
        flags: RelayFlags::default(),
        weight: 0,
        family: Vec::new(),
        exit_ports: Vec::new(),
    }
}

/// Build a one-hop circuit to `relay` over `link` (a link to it).
pub(crate) async fn one_hop(
    link: Arc<Link>,
    relay: &RelayInfo,
    timeout: Duration,
) -> Result<Arc<Circuit>, ClientError> {
    let params = CircParams {
        build_timeout: timeout,
        stream_timeout: DIR_FETCH_TIMEOUT,
        max_streams: 4,
    };
    circ::build_hops(link, std::slice::from_ref(relay), params).await
}

/// Connect to `relay` and build a one-hop circuit to it (fallback directories).
pub(crate) async fn connect_one_hop(
    relay: &RelayInfo,
    timeout: Duration,
) -> Result<Arc<Circuit>, ClientError> {
    let link = Link::connect(relay, timeout).await?;
    let c = one_hop(link, relay, timeout).await;
    tracing::debug!(ok = c.is_ok(), "one-hop directory circuit built");
    c
}

/// One directory exchange on `circ`: BEGIN_DIR, the request, END DONE, then the whole response.
pub(crate) async fn exchange(circ: &Arc<Circuit>, request: &[u8]) -> Result<Vec<u8>, ClientError> {
    tokio::time::timeout(DIR_FETCH_TIMEOUT, exchange_inner(circ, request))
        .await
        .map_err(|_| ClientError::Timeout("fetching a directory document over BEGIN_DIR"))?
}

async fn exchange_inner(circ: &Arc<Circuit>, request: &[u8]) -> Result<Vec<u8>, ClientError> {
    let (sid, mut rx) = circ.open_stream(StreamTarget::BeginDir).await?;
    match rx.recv().await {
        Some(StreamEvent::Connected) => {}
        Some(StreamEvent::End(Err(e))) => return Err(e.into()),
        Some(_) => {
            circ.end_stream(sid.get(), EndReason::TORPROTOCOL).await;
            return Err(StreamError::Unexpected.into());
        }
        None => return Err(CircError::Closed.into()),
    }
    tracing::debug!("directory stream connected");
    circ.send_data(sid, request.to_vec()).await?;
    circ.end_stream(sid.get(), EndReason::DONE).await;
    let mut out = Vec::new();
    loop {
        match rx.recv().await {
            Some(StreamEvent::Data(d)) => {
                if out.len().saturating_add(d.bytes().len()) > MAX_RESPONSE {
                    circ.end_stream(sid.get(), EndReason::TORPROTOCOL).await;
                    return Err(ClientError::Directory(format!(
                        "a directory cache sent a response over {MAX_RESPONSE} bytes"
                    )));
                }
                out.extend_from_slice(d.bytes());
                circ.consumed(sid, 1).await?;
            }
            Some(StreamEvent::End(Ok(()))) => return Ok(out),
            Some(StreamEvent::End(Err(e))) => return Err(e.into()),
            Some(_) => {
                circ.end_stream(sid.get(), EndReason::TORPROTOCOL).await;
                return Err(StreamError::Unexpected.into());
            }
            None => return Err(CircError::Closed.into()),
        }
    }
}

/// How a consensus fetch over BEGIN_DIR ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A newer consensus was verified and installed.
    Updated,
    /// The cache had nothing newer than the consensus held.
    NotNewer,
}

/// Ask the cache at the end of `circ` for a consensus newer than the one `cache` holds (as a
/// diff from it), fetch certificates if the held ones do not verify it, and install it.
pub(crate) async fn fetch_consensus(
    circ: &Arc<Circuit>,
    cache: &mut ConsensusCache,
    now: u64,
) -> Result<Outcome, ClientError> {
    let held = cache.current_raw();
    let have: Vec<[u8; 32]> = held.iter().map(|(c, _)| consensus_digest(c)).collect();
    let asked_diff = !have.is_empty();
    let resp = exchange(circ, &encode_request(&DirRequest::Consensus { have })).await?;
    let raw = match parse_consensus_response(&resp, held.as_ref().map(|(c, _)| c.as_slice())) {
        Ok(raw) => raw,
        Err(e) if asked_diff => {
            // A diff that does not apply: ask for the whole document once.
            tracing::debug!("consensus diff from the cache unusable ({e}); fetching it whole");
            let req = encode_request(&DirRequest::Consensus { have: Vec::new() });
            let resp = exchange(circ, &req).await?;
            parse_consensus_response(&resp, None).map_err(dir_error)?
        }
        Err(e) => return Err(dir_error(e)),
    };
    if let Some((_, certs)) = &held {
        match cache.offer(&raw, certs, now) {
            Ok(()) => return Ok(Outcome::Updated),
            Err(DirError::Rollback { .. }) => return Ok(Outcome::NotNewer),
            // Perhaps signed with a key our certificates do not cover: fetch them.
            Err(e) => tracing::debug!("consensus from the cache needs new certificates ({e})"),
        }
    }
    let resp = exchange(circ, &encode_request(&DirRequest::Certs)).await?;
    let certs = parse_certs_response(&resp).map_err(dir_error)?;
    match cache.offer(&raw, &certs, now) {
        Ok(()) => Ok(Outcome::Updated),
        Err(DirError::Rollback { .. }) => Ok(Outcome::NotNewer),
        Err(e) => Err(dir_error(e)),
    }
}

fn dir_error(e: DirError) -> ClientError {
    ClientError::Directory(format!("directory cache: {e}"))
}
