//! Ctrl-C, and SIGTERM and SIGHUP (what `timeout` and a closed terminal
//! send), for every command.
//!
//! Commands that run step by step (`find`, `verify`, `sweep`, `capture`)
//! ask for [`flag`]: the first signal sets it, they finish the current step
//! and keep what is done, marked as interrupted (exit 130). A second
//! signal, or the first one in any other command, exits at once (130) after
//! removing the temporary files of outputs not yet complete: a finished
//! output is never touched, an unfinished one leaves nothing behind.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Set once a command polls the flag: the first signal then only sets it.
static GRACEFUL: AtomicBool = AtomicBool::new(false);

fn shared() -> &'static Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
}

/// Installs the handler (once per process, before the command runs).
pub fn install() {
    let seen = Arc::clone(shared());
    let installed = ctrlc::set_handler(move || {
        let again = seen.swap(true, Ordering::SeqCst);
        if again || !GRACEFUL.load(Ordering::SeqCst) {
            divergence::outfile::remove_unfinished();
            errln!(
                "\ninterrupted{}: exiting now; outputs already written are untouched",
                if again { " again" } else { "" }
            );
            std::process::exit(130);
        }
        errln!("\ninterrupted: finishing the current step, then writing what is done (Ctrl-C again to quit now)");
    });
    if let Err(e) = installed {
        errln!("warning: no Ctrl-C handler ({e}): an interrupted run keeps nothing");
    }
}

/// The flag a step-by-step command polls: from now on, the first signal
/// sets it instead of exiting.
pub fn flag() -> Arc<AtomicBool> {
    GRACEFUL.store(true, Ordering::SeqCst);
    Arc::clone(shared())
}
