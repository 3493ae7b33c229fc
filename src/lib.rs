//! The `allium` binary's subcommands.
