//! Standard output for the subcommands: every line goes through [`outln!`], which returns the
//! write error instead of panicking, and [`is_broken_pipe`] lets `main` end quietly with success
//! when the reader went away (`allium consensus show | head -1`).

/// `writeln!` to a locked stdout, returning `std::io::Result<()>` (use with `?`).
#[macro_export]
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
    }};
}

/// Whether an error (or one of its sources) is a write to a closed pipe.
pub fn is_broken_pipe(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::BrokenPipe
        {
            return true;
        }
        cur = err.source();
    }
    false
}
