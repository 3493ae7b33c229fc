//! Running as root: refused unless asked for, or done only long enough to bind the listeners.
//!
//! A role started as root must either be told `allow_root = true` (it then keeps running as
//! root, with a warning) or `user = "name"`: it binds its listeners and opens its data directory
//! as root, hands the data directory to that user, then switches to the user's uid, gid and
//! groups for good, and checks that root cannot be regained. `setgid`/`setuid` go through
//! `nix` (the C library applies them to every thread of the process).

use std::path::Path;

use nix::unistd::{Gid, Uid, User};

/// What the role does about its user, decided before it starts.
#[derive(Debug)]
pub enum Privileges {
    /// Run as the current user.
    Keep,
    /// Started as root with `user` set: switch to this user once listening.
    DropTo(User),
}

/// Decide, before starting anything, whether this process may run and whether it will switch
/// user. `euid` is the effective user id (a parameter so that tests can check the rules).
pub fn decide(euid: u32, allow_root: bool, user: Option<&str>) -> Result<Privileges, String> {
    if let Some(name) = user {
        let u = User::from_name(name)
            .map_err(|e| format!("`user = \"{name}\"`: cannot look the user up: {e}"))?
            .ok_or_else(|| {
                format!(
                    "`user = \"{name}\"`: no such user; create it (e.g. `useradd --system {name}`) or fix the key"
                )
            })?;
        if euid != 0 {
            if u.uid.as_raw() == euid {
                return Ok(Privileges::Keep);
            }
            return Err(format!(
                "`user = \"{name}\"` needs the role to be started as root (it is running as uid {euid}); \
                 start it as root or remove the key"
            ));
        }
        if u.uid.is_root() {
            return Err(format!(
                "`user = \"{name}\"` is root itself; name an unprivileged user"
            ));
        }
        return Ok(Privileges::DropTo(u));
    }
    if euid == 0 && !allow_root {
        return Err("refusing to run as root: set `user = \"allium\"` (or another unprivileged user) \
             to switch to it once the listeners are bound, or `allow_root = true` if you really mean it"
            .to_owned());
    }
    if euid == 0 {
        tracing::warn!(
            "running as root because allow_root = true; set `user` instead to drop privileges"
        );
    }
    Ok(Privileges::Keep)
}

/// Decide for this process (its effective uid).
pub fn decide_for_me(allow_root: bool, user: Option<&str>) -> Result<Privileges, String> {
    decide(Uid::effective().as_raw(), allow_root, user)
}

/// Give `dir` and everything in it to `uid`:`gid` (the state a relay wrote as root must stay
/// writable after the switch). Symbolic links are changed themselves, never followed.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> Result<(), String> {
    let err = |p: &Path, e: std::io::Error| {
        format!(
            "cannot hand {} to uid {uid}: {e} (fix its ownership by hand, or run without `user`)",
            p.display()
        )
    };
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).map_err(|e| err(dir, e))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(dir, e))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).map_err(|e| err(dir, e))? {
            let entry = entry.map_err(|e| err(dir, e))?;
            chown_tree(&entry.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// Switch this process to `user` for good: hand it `data_dir`, set the groups, gid and uid, then
/// check the real and effective ids and that uid 0 cannot be taken back.
pub fn drop_to(user: &User, data_dir: &Path) -> Result<(), String> {
    let (uid, gid) = (user.uid, user.gid);
    chown_tree(data_dir, uid.as_raw(), gid.as_raw())?;
    let fail =
        |what: &str, e: nix::Error| format!("dropping privileges to `{}`: {what}: {e}", user.name);
    nix::unistd::setgroups(&[gid]).map_err(|e| fail("setgroups", e))?;
    nix::unistd::setgid(gid).map_err(|e| fail("setgid", e))?;
    nix::unistd::setuid(uid).map_err(|e| fail("setuid", e))?;
    verify(uid, gid)?;
    tracing::info!(
        user = %user.name,
        uid = uid.as_raw(),
        gid = gid.as_raw(),
        "dropped root privileges"
    );
    Ok(())
}

fn verify(uid: Uid, gid: Gid) -> Result<(), String> {
    let ok = Uid::current() == uid
        && Uid::effective() == uid
        && Gid::current() == gid
        && Gid::effective() == gid;
    if !ok {
        return Err(format!(
            "dropping privileges did not take: uid {}/{} gid {}/{} (wanted {uid}/{gid}); stopping",
            Uid::current(),
            Uid::effective(),
            Gid::current(),
            Gid::effective()
        ));
    }
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err("root privileges could be regained after dropping them; stopping".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused_unless_allowed_or_a_user_is_named() {
        let e = decide(0, false, None).unwrap_err();
        assert!(
            e.contains("refusing to run as root") && e.contains("user"),
            "{e}"
        );
        assert!(matches!(decide(0, true, None), Ok(Privileges::Keep)));
        assert!(matches!(decide(1000, false, None), Ok(Privileges::Keep)));
        let e = decide(0, false, Some("no-such-user-allium-test")).unwrap_err();
        assert!(e.contains("no such user"), "{e}");
        let e = decide(0, false, Some("root")).unwrap_err();
        assert!(e.contains("unprivileged"), "{e}");
        // `nobody` exists on every Debian-like system.
        if User::from_name("nobody").ok().flatten().is_some() {
            assert!(matches!(
                decide(0, false, Some("nobody")),
                Ok(Privileges::DropTo(_))
            ));
            let e = decide(12345, false, Some("nobody")).unwrap_err();
            assert!(e.contains("started as root"), "{e}");
        }
    }
}
