//! Configuration reload: compare the running configuration with the file, key by key.
//!
//! The comparison is on the serialized form of each role's configuration struct, so a new key
//! is covered without touching this module; which keys may change live is the role's
//! `RELOADABLE_KEYS` list, kept in its crate beside the code that applies them.

use serde::Serialize;
use serde_json::{Map, Value};

/// One key whose value differs between the running configuration and the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The top-level TOML key.
    pub key: String,
    /// The running value, in a short printable form.
    pub old: String,
    /// The file's value, in the same form.
    pub new: String,
}

/// What a reload does with a new file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Changed keys that apply while the role runs.
    pub applied: Vec<Change>,
    /// Changed keys that need a restart: the running value is kept.
    pub refused: Vec<Change>,
}

impl ReloadPlan {
    /// Whether the file changes nothing.
    pub fn is_empty(&self) -> bool {
        self.applied.is_empty() && self.refused.is_empty()
    }

    /// Whether `key` is among the applied changes.
    pub fn applies(&self, key: &str) -> bool {
        self.applied.iter().any(|c| c.key == key)
    }
}

/// The serialized form of a configuration, as a map of top-level keys.
pub fn snapshot<C: Serialize>(cfg: &C) -> Result<Map<String, Value>, String> {
    match serde_json::to_value(cfg) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("the configuration is not a table".to_owned()),
        Err(e) => Err(format!("cannot compare configurations: {e}")),
    }
}

/// Most characters of a value shown in a log line.
const SHOWN: usize = 120;

fn show(v: Option<&Value>) -> String {
    let s = match v {
        None | Some(Value::Null) => "(unset)".to_owned(),
        Some(Value::String(s)) => format!("\"{s}\""),
        Some(v) => v.to_string(),
    };
    if s.chars().count() > SHOWN {
        let mut t: String = s.chars().take(SHOWN).collect();
        t.push_str("...");
        t
    } else {
        s
    }
}

/// Compare `running` with `new` (both from [`snapshot`]); keys in `live` go to
/// [`ReloadPlan::applied`], the other changed keys to [`ReloadPlan::refused`]. Keys come out in
/// alphabetical order.
pub fn plan(running: &Map<String, Value>, new: &Map<String, Value>, live: &[&str]) -> ReloadPlan {
    let mut keys: Vec<&String> = running.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = ReloadPlan::default();
    for key in keys {
        let (a, b) = (running.get(key), new.get(key));
        if a == b {
            continue;
        }
        let change = Change {
            key: key.clone(),
            old: show(a),
            new: show(b),
        };
        if live.contains(&key.as_str()) {
            out.applied.push(change);
        } else {
            out.refused.push(change);
        }
    }
    out
}

/// The running configuration after `plan` was applied: `running` with the applied keys of `new`.
pub fn merge(running: &mut Map<String, Value>, new: &Map<String, Value>, plan: &ReloadPlan) {
    for c in &plan.applied {
        match new.get(&c.key) {
            Some(v) => {
                running.insert(c.key.clone(), v.clone());
            }
            None => {
                running.remove(&c.key);
            }
        }
    }
}

/// A controller's SETCONF values for `key` as the JSON its configuration holds, shaped like
/// the running value `current`: a list takes every value, a boolean `1`/`0`/`true`/`false`, a
/// number a number (seconds for durations). `log_level` also takes Tor's `Log` form
/// (`notice stderr`: the severity is mapped to Allium's filter).
pub fn json_value(key: &str, current: Option<&Value>, values: &[String]) -> Result<Value, String> {
    let one = || match values {
        [v] => Ok(v.trim()),
        [] => Err("needs a value".to_owned()),
        _ => Err("takes one value".to_owned()),
    };
    if key == "log_level" {
        let v = one()?;
        let sev = v.split_whitespace().next().unwrap_or(v);
        let level = match sev.to_ascii_lowercase().as_str() {
            "err" => "error",
            "warn" => "warn",
            "notice" => "info",
            "info" => "debug",
            "debug" => "trace",
            _ => v,
        };
        return Ok(Value::String(level.to_owned()));
    }
    let number = |v: &str| -> Result<Value, String> {
        if let Ok(n) = v.parse::<u64>() {
            return Ok(Value::from(n));
        }
        v.parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{v:?} is not a number (durations are in seconds)"))
    };
    match current {
        Some(Value::Bool(_)) => match one()?.to_ascii_lowercase().as_str() {
            "1" | "true" => Ok(Value::Bool(true)),
            "0" | "false" => Ok(Value::Bool(false)),
            other => Err(format!("{other:?} is not a boolean (1 or 0)")),
        },
        Some(Value::Number(_)) => number(one()?),
        Some(Value::Array(items)) => {
            let numbers = items.first().is_some_and(Value::is_number);
            values
                .iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    if numbers {
                        number(v)
                    } else {
                        Ok(Value::String(v.to_owned()))
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        Some(Value::Null) | None if values.is_empty() => Ok(Value::Null),
        _ => Ok(Value::String(one()?.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(text: &str) -> Map<String, Value> {
        let base =
            "nickname = \"r1\"\nlisten = \"127.0.0.1:9001\"\ndata_dir = \"/var/lib/allium\"\n";
        let cfg = allium_relay::RelayConfig::from_toml_str(
            &format!("{base}{text}"),
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        snapshot(&cfg).unwrap()
    }

    #[test]
    fn live_keys_apply_and_others_are_refused_by_name() {
        let old = relay("log_level = \"info\"\n");
        let new = relay(
            "log_level = \"debug\"\nbandwidth_rate = 1000000\n[exit_policy]\naccept = [\"443\"]\n",
        );
        let p = plan(&old, &new, allium_relay::config::RELOADABLE_KEYS);
        let applied: Vec<&str> = p.applied.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(applied, ["bandwidth_rate", "exit_policy", "log_level"]);
        assert!(p.refused.is_empty());
        assert_eq!(p.applied[2].old, "\"info\"");
        assert_eq!(p.applied[2].new, "\"debug\"");

        let moved = {
            let mut m = relay("");
            m.insert("listen".into(), Value::String("127.0.0.1:9002".into()));
            m
        };
        let p = plan(&old, &moved, allium_relay::config::RELOADABLE_KEYS);
        assert_eq!(p.refused.len(), 1);
        assert_eq!(p.refused[0].key, "listen");
        assert!(!p.applies("listen"));

        let mut running = old.clone();
        let p = plan(&old, &new, allium_relay::config::RELOADABLE_KEYS);
        merge(&mut running, &new, &p);
        assert_eq!(running, new);
        assert!(plan(&running, &new, &[]).is_empty());
    }

    #[test]
    fn long_values_are_shortened() {
        let v = Value::String("x".repeat(1000));
        let s = show(Some(&v));
        assert!(s.len() < 200 && s.ends_with("..."), "{s}");
        assert_eq!(show(None), "(unset)");
    }
}
