//! `allium config check FILE [--role ROLE]`: parse and validate a configuration file with the
//! same code the role runs, without starting anything.

use std::path::{Path, PathBuf};

use allium_client::ProxyConfig;
use allium_directory::authority::AuthorityConfig;
use allium_relay::RelayConfig;

use super::CmdResult;

/// Arguments of `allium config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to do.
    #[command(subcommand)]
    pub cmd: Sub,
}

/// `allium config` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum Sub {
    /// Parse and validate FILE; print a summary, or every problem found with its key.
    Check {
        /// The configuration file.
        file: PathBuf,
        /// The role the file is for (default: guessed from its keys).
        #[arg(long, value_enum)]
        role: Option<RoleName>,
    },
}

/// The roles that read a configuration file.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoleName {
    /// `allium relay`.
    Relay,
    /// `allium proxy`.
    Proxy,
    /// `allium authority`.
    Authority,
}

impl RoleName {
    fn as_str(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Proxy => "proxy",
            Self::Authority => "authority",
        }
    }
}

/// Guess the role from the file's top-level keys: only relays have `nickname`, only proxies
/// `socks_listen`, and authorities have `listen` without `nickname`.
pub fn detect_role(table: &toml::Table) -> RoleName {
    if table.contains_key("nickname") {
        RoleName::Relay
    } else if table.contains_key("socks_listen") || !table.contains_key("listen") {
        RoleName::Proxy
    } else {
        RoleName::Authority
    }
}

/// The result of checking a file: a summary line, or the problems found.
#[derive(Debug, PartialEq, Eq)]
pub struct Report {
    /// The role checked.
    pub role: RoleName,
    /// `Ok(summary)` or every problem, each naming its key where it has one.
    pub result: Result<String, Vec<String>>,
    /// Things that work but deserve a look.
    pub warnings: Vec<String>,
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// Problems with the keys every role shares (`log_level`, `heartbeat_period_secs`, `user`).
fn ops_problems(
    log_level: &str,
    user: Option<&str>,
    allow_root: bool,
    problems: &mut Vec<String>,
    warnings: &mut Vec<String>,
) {
    if let Err(e) = crate::logging::check_filter(log_level) {
        problems.push(format!("key `log_level`: {e}"));
    }
    if let Some(name) = user {
        match nix::unistd::User::from_name(name) {
            Ok(Some(u)) if u.uid.is_root() => {
                problems.push(format!("key `user`: `{name}` is root; name an unprivileged user"));
            }
            Ok(Some(_)) => {}
            Ok(None) => problems.push(format!(
                "key `user`: no user `{name}` on this machine; create it (useradd --system {name}) or fix the key"
            )),
            Err(e) => problems.push(format!("key `user`: cannot look `{name}` up: {e}")),
        }
    }
    if allow_root {
        warnings
            .push("key `allow_root`: the role may run as root; prefer `user = \"...\"`".to_owned());
    }
}

/// Check `text` (the contents of `path`) as a configuration of `role` (or the guessed role).
pub fn check_text(text: &str, path: &Path, role: Option<RoleName>) -> Report {
    let table: Result<toml::Table, _> = text.parse();
    let role = role.unwrap_or_else(|| table.as_ref().map(detect_role).unwrap_or(RoleName::Relay));
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    if let Err(e) = &table {
        problems.push(format!("{}: not valid TOML: {e}", path.display()));
        return Report {
            role,
            result: Err(problems),
            warnings,
        };
    }
    let summary = match role {
        RoleName::Relay => match RelayConfig::from_toml_str(text, path) {
            Ok(c) => {
                ops_problems(
                    &c.log_level,
                    c.user.as_deref(),
                    c.allow_root,
                    &mut problems,
                    &mut warnings,
                );
                if c.authorities.is_empty() {
                    warnings.push(
                        "key `authorities`: none configured; the relay will never publish its descriptor or get a consensus".to_owned(),
                    );
                }
                let exit = if c.exit_policy.is_exit() {
                    format!("exit for ports {}", c.exit_policy.accept.join(","))
                } else {
                    "not an exit".to_owned()
                };
                Some(format!(
                    "relay configuration, {}, nickname {}, listen {}, advertised {}, {exit}, data_dir {}",
                    plural(c.authorities.len(), "authority"),
                    c.nickname,
                    c.listen,
                    c.advertised
                        .map_or_else(|| "(the listen address)".to_owned(), |a| a.to_string()),
                    c.data_dir.display()
                ))
            }
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        },
        RoleName::Proxy => match ProxyConfig::from_toml_str(text) {
            Ok(c) => {
                ops_problems(
                    &c.log_level,
                    c.user.as_deref(),
                    c.allow_root,
                    &mut problems,
                    &mut warnings,
                );
                if !c.socks_listen.ip().is_loopback() {
                    warnings.push(format!(
                        "key `socks_listen`: {} is not a loopback address; anyone who can reach it can use your circuits",
                        c.socks_listen
                    ));
                }
                Some(format!(
                    "proxy configuration, {}, SOCKS on {}, data_dir {}",
                    plural(c.authorities.len(), "authority"),
                    c.socks_listen,
                    c.data_dir.display()
                ))
            }
            Err(e) => {
                problems.push(format!("{}: {e}", path.display()));
                None
            }
        },
        RoleName::Authority => match AuthorityConfig::from_toml(text) {
            Ok(c) => {
                ops_problems(
                    &c.log_level,
                    c.user.as_deref(),
                    c.allow_root,
                    &mut problems,
                    &mut warnings,
                );
                if c.allow_private_addresses {
                    warnings.push(
                        "key `allow_private_addresses`: relays on private addresses are accepted (test networks only)".to_owned(),
                    );
                }
                Some(format!(
                    "authority configuration, {}, listen {}, voting every {} s, data_dir {}",
                    plural(c.authorities.len(), "authority"),
                    c.listen,
                    c.voting_interval_secs,
                    c.data_dir.display()
                ))
            }
            Err(e) => {
                problems.push(format!("{}: {e:#}", path.display()));
                None
            }
        },
    };
    let result = match summary {
        Some(s) if problems.is_empty() => Ok(s),
        _ => Err(problems),
    };
    Report {
        role,
        result,
        warnings,
    }
}

/// Run `allium config`.
#[allow(clippy::print_stdout)] // The command's output.
pub fn run(args: Args) -> CmdResult {
    let Sub::Check { file, role } = args.cmd;
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let report = check_text(&text, &file, role);
    for w in &report.warnings {
        println!("warning: {w}");
    }
    match report.result {
        Ok(summary) => {
            println!("OK: {summary}");
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                println!("problem: {p}");
            }
            Err(format!(
                "{} is not a valid {} configuration ({})",
                file.display(),
                report.role.as_str(),
                plural(problems.len(), "problem")
            )
            .into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AUTH: &str = "[[authorities]]\nidentity = \"0000000000000000000000000000000000000000000000000000000000000001\"\ndir_addr = \"127.0.0.1:7000\"\n";

    #[test]
    fn good_files_of_each_role_pass_and_are_recognised() {
        let relay = format!(
            "nickname = \"r1\"\nlisten = \"127.0.0.1:9001\"\ndata_dir = \"/tmp/r\"\n{AUTH}"
        );
        let r = check_text(&relay, Path::new("relay.toml"), None);
        assert_eq!(r.role, RoleName::Relay);
        let ok = r.result.unwrap();
        assert!(ok.starts_with("relay configuration, 1 authority,"), "{ok}");
        assert!(ok.contains("not an exit"), "{ok}");

        let r = check_text(AUTH, Path::new("proxy.toml"), None);
        assert_eq!(r.role, RoleName::Proxy);
        assert!(
            r.result
                .unwrap()
                .starts_with("proxy configuration, 1 authority")
        );

        let auth = format!("listen = \"127.0.0.1:7000\"\ndata_dir = \"/tmp/a\"\n{AUTH}");
        let r = check_text(&auth, Path::new("authority.toml"), None);
        assert_eq!(r.role, RoleName::Authority);
        assert!(r.result.unwrap().contains("voting every 3600 s"));

        // The example files of the repository are good.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (f, role) in [
            ("relay.example.toml", RoleName::Relay),
            ("proxy.example.toml", RoleName::Proxy),
            ("authority.example.toml", RoleName::Authority),
        ] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let r = check_text(&text, Path::new(f), None);
            assert_eq!(r.role, role, "{f}");
            assert!(r.result.is_ok(), "{f}: {:?}", r.result);
        }
    }

    #[test]
    fn bad_files_name_the_key() {
        let r = check_text(
            "nickname = \"bad name!\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\n",
            Path::new("r.toml"),
            None,
        );
        let p = r.result.unwrap_err();
        assert!(p[0].contains("nickname"), "{p:?}");

        let r = check_text(
            &format!(
                "nickname = \"r\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\nuser = \"no-such-user-allium\"\nlog_level = \"info,,=[\"\n{AUTH}"
            ),
            Path::new("r.toml"),
            None,
        );
        let p = r.result.unwrap_err();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("key `user`")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("key `log_level`")), "{p:?}");

        let r = check_text(
            "socks_listen = \"127.0.0.1:1\"\n",
            Path::new("p.toml"),
            None,
        );
        let p = r.result.unwrap_err();
        assert!(
            p[0].contains("p.toml") && p[0].contains("authorities"),
            "{p:?}"
        );

        let r = check_text("listen = [", Path::new("x.toml"), Some(RoleName::Authority));
        assert!(r.result.unwrap_err()[0].contains("not valid TOML"));

        // A relay file checked as an authority: the unknown key is named.
        let r = check_text(
            &format!("nickname = \"r\"\nlisten = \"127.0.0.1:1\"\ndata_dir = \"/x\"\n{AUTH}"),
            Path::new("r.toml"),
            Some(RoleName::Authority),
        );
        let p = r.result.unwrap_err();
        assert!(p[0].contains("nickname"), "{p:?}");
    }
}
